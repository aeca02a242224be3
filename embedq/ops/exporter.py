"""``embedq exporter``: the stream's gauges, from one place.

The stream gauges (length, lag, pending, backlog, dead letters, consumers, the age of the
oldest waiting and pending entries) come from the exporter only. The Helm chart always runs
one, so they stay visible at zero workers (KEDA scales workers from 0 on this backlog);
every panel reads one consistent sample instead of mixing workers' samples taken at
different moments; and the series count stays the same however many workers run (issue 12
item 8, issue 17 item 7). Workers export only their own process's counters
(``embedq.worker.metrics``).

A background thread samples Redis every ``every_s`` on a client of its own whose socket
timeout is short; a scrape serves the last sample and never waits on Redis (issue 17: a
frozen Redis made every scrape hang until Prometheus gave up). When the last good sample is
older than ``stale_after_s``, a scrape says ``embedq_stream_up 0`` and leaves the other
gauges out rather than serve stale numbers.

Backlog is what is left to do: lag + pending. When Redis cannot compute the lag (NULL after
an XDEL between the group's position and the tail) ``embedq_stream_lag`` is absent, never
0, and ``embedq_stream_lag_unknown`` is 1; the backlog then counts the entries after the
group's position (up to ``COUNT_LIMIT``) and past that falls back to the stream's length,
an upper bound, as ``embedq lag`` tells operators to read it (issue 17: the panels went
empty while entries waited).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from embedq.core.config import Settings
from embedq.queue.connection import connect
from embedq.queue.lag import LagInfo
from embedq.queue.stream import Stream, open_partitions
from embedq.sink.epoch import EpochWatch
from embedq.worker.health import HealthServer, NotReady
from embedq.worker.metrics import runtime_registry

log = structlog.get_logger("embedq.ops.exporter")

SAMPLE_EVERY_S = 1.0
SOCKET_TIMEOUT_S = 1.0  # a sample gives up this soon on a frozen Redis
MAX_CONSUMER_SERIES = 20  # per stream: the consumers holding the most; the rest summed
COUNT_LIMIT = 10_000  # entries counted one by one when Redis cannot compute the lag
EPOCH_EVERY_S = 30.0  # how often the deployment's epoch is compared (it reads Milvus)


@dataclass(frozen=True)
class StreamState:
    info: LagInfo
    oldest_waiting_ms: int | None  # XADD time of the oldest entry not yet delivered
    oldest_pending_ms: int | None  # XADD time of the oldest entry delivered, not acked
    # When XINFO's lag is NULL: the entries after the group's position, counted (None past
    # COUNT_LIMIT entries, or when the lag is known).
    counted_waiting: int | None = None

    @property
    def backlog(self) -> int:
        """Entries left to process: lag + pending. When Redis cannot compute the lag, the
        entries after the group's position counted instead, or past ``COUNT_LIMIT`` the
        stream's length (an upper bound); before the group exists, the length (it will be
        created at 0)."""
        info = self.info
        if not info.group_exists:
            return info.length
        if info.lag is not None:
            return info.lag + info.pending
        if self.counted_waiting is not None:
            return self.counted_waiting + info.pending
        return info.length


@dataclass(frozen=True)
class StreamSample:
    states: list[StreamState]
    taken_at_s: float  # time.time() when it was taken
    duration_s: float


def open_sampled_streams(settings: Settings) -> list[Stream]:
    """Every tasks stream of ``settings`` on a client of its own with a short timeout."""
    client = connect(
        settings.redis_url, cluster=settings.redis_cluster, socket_timeout_s=SOCKET_TIMEOUT_S
    )
    stream = Stream(client, settings.stream, settings.group, settings.consumer)
    return open_partitions(stream, settings.partitions)


def read_state(stream: Stream) -> StreamState:
    info = stream.lag()
    waiting, pending = stream.oldest_ids(info)
    counted = None
    if info.group_exists and info.lag is None and info.last_delivered_id:
        # Rare (an XDEL of undelivered entries): count them, a bounded XRANGE, rather than
        # show the whole stream's length as the backlog.
        found = stream.count_after(info.last_delivered_id, COUNT_LIMIT)
        counted = found if found < COUNT_LIMIT else None
    return StreamState(info, _id_ms(waiting), _id_ms(pending), counted)


def _id_ms(entry_id: str | None) -> int | None:
    return None if entry_id is None else int(entry_id.split("-", 1)[0])


class StreamSampler:
    """Samples every stream in a background thread; ``latest()`` is the last good sample
    while it is fresh. ``refresh()`` takes one sample in the caller's thread (tests)."""

    def __init__(
        self,
        streams: Sequence[Stream],
        every_s: float = SAMPLE_EVERY_S,
        stale_after_s: float | None = None,
    ) -> None:
        self.streams = list(streams)
        self.every_s = every_s
        self.stale_after_s = stale_after_s or max(3.0, 3 * every_s)
        self._sample: StreamSample | None = None
        self._error = "no sample yet"
        self._failing = False  # logged once per outage, not once per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-sampler", daemon=True)

    def start(self) -> StreamSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def alive(self) -> bool:
        """Liveness: the sampling thread runs (it catches everything, so it should)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def refresh(self) -> None:
        started = time.perf_counter()
        try:
            states = [read_state(s) for s in self.streams]
        except Exception as exc:  # the thread never dies; the gauges say down
            self._error = f"{type(exc).__name__}: {exc}"[:300]
            if not self._failing:
                log.warning(
                    "stream_sample_failed", stream=self.streams[0].keys.base, error=self._error
                )
                self._failing = True
            return
        if self._failing:
            log.info("stream_sample_recovered", stream=self.streams[0].keys.base)
            self._failing = False
        self._error = ""
        self._sample = StreamSample(states, time.time(), time.perf_counter() - started)

    def latest(self) -> StreamSample | None:
        sample = self._sample
        if sample is None or self._error or self.age_s(sample) > self.stale_after_s:
            return None
        return sample

    @staticmethod
    def age_s(sample: StreamSample) -> float:
        return max(0.0, time.time() - sample.taken_at_s)

    def check(self) -> bool:
        """Readiness: Redis answered the last sample, recently."""
        if self.latest() is None:
            raise NotReady(self._error or f"no sample for over {self.stale_after_s:.0f}s")
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.refresh()
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))


class StreamCollector(Collector):
    """The gauges of the sampler's last sample, or ``embedq_stream_up 0`` alone."""

    def __init__(self, sampler: StreamSampler) -> None:
        self.sampler = sampler

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # registering must not collect (prometheus-client would, without this)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sample = self.sampler.latest()
        up = GaugeMetricFamily(
            "embedq_stream_up", "1 when the exporter's last sample of Redis is fresh"
        )
        up.add_metric([], 0 if sample is None else 1)
        yield up
        if sample is None:
            return
        age = GaugeMetricFamily(
            "embedq_stream_sample_age_seconds", "Seconds since the stream gauges were read"
        )
        age.add_metric([], StreamSampler.age_s(sample))
        took = GaugeMetricFamily(
            "embedq_stream_sample_duration_seconds", "Seconds the last sample of Redis took"
        )
        took.add_metric([], sample.duration_s)
        yield age
        yield took
        yield from stream_gauges(sample.states)


def stream_gauges(
    states: Sequence[StreamState], now_s: float | None = None
) -> Iterator[GaugeMetricFamily]:
    """The gauge families of some streams' states, one series per (partition) stream."""
    now_ms = (time.time() if now_s is None else now_s) * 1000
    s, g = ["stream"], ["stream", "group"]
    fam = {
        "length": ("Entries in the tasks stream", s),
        "dlq_length": ("Entries in the dead-letter stream", s),
        "redis_used_memory_bytes": ("used_memory of the Redis holding the stream", s),
        "redis_maxmemory_bytes": ("maxmemory of that Redis (0: no limit)", s),
        "redis_full": ("1 when that Redis is at maxmemory: producers are refused", s),
        "group_exists": ("1 when the consumer group exists", g),
        "lag": ("Entries not yet delivered to the group (XINFO lag); absent when unknown", g),
        "lag_unknown": ("1 when Redis cannot compute the lag (NULL): see the backlog", g),
        "pending": ("Entries delivered but not yet acked", g),
        "backlog": ("Entries left: lag + pending (lag unknown: counted, or the length)", g),
        "consumers": ("Consumers in the group", g),
        "oldest_waiting_age_seconds": ("Age of the oldest entry not yet delivered (0: none)", g),
        "oldest_pending_age_seconds": ("Age of the oldest entry delivered, not acked (0: none)", g),
        "consumer_pending": (
            f"Entries pending per consumer holding any (the top {MAX_CONSUMER_SERIES}; the "
            "rest summed as consumer=_others)",
            [*g, "consumer"],
        ),
    }
    families = {
        key: GaugeMetricFamily(f"embedq_stream_{key}", doc, labels=labels)
        for key, (doc, labels) in fam.items()
    }

    def age_s(ms: int | None) -> float:
        return 0.0 if ms is None else max(0.0, (now_ms - ms) / 1000)

    # A partial sum would understate the backlog: with any lag unknown, none is reported.
    lag_known = all(st.info.lag is not None for st in states if st.info.group_exists)
    for st in states:
        info = st.info
        stream, group = [info.stream], [info.stream, info.group]
        families["length"].add_metric(stream, info.length)
        families["dlq_length"].add_metric(stream, info.dlq_length)
        families["redis_used_memory_bytes"].add_metric(stream, info.used_memory)
        families["redis_maxmemory_bytes"].add_metric(stream, info.maxmemory)
        families["redis_full"].add_metric(stream, int(info.redis_full))
        families["group_exists"].add_metric(group, int(info.group_exists))
        families["backlog"].add_metric(group, st.backlog)
        families["oldest_waiting_age_seconds"].add_metric(group, age_s(st.oldest_waiting_ms))
        if not info.group_exists:
            continue
        if lag_known and info.lag is not None:
            families["lag"].add_metric(group, info.lag)
        families["lag_unknown"].add_metric(group, int(info.lag is None))
        families["pending"].add_metric(group, info.pending)
        families["consumers"].add_metric(group, len(info.consumers))
        families["oldest_pending_age_seconds"].add_metric(group, age_s(st.oldest_pending_ms))
        for name, pending in top_consumers(info):
            families["consumer_pending"].add_metric([*group, name], pending)
    for family in families.values():
        if family.samples:  # an empty family would still print HELP/TYPE lines
            yield family


def top_consumers(info: LagInfo) -> list[tuple[str, int]]:
    """Consumers holding entries, most first, at most ``MAX_CONSUMER_SERIES`` series: a
    fleet's idle or renamed pods add no series (issue 12: per-consumer gauges grew with the
    square of the fleet)."""
    holding = sorted((c for c in info.consumers if c.pending), key=lambda c: -c.pending)
    shown = [(c.name, c.pending) for c in holding[:MAX_CONSUMER_SERIES]]
    rest = sum(c.pending for c in holding[MAX_CONSUMER_SERIES:])
    return shown + ([("_others", rest)] if rest else [])


def serve_exporter(settings: Settings) -> tuple[HealthServer, StreamSampler]:
    """``embedq exporter``: the sampler started and its gauges with the probes on
    ``settings.metrics_port``; ``/readyz`` says whether Redis answers, ``/healthz`` whether
    the sampler runs."""
    sampler = StreamSampler(open_sampled_streams(settings)).start()
    registry = runtime_registry()
    registry.register(StreamCollector(sampler))
    # Whether Redis lost its data (embedq.sink.epoch): Milvus is read on a thread of its own.
    registry.register(EpochWatch(settings, sampler.streams, EPOCH_EVERY_S).start())
    server = HealthServer(
        registry, settings.metrics_port, settings.metrics_host, settings.metrics_backlog
    )
    server.require("redis", sampler.check)
    server.require_alive("sampler", sampler.alive)
    return server, sampler
