"""Prometheus metrics of one worker process: what it did, how fast, and what it waits on.

Every series a worker exports carries its ``stream`` (the base tasks stream, for all its
partitions) and ``group``, so a dashboard filtered by stream never shows another stream's
work. The stream's own gauges (lag, pending, backlog, dead letters, entry ages) come from
``embedq exporter`` only (``embedq.ops.exporter``): one place, one consistent sample, visible
with zero workers, and a series count that does not grow with the fleet (issues 12 and 17).

Labelled counters start at 0 for every known label value, so the first event of each shows
in ``increase()``; no ``*_created`` series are exported; process (``process_*``) and Python
runtime (``python_*``) metrics come with every registry. The HTTP server that serves a
registry, with the probes, is ``embedq.worker.health``.
"""

from __future__ import annotations

import bisect
import collections
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from embedq import __version__

if TYPE_CHECKING:
    from embedq.model.identity import ModelIdentity

log = structlog.get_logger("embedq.worker.metrics")


class Queued(Protocol):
    """A stage queue whose depth is reported (``queue.Queue``, ``embedq.worker.lane.Inbox``)."""

    def qsize(self) -> int: ...


# `*_created` series double every counter and histogram and nobody here reads them (issue 17).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client

STAGES = ("tokenize", "inference", "write", "ack")
ERROR_KINDS = ("redis", "milvus", "other", "encode", "sink_rejected")
# Every reason a worker dead-letters with (docs/concepts.md, "Stream contract"); others still count.
DEAD_LETTER_REASONS = (
    "missing_id",
    "missing_text",
    "invalid_utf8",
    "empty_text",
    "id_too_long",
    "text_too_large",
    "meta_not_object",
    "meta_too_large",
    "unknown_op",
    "overlong",
    "encode_failed",
    "sink_rejected",
    "max_deliveries",
    "payload_deleted",
)
QUEUES = ("tokenized", "encoded")
DEPENDENCIES = ("redis", "milvus", "other")

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 86400)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def runtime_registry() -> CollectorRegistry:
    """A registry with process and Python runtime metrics and ``embedq_build_info``.

    A private registry (one per worker, so tests can run several) drops the default
    registry's ``process_*``/``python_*`` collectors; they are added back here.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Gauge(
        "embedq_build_info",
        "Always 1; the embedq and Python versions of this process",
        ["version", "python"],
        registry=registry,
    ).labels(__version__, platform.python_version()).set(1)
    return registry


class Bound:
    """A labelled family with this worker's ``stream`` and ``group`` filled in:
    ``errors.labels(kind="redis").inc()`` as if those were its only labels."""

    def __init__(self, family: Any, fixed: dict[str, str]) -> None:
        self.family = family
        self.fixed = fixed

    def labels(self, **labels: str) -> Any:
        return self.family.labels(**self.fixed, **labels)


class WorkerMetrics:
    """One worker process's metrics, every series labelled with its stream and group."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, stream: str = "", group: str = ""
    ) -> None:
        self.registry = registry or runtime_registry()
        self.on = {"stream": stream, "group": group}
        self._work()
        self._timings()
        self._state()
        self._initialise()
        self._gpu_watched = False

    def _counter(self, name: str, doc: str) -> Any:
        return Counter(name, doc, list(self.on), registry=self.registry).labels(**self.on)

    def _gauge(self, name: str, doc: str) -> Any:
        return Gauge(name, doc, list(self.on), registry=self.registry).labels(**self.on)

    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Any:
        family = Histogram(name, doc, list(self.on), buckets=buckets, registry=self.registry)
        return family.labels(**self.on)

    def _labelled(self, kind: type[Any], name: str, doc: str, label: str, **kw: Any) -> Bound:
        family = kind(name, doc, [*self.on, label], registry=self.registry, **kw)
        return Bound(family, self.on)

    def _work(self) -> None:
        """What the worker did: counters."""
        self.texts = self._counter("embedq_texts", "Texts embedded, written to Milvus and acked")
        self.tokens = self._counter("embedq_tokens", "Real (unpadded) tokens embedded and acked")
        self.padded_tokens = self._counter("embedq_padded_tokens", "Tokens including padding")
        self.batches = self._counter("embedq_batches", "Batches written and acked")
        self.upsert_row_fallback = self._counter(
            "embedq_upsert_row_fallback",
            "Upsert requests sent as dict rows: the pymilvus client had no gRPC stub for the "
            "columnar path (embedq.sink.columns.send); non-zero after a pymilvus upgrade",
        )
        self.reclaimed = self._counter("embedq_reclaimed", "Entries taken over by XAUTOCLAIM")
        self.truncated = self._counter("embedq_truncated", "Texts cut at the model's limit")
        self.encoded_texts = self._counter(
            "embedq_encoded_texts", "Distinct texts that went through the model"
        )
        self.vector_cache_hits = self._counter(
            "embedq_vector_cache_hits",
            "Texts whose vector was known (repeated text, in one window or the vector cache)",
        )
        self.errors = self._labelled(
            Counter,
            "embedq_errors",
            "Failure events: redis, milvus, other = a call that failed (once, however many "
            "retries it took; the dependency from the exception's type); encode, "
            "sink_rejected = a batch split to isolate a failing text",
            "kind",
        )
        self.dead_lettered = self._labelled(
            Counter, "embedq_dead_lettered", "Entries moved to the DLQ, by reason", "reason"
        )
        self.model_busy = self._counter(
            "embedq_model_busy_seconds",
            "Seconds spent in forward passes, summed over replicas (rate / replicas: how busy "
            "the model is)",
        )

    def _timings(self) -> None:
        """How long things took, and how big the batches were: histograms."""
        self.stage_seconds = self._labelled(
            Histogram,
            "embedq_stage_duration_seconds",
            "Seconds per unit of work: tokenize = one read window checked, tokenized and "
            "batched; inference = one forward pass; write = one Milvus upsert; ack = one ack",
            "stage",
            buckets=_SECONDS,
        )
        self.read_seconds = self._histogram(
            "embedq_read_duration_seconds",
            "Seconds per XREADGROUP, including its BLOCK wait: long ones mean an idle stream",
            _SECONDS,
        )
        self.batch_rows = self._histogram("embedq_batch_size", "Texts per forward pass", _ROWS)
        self.batch_tokens = self._histogram(
            "embedq_batch_tokens", "Padded tokens per forward pass", _TOKENS
        )
        self.enqueue_to_ack = self._histogram(
            "embedq_enqueue_to_ack_seconds",
            "Seconds from an entry's XADD (its id's time) to its ack, per entry",
            _LATENCY,
        )

    def _state(self) -> None:
        """What the worker holds and waits on now: gauges."""
        self.last_ack = self._gauge(
            "embedq_last_ack_timestamp_seconds", "Unix time of this worker's last ack (0: none)"
        )
        self.in_flight = self._gauge(
            "embedq_in_flight_entries", "Entries read but not yet acked by this worker"
        )
        self.replicas = self._gauge(
            "embedq_model_replicas", "Model replicas (threads) in this worker"
        )
        self.redis_data_lost = self._gauge(
            "embedq_redis_data_lost",
            "1 when this worker found, at start, that the collection records an epoch Redis "
            "does not hold: Redis lost its data (embedq.sink.epoch; `embedq verify --adopt`)",
        )
        self.queue_depth = self._labelled(
            Gauge,
            "embedq_queue_depth",
            "Batches waiting between stages: tokenized (reader to model), encoded (model to "
            "writer)",
            "queue",
        )
        self.retry_waiting = self._labelled(
            Gauge,
            "embedq_retry_waiting",
            "Calls backing off until this dependency answers again",
            "dependency",
        )
        self.model = Info(
            "embedq_model", "The model this worker runs", list(self.on), registry=self.registry
        )

    def _initialise(self) -> None:
        """Every known label value at 0, so the first event shows in increase()."""
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(reason=reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for name in QUEUES:
            self.queue_depth.labels(queue=name)
        for dependency in DEPENDENCIES:
            self.retry_waiting.labels(dependency=dependency)

    def describe_model(
        self,
        identity: ModelIdentity,
        device: str,
        dtype: str,
        *,
        replicas: int = 1,
        model_dir: str = "",
    ) -> None:
        """Fill ``embedq_model_info`` (the model's identity: embedq.model.identity) and the
        replica count once the model is loaded."""
        self.model.labels(**self.on).info(
            {
                "model": identity.name,
                "fingerprint": identity.fingerprint,
                "model_dir": model_dir,
                "device": device,
                "dtype": dtype,
                "dimension": str(identity.width),
            }
        )
        self.replicas.set(replicas)
        if device.startswith("cuda") and not self._gpu_watched:
            self.registry.register(GpuCollector(device, self.on))
            self._gpu_watched = True

    def observe_stage(self, stage: str, seconds: float) -> None:
        """A stage's time; "read" (mostly BLOCK wait) has its own histogram."""
        if stage == "read":
            self.read_seconds.observe(seconds)
        else:
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def forward_done(self, seconds: float, rows: int, padded_tokens: int) -> None:
        """One forward pass (by any replica) of ``rows`` texts."""
        self.stage_seconds.labels(stage="inference").observe(seconds)
        self.model_busy.inc(seconds)
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(padded_tokens)

    def acked(self, entry_ids: Iterable[str]) -> None:
        """Entries acked just now: their time since XADD, and the last-ack time. Entries
        added in the same millisecond have the same latency: one observation per distinct
        millisecond, counted as many times (a producer's pipeline adds dozens per ms)."""
        now = time.time()
        added = collections.Counter(entry_id.split("-", 1)[0] for entry_id in entry_ids)
        for added_ms, count in added.items():
            observe_many(self.enqueue_to_ack, max(0.0, now - int(added_ms) / 1000), count)
        self.last_ack.set(now)

    def watch_queues(self, **queues: Queued) -> None:
        """Report each stage queue's depth at scrape time."""
        for name, q in queues.items():
            self.queue_depth.labels(queue=name).set_function(q.qsize)

    def watch_retries(self, waiting: Callable[[], Sequence[Any]]) -> None:
        """Report the calls backing off (``Retrier.waiting``), per dependency."""
        for dependency in DEPENDENCIES:
            self.retry_waiting.labels(dependency=dependency).set_function(
                lambda d=dependency: sum(1 for w in waiting() if w.dependency == d)
            )


def observe_many(histogram: Any, value: float, count: int) -> None:
    """``count`` observations of ``value`` at the cost of one. prometheus_client keeps each
    bucket's own count (an observation lands in the first bucket it fits; exposition sums
    them), its sum and its buckets as locked values; a client laid out otherwise gets
    ``count`` plain observations."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect.bisect_left(bounds, value)].inc(count)


GPU_MEMORY = {  # embedq_gpu_memory_<key>_bytes
    "allocated": "Bytes held by tensors",
    "reserved": "Bytes torch's caching allocator holds",
    "peak": "Most bytes tensors held at once",
    "total": "The device's memory",
    "free": "Free device memory (every process)",
}


class GpuCollector(Collector):
    """CUDA memory and out-of-memory count of the worker's device, read at scrape time
    (``torch.cuda`` allocator statistics: no device synchronisation)."""

    def __init__(self, device: str, on: dict[str, str]) -> None:
        self.device = device
        self.labels = [on["stream"], on["group"], device]

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            import torch

            index = torch.device(self.device).index
            index = torch.cuda.current_device() if index is None else index
            stats = torch.cuda.memory_stats(index)
            free, total = torch.cuda.mem_get_info(index)
        except Exception as exc:  # a scrape never fails on a sick device; the log says why
            log.warning("gpu_metrics_failed", device=self.device, error=str(exc)[:200])
            return
        names = ["stream", "group", "device"]
        values = {
            "allocated": stats.get("allocated_bytes.all.current", 0),
            "reserved": stats.get("reserved_bytes.all.current", 0),
            "peak": stats.get("allocated_bytes.all.peak", 0),
            "total": total,
            "free": free,
        }
        for what, doc in GPU_MEMORY.items():
            family = GaugeMetricFamily(f"embedq_gpu_memory_{what}_bytes", doc, labels=names)
            family.add_metric(self.labels, float(values[what]))
            yield family
        ooms = CounterMetricFamily(
            "embedq_gpu_ooms", "CUDA out-of-memory errors torch's allocator raised", labels=names
        )
        ooms.add_metric(self.labels, float(stats.get("num_ooms", 0)))
        yield ooms
