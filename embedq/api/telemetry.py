"""The gateway's Prometheus metrics (``/metrics``): requests and latency by endpoint and
status, the fleet's answer time, what is in flight."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDPOINTS = ("/v1/embeddings", "/v1/models", "/v1/search", "/healthz", "/readyz", "/metrics")


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        on: dict[str, Any] = {"registry": self.registry}
        self.requests = Counter(
            "embedq_api_requests",
            "Requests answered, by endpoint and status",
            ["endpoint", "status"],
            **on,
        )
        self.latency = Histogram(
            "embedq_api_request_duration_seconds",
            "Seconds from a request's arrival to its answer, by endpoint and status",
            ["endpoint", "status"],
            buckets=_LATENCY,
            **on,
        )
        self.queue_wait = Histogram(
            "embedq_api_queue_wait_seconds",
            "Seconds from a request's entries reaching the lane to its last answer (queue wait "
            "and the forward pass), per answered request",
            buckets=_LATENCY,
            **on,
        )
        self.in_flight = Gauge(
            "embedq_api_in_flight_requests", "Requests this gateway holds now", **on
        )
        self.inputs = Counter("embedq_api_inputs", "Texts embedded for callers", **on)
        self.tokens = Counter("embedq_api_tokens", "Tokens embedded for callers (usage)", **on)
        self.key_inputs = Counter(
            "embedq_api_key_inputs",
            "Texts embedded, by API key name (EMBEDQ_API_KEYS_FILE's name; a key's digest "
            "for EMBEDQ_API_KEYS; anonymous without auth). Never the key.",
            ["key"],
            **on,
        )
        self.key_tokens = Counter(
            "embedq_api_key_tokens", "Tokens embedded, by API key name", ["key"], **on
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, status=str(status)).observe(seconds)

    def meter(self, name: str, inputs: int, tokens: int) -> None:
        self.key_inputs.labels(key=name).inc(inputs)
        self.key_tokens.labels(key=name).inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


USAGE_FIELDS = ("requests", "inputs", "tokens")


def usage_key(base: str) -> str:
    """The hash every gateway of stream ``base`` meters into: ``<key name>\t<field>``
    (``USAGE_FIELDS``) → a running total (``embedq usage`` reads it)."""
    return f"{base}:usage"


def usage_table(raw: dict[bytes, bytes]) -> dict[str, dict[str, int]]:
    """``usage_key``'s hash as ``{key name: {field: total}}``."""
    table: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        name, _, what = field.decode("utf-8", "replace").rpartition("\t")
        if what in USAGE_FIELDS:
            table.setdefault(name, dict.fromkeys(USAGE_FIELDS, 0))[what] = int(value)
    return table
