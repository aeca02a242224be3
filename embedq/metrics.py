"""Prometheus metrics: one worker process's counters, and the stream's gauges.

Each worker owns a ``WorkerMetrics`` on its own registry (tests can make several in one
process). ``StreamCollector`` reads ``Stream.lag()`` afresh on every scrape, so one scrape
of a worker or of ``embedq exporter`` answers "how far behind are we". The HTTP server
that exposes both (``--metrics-port``) lives in ``embedq.health``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from embedq.errors import EmbedqError
from embedq.lag import LagInfo
from embedq.stream import Stream

log = structlog.get_logger("embedq.metrics")

STAGES = ("read", "tokenize", "inference", "write", "ack")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.texts = Counter("embedq_texts", "Texts embedded, written and acked", registry=r)
        self.tokens = Counter("embedq_tokens", "Real (unpadded) tokens embedded", registry=r)
        self.padded_tokens = Counter("embedq_padded_tokens", "Tokens including padding", registry=r)
        self.batches = Counter("embedq_batches", "Forward passes completed", registry=r)
        self.stage_seconds = Histogram(
            "embedq_stage_duration_seconds",
            "Time per batch spent in each stage",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.errors = Counter("embedq_errors", "Failures by kind", ["kind"], registry=r)
        self.dead_lettered = Counter(
            "embedq_dead_lettered", "Entries moved to the DLQ", ["reason"], registry=r
        )
        self.reclaimed = Counter("embedq_reclaimed", "Entries taken over by XAUTOCLAIM", registry=r)
        self.truncated = Counter("embedq_truncated", "Texts cut at the model's limit", registry=r)
        self.in_flight = Gauge(
            "embedq_in_flight_entries", "Entries read but not yet acked by this worker", registry=r
        )
        self.model = Info("embedq_model", "Model, device and dtype of this worker", registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)

    def describe_model(self, name: str, device: str, dtype: str, dimension: int) -> None:
        """Fill ``embedq_model_info`` once the model is loaded."""
        self.model.info(
            {"model": name, "device": device, "dtype": dtype, "dimension": str(dimension)}
        )


class StreamCollector(Collector):
    """Stream gauges read from Redis at scrape time, one series per tasks stream (each
    partition stream has its own; ``sum by (group)`` gives the totals).

    A scrape while Redis is unreachable (or refuses the credentials) yields only
    ``embedq_stream_up 0``: the other gauges are absent rather than stale or zero, and no
    exception reaches the HTTP handler. ``embedq_stream_lag`` is absent when Redis cannot
    compute the lag of any stream (XINFO reports NULL); it is never reported as 0 then,
    and a partial sum would understate the backlog.
    """

    def __init__(self, streams: Sequence[Stream]) -> None:
        self.streams = list(streams)
        self._was_up = True

    def describe(self) -> list[GaugeMetricFamily]:
        # Declaring nothing keeps registration from scraping Redis (prometheus-client calls
        # collect() to learn the names of a collector without describe()).
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "embedq_stream_up", "1 when the last scrape could read the stream from Redis"
        )
        try:
            infos = [stream.lag() for stream in self.streams]
        except EmbedqError as exc:
            if self._was_up:  # one line per outage, not one per scrape
                log.warning(
                    "stream_scrape_failed", stream=self.streams[0].keys.base, error=str(exc)
                )
            self._was_up = False
            up.add_metric([], 0)
            yield up
            return
        self._was_up = True
        up.add_metric([], 1)
        yield up
        yield from stream_gauges(infos)


def stream_gauges(infos: Sequence[LagInfo]) -> Iterator[GaugeMetricFamily]:
    """The gauge families for some streams' ``LagInfo`` (pure: no Redis)."""
    s, g, c = ["stream"], ["stream", "group"], ["stream", "group", "consumer"]

    def family(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=labels)

    length = family("embedq_stream_length", "Entries in the tasks stream", s)
    dlq = family("embedq_stream_dlq_length", "Entries in the dead-letter stream", s)
    exists = family("embedq_stream_group_exists", "1 when the consumer group exists", g)
    lag = family("embedq_stream_lag", "Entries not yet delivered to the group (XINFO lag)", g)
    pending = family("embedq_stream_pending", "Entries delivered but not yet acked", g)
    consumers = family("embedq_stream_consumers", "Consumers in the group", g)
    per_pending = family("embedq_stream_consumer_pending", "Entries pending per consumer", c)
    per_idle = family(
        "embedq_stream_consumer_idle_seconds", "Seconds since a consumer's last read", c
    )
    lag_known = all(info.lag is not None for info in infos if info.group_exists)
    for info in infos:
        stream, group = [info.stream], [info.stream, info.group]
        length.add_metric(stream, info.length)
        dlq.add_metric(stream, info.dlq_length)
        exists.add_metric(group, int(info.group_exists))
        if not info.group_exists:
            continue
        if lag_known and info.lag is not None:
            lag.add_metric(group, info.lag)
        pending.add_metric(group, info.pending)
        consumers.add_metric(group, len(info.consumers))
        for consumer in info.consumers:
            key = [*group, consumer.name]
            per_pending.add_metric(key, consumer.pending)
            per_idle.add_metric(key, consumer.idle_ms / 1000)
    for f in (length, dlq, exists, lag, pending, consumers, per_pending, per_idle):
        if f.samples:  # an empty family would still print HELP/TYPE lines
            yield f
