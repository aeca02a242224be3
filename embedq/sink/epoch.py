"""The deployment's identity (its epoch), recorded on both sides: a Redis that lost its data
is told apart from a deployment that never had any (issue 25).

Redis holds everything embedq knows of the collection (the index, the jobs, the streams),
but nothing in Redis survives Redis losing its data: a restart without AOF, a FLUSHALL, a
failover to an empty replica all leave an empty Redis that looks like a new deployment,
and so does a command pointed at the wrong ``--stream`` or ``--redis-url``. Then every row
of the collection is "unknown" to the index, and ``verify --repair`` would delete them all.

So each deployment has an epoch: a random token and the time it was made. Redis keeps it
in ``S:epoch`` (field: the collection; ``embedq.core.keys``), the collection in its properties
(``embedq.sink.epoch``, next to the model's fingerprint). A worker establishes it at start
(``establish``):

* neither side has one: Redis makes one (HSETNX: workers starting together agree on the
  first), the collection records it;
* Redis has one, the collection none (created before epochs, or just now): the collection
  records Redis's;
* the collection has one and Redis none, or another: Redis lost its data since the
  collection's epoch was made (or this is another deployment's Redis). The worker says so
  in one warning line and goes on working with a fresh Redis epoch; the collection keeps
  its own, so the mismatch stays visible to every command (``check``) until
  ``embedq verify --adopt`` rebuilds the index from the collection and records Redis's
  epoch there (``accept``).

Readers (``lag``, ``top``, ``verify``) compare both sides without writing either.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from embedq.core.errors import ConfigError, EmbedqError, QueueFull, SinkRejected
from embedq.core.progress import format_time_ms
from embedq.queue.connection import translated
from embedq.queue.entries import text
from embedq.sink import error_codes as milvus_errors

if TYPE_CHECKING:
    from embedq.core.config import Settings
    from embedq.queue.stream import Stream
    from embedq.sink.milvus import Sink
    from embedq.worker.metrics import WorkerMetrics

log = structlog.get_logger("embedq.sink.epoch")

PROPERTY = "embedq.sink.epoch"  # the collection property that holds "<token> <created ms>"


@dataclass(frozen=True)
class Epoch:
    token: str
    created_ms: int

    @classmethod
    def new(cls) -> Epoch:
        return cls(secrets.token_hex(8), int(time.time() * 1000))

    @classmethod
    def parse(cls, value: str | None) -> Epoch | None:
        """``"<token> <created ms>"`` as recorded (None for nothing recorded)."""
        if not value or not value.strip():
            return None
        token, _, created = value.strip().partition(" ")
        return cls(token, int(created) if created.isdigit() else 0)

    def __str__(self) -> str:
        return f"{self.token} {self.created_ms}"


@dataclass(frozen=True)
class Standing:
    """What Redis and the collection say of the deployment (and, when they disagree, how
    many rows the index cannot account for)."""

    redis: Epoch | None
    collection: Epoch | None
    rows: int = 0  # rows the collection holds (counted only when Redis lost its data)
    indexed: int = 0  # ids the index knows, deleted ones included (likewise)

    @property
    def lost(self) -> bool:
        """The collection outlived Redis's data: it records an epoch Redis does not hold."""
        if self.collection is None:
            return False
        return self.redis is None or self.redis.token != self.collection.token

    @property
    def unknown(self) -> int:
        """Rows in the collection beyond the ids the index knows (at least that many are
        unknown to it; all of them right after the loss)."""
        return max(self.rows - self.indexed, 0)

    def line(self, unknown: int | None = None) -> str:
        """The one line every command prints when Redis lost its data ("" when it did not);
        ``unknown``: the exact count, where the caller compared every row (verify)."""
        if not self.lost or self.collection is None:
            return ""
        count = self.unknown if unknown is None else unknown
        return (
            f"Redis lost its data since {format_time_ms(self.collection.created_ms)} (the "
            f"collection's epoch {self.collection.token} is not Redis's "
            f"{self.redis.token if self.redis else '(none)'}; or --redis-url/--stream name "
            f"another deployment): {count} rows in Milvus are unknown to the index: re-send "
            "from the source or run `embedq verify --adopt`"
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields ``lag --json`` carries."""
        return {
            "redis_data_lost": self.lost,
            "redis_data_lost_message": self.line() or None,
        }


# -- each side -------------------------------------------------------------------------


def in_redis(stream: Stream, collection: str) -> Epoch | None:
    """Redis's epoch for ``collection`` (None: Redis holds none)."""
    with translated("HGET epoch"):
        raw: Any = stream.client.hget(stream.keys.epoch, collection)
    return Epoch.parse(text(raw))


def claim_in_redis(stream: Stream, collection: str) -> Epoch:
    """Redis's epoch for ``collection``, made now if it has none. HSETNX: workers that start
    together keep the first one made."""
    with translated("HSETNX epoch"):
        stream.client.hsetnx(stream.keys.epoch, collection, str(Epoch.new()))
        raw: Any = stream.client.hget(stream.keys.epoch, collection)
    found = Epoch.parse(text(raw))
    assert found is not None  # just set, or set by whoever came first
    return found


def in_collection(sink: Sink) -> Epoch | None:
    """The epoch the collection records (None: made before epochs, or not yet recorded).
    Collection properties, as for the model's fingerprint (``embedq.sink.schema``): Milvus Lite
    and the 2.3.5 server both keep them."""
    with milvus_errors.translated("describe collection"):
        info = sink.client.describe_collection(sink.collection, timeout=sink.timeout_s)
    return Epoch.parse(str((info.get("properties") or {}).get(PROPERTY, "")))


def record_in_collection(sink: Sink, epoch: Epoch) -> None:
    """Record ``epoch`` in the collection writes go to (its other properties stay)."""
    with milvus_errors.translated("alter collection"):
        sink.client.alter_collection_properties(
            sink.target, properties={PROPERTY: str(epoch)}, timeout=sink.timeout_s
        )
    log.info("epoch_recorded", collection=sink.target, epoch=epoch.token)


def _measured(standing: Standing, streams: Sequence[Stream], sink: Sink) -> Standing:
    """``standing`` with the collection's rows and the index's ids counted."""
    indexed = 0
    for stream in streams:
        if stream.keys.online:
            continue  # the interactive lane writes nothing to Milvus
        with translated("HLEN index"):
            indexed += int(stream.client.hlen(stream.keys.index(sink.index_name)))
    return Standing(standing.redis, standing.collection, rows=sink.count(), indexed=indexed)


# -- the protocol ----------------------------------------------------------------------


def establish(
    streams: Sequence[Stream], sink: Sink, metrics: WorkerMetrics | None = None
) -> Standing:
    """A worker's start (after the collection exists): record the epoch where it is missing
    and, when the two sides disagree, warn once and set ``embedq_redis_data_lost`` (see the
    module doc)."""
    recorded = in_collection(sink)
    try:
        ours = claim_in_redis(streams[0], sink.collection)
    except QueueFull as exc:
        # A full Redis refuses the epoch's first write; the worker must still start and
        # drain it (acks free memory). The epoch is made by a later start or `verify`.
        log.warning("epoch_unchecked", collection=sink.target, error=str(exc))
        return Standing(None, None)
    standing = Standing(ours, recorded or ours)
    if recorded is None:
        try:
            record_in_collection(sink, ours)
        except (ConfigError, SinkRejected) as exc:  # e.g. a Milvus user that may not alter
            # The worker writes as before; only a later loss of Redis's data goes unseen.
            log.warning("epoch_not_recorded", collection=sink.target, error=str(exc))
    elif standing.lost:
        standing = _measured(standing, streams, sink)
        log.warning("redis_data_lost", message=standing.line())
    if metrics is not None:
        metrics.redis_data_lost.set(int(standing.lost))
    return standing


def check(streams: Sequence[Stream], sink: Sink) -> Standing:
    """Compare both sides, writing neither (``verify``, ``lag``, ``top``)."""
    standing = Standing(in_redis(streams[0], sink.collection), in_collection(sink))
    return _measured(standing, streams, sink) if standing.lost else standing


def check_if_reachable(settings: Settings, streams: Sequence[Stream]) -> Standing | None:
    """``check`` for commands whose job is Redis (``lag``, ``top``): None when the
    collection cannot be read (not there, a Milvus Lite file held by a running worker,
    Milvus down), so that they still show the backlog."""
    from embedq.sink.milvus import open_sink

    sink = open_sink(settings, create=False)
    try:
        standing = Standing(in_redis(streams[0], sink.collection), in_collection(sink))
        if standing.lost:
            sink.ensure_collection(None, "", create=False)  # loaded, to count its rows
            standing = _measured(standing, streams, sink)
        return standing
    except EmbedqError as exc:
        log.debug("epoch_unchecked", why=str(exc))
        return None
    finally:
        sink.close()


def accept(streams: Sequence[Stream], sink: Sink) -> Epoch:
    """After ``embedq verify --adopt`` rebuilt the index from the collection (or a repair
    with ``--accept-redis-loss``): record Redis's epoch (made now if Redis has none) in the
    collection, so the two sides agree again."""
    ours = claim_in_redis(streams[0], sink.collection)
    record_in_collection(sink, ours)
    return ours


class EpochWatch:
    """``embedq_redis_data_lost`` for ``embedq exporter``: ``check_if_reachable`` every
    ``every_s`` in a thread of its own, so that a slow Milvus never delays the stream
    gauges; a prometheus-client collector (absent while the collection cannot be read)."""

    def __init__(self, settings: Settings, streams: Sequence[Stream], every_s: float) -> None:
        self.settings = settings
        self.streams = list(streams)
        self.every_s = every_s
        self.standing: Standing | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-epoch", daemon=True)

    def start(self) -> EpochWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        try:
            self.standing = check_if_reachable(self.settings, self.streams)
        except Exception as exc:  # Redis down: the stream gauges say so; this one goes
            log.debug("epoch_unchecked", why=f"{type(exc).__name__}: {exc}")
            self.standing = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.every_s)

    def describe(self) -> list[Any]:
        return []  # registering must not collect

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        standing = self.standing
        if standing is None:
            return
        gauge = GaugeMetricFamily(
            "embedq_redis_data_lost",
            "1 when the collection records an epoch Redis does not hold: Redis lost its data "
            "since (embedq.sink.epoch; `embedq verify --adopt`)",
        )
        gauge.add_metric([], int(standing.lost))
        yield gauge
