"""The gateway's Prometheus metrics (``/metrics``): requests and latency by endpoint and
status, the fleet's answer time, what is in flight."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDPOINTS = ("/v1/embeddings", "/v1/search", "/healthz", "/readyz", "/metrics")


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

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, status=str(status)).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
