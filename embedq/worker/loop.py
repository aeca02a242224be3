"""The worker: read, encode, write, ack.

Three stages run at once, joined by small bounded queues, so the model never waits for
Redis or Milvus (as in TEI and infinity):

    reader  ── read (own pending first, reclaimed, new) → batcher: check, tokenize, batch
    model   ── forward pass, pool, normalize              (one thread per model replica)
    writer  ── settler: upsert into Milvus → XACK          (in batch order)

An entry is acked only after Milvus confirmed its write. Bad entries go to the dead-letter
stream with a reason. Infrastructure failures ack nothing: the stage retries with backoff
while the heartbeat thread keeps every in-flight entry ours. Memory is bounded by the read
window plus the queue sizes, however long the backlog (and the heap: embedq.worker.heap).

Shutdown order: the first SIGINT/SIGTERM stops the reader; batches already read are
encoded, written and acked; the process exits 0 (within ``grace_s``, else hard). A second
signal exits at once, leaving entries pending for the reclaimer. A stage that crashes
stops the whole worker loudly rather than leaving a stalled pipeline that looks healthy.
Everything a worker uses is built by ``embedq.worker.launch`` and handed in.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import structlog

from embedq.core.backoff import Retrier
from embedq.core.config import Settings
from embedq.core.errors import InfrastructureError, StageCrashed
from embedq.model.encoder import Encoder
from embedq.model.identity import identity_of
from embedq.queue.entries import Entry
from embedq.queue.stream import Stream
from embedq.sink import epoch
from embedq.sink.milvus import Sink
from embedq.worker.batcher import Batcher
from embedq.worker.heap import release_free_heap
from embedq.worker.heartbeat import Heartbeat, InFlight
from embedq.worker.lane import POLL_S, Inbox, OnlineLane, Takes
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.model_stage import Encoding
from embedq.worker.pipeline import END, Batch, Stage, Stats, merged
from embedq.worker.reader import MIN_COUNT, ReadWindow, join_collection_group, read_new_many
from embedq.worker.reclaimer import Reclaimer, ReclaimSummary, run_reclaim_all
from embedq.worker.resequencer import Reorder, drain_now
from embedq.worker.settler import Settler
from embedq.worker.shutdown import GracefulShutdown
from embedq.worker.watchdog import Watchdog

log = structlog.get_logger("embedq.worker.loop")

T = TypeVar("T")

QUEUE_BATCHES = 4  # batches waiting between two stages; small keeps memory flat
# Rows one write may merge from consecutive encoded batches: CPU batches are small (64 rows),
# and each write pays a fence, an upsert call and a settle whatever its size.
WRITE_ROWS = 1024
_POLL_S = 0.2


@dataclass
class Parts:
    """What a worker is made of; ``embedq.worker.launch.assemble`` builds it."""

    settings: Settings  # batch limits resolved
    partitions: list[Stream]
    encoders: list[Encoder]
    sink: Sink
    metrics: WorkerMetrics
    in_flight: InFlight
    heartbeat: Heartbeat
    reclaimers: dict[str, Reclaimer]
    batcher: Batcher
    settler: Settler
    encoding: Encoding
    retrying: Retrier
    stats: Stats
    stop_requested: threading.Event
    crash: list[BaseException]  # the stage error that stops the worker, once set
    fault_point: Callable[[str], None]  # tests' --fault-point (embedq.worker.launch.fault_injector)
    watchdog: Watchdog  # stages busy past stage_timeout_s are stuck
    lane: OnlineLane | None = None  # the interactive lane (None with --no-online)


class Worker:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.partitions = parts.partitions
        self.stream = parts.partitions[0]
        self.encoders = parts.encoders
        self.encoder = parts.encoders[0]
        self.sink = parts.sink
        self.metrics = parts.metrics
        self.in_flight = parts.in_flight
        self.heartbeat = parts.heartbeat
        self.batcher = parts.batcher
        self.settler = parts.settler
        self.encoding = parts.encoding
        self.retrying = parts.retrying
        self.stop_requested = parts.stop_requested
        self.lane = parts.lane
        self.ready = False
        self._last_reclaim = 0.0
        self._last_trim = time.monotonic()
        self._fault_point = parts.fault_point
        # Entries a read takes: bounded by bytes, and by seconds of work (embedq.worker.reader)
        self.window = ReadWindow(
            self.settings.read_count,
            hold_s=self.settings.read_hold_s,
            min_count=max(1, self.settings.max_batch_rows) * max(1, len(self.encoders)),
        )

    @property
    def stats(self) -> Stats:
        return self.parts.stats

    @property
    def _crash(self) -> BaseException | None:
        return self.parts.crash[0] if self.parts.crash else None

    # -- lifecycle -------------------------------------------------------------------

    def install_signal_handlers(self, on_release: Callable[[Stats], None] | None = None) -> None:
        """SIGTERM/SIGINT finish the batches in hand; past ``--grace`` the worker lets them
        go (pending for the reclaimer) with its summary, exit 0; a second, separate signal
        exits at once (embedq.worker.shutdown)."""

        def release() -> None:
            log.info(
                "worker_stopped",
                released="grace over: entries in hand left pending",
                **self.stats.as_dict(),
            )
            if on_release is not None:
                on_release(self.stats)

        GracefulShutdown(self.stop_requested, self.settings.grace_s, on_release=release).install()

    def prepare(self) -> None:
        """Join the group and make sure the collection exists (idempotent).

        Redis and Milvus must answer within ``connect_timeout_s`` (0: wait forever), else
        the error goes up (exit ``CONNECT``); a signal meanwhile stops the wait at once."""
        limit_s = self.settings.connect_timeout_s
        deadline = time.monotonic() + limit_s if limit_s else math.inf

        def give_up() -> bool:
            return self.stop_requested.is_set() or time.monotonic() >= deadline

        first = Retrier(
            on_failure=self.retrying.on_failure,
            give_up=give_up,
            sleep=lambda s: self.stop_requested.wait(max(0.0, min(s, deadline - time.monotonic()))),
        )
        created = first("prepare collection", lambda: self.sink.ensure_for(self.encoder))
        # The collection decides the group (a migration's new collection has its own), so
        # the group is joined after the collection is known: never a group that feeds no
        # collection of this model (embedq.worker.reader.join_collection_group).
        join_collection_group(self.partitions, self.sink.group)
        for stream in self.partitions:
            if self.lane is not None and stream is self.lane.stream:
                # A full Redis leaves the lane out, not the worker (OnlineLane.ensure_group).
                if self.lane.ensure_group():
                    log.info("group_created", stream=stream.keys.stream, group=stream.group)
                continue
            if first("create group", stream.ensure_group):
                log.info("group_created", stream=stream.keys.stream, group=stream.group)
        # The index of the collection writes go to, not of the alias --collection may be.
        self.settler.ordering.retarget(self.sink.index_name)
        if self.sink.incarnation:  # "": a collection from before incarnations, index kept
            # A new collection holds nothing, whatever an index from an earlier (dropped)
            # one says: dedup and stale checks must not skip what it lacks. Emptied once per
            # incarnation, in one script: a worker that started beside the creator may have
            # recorded writes already (issue 26: the creator's plain DEL erased them).
            own = self.settler.ordering.own
            incarnation = self.sink.incarnation
            if first("own index", lambda: own(incarnation, created=created)):
                log.info("index_cleared", collection=self.sink.target, why="a new collection")
        # The deployment's epoch: recorded on both sides, or Redis lost its data
        # (embedq.sink.epoch).
        first("establish epoch", lambda: epoch.establish(self.partitions, self.sink, self.metrics))

    def run(self) -> Stats:
        """Process entries until stopped (or, with ``drain``, until nothing is left)."""
        try:
            self.prepare()
        except InfrastructureError:
            if not self.stop_requested.is_set():
                raise
            # Stopped while waiting for Redis or Milvus: nothing in hand, a clean stop.
            log.info("worker_stopped", why="stopped while waiting for its dependencies")
            return self.stats
        self._log_start()
        self.stats.restart()
        encoded = queue.Queue[Stage](QUEUE_BATCHES)
        tokenized: Takes = queue.Queue[Stage](QUEUE_BATCHES)
        if self.lane is not None:  # lane batches never wait for room (embedq.worker.lane)
            tokenized = Inbox(QUEUE_BATCHES)
        self.metrics.watch_queues(tokenized=tokenized, encoded=encoded)
        stages = [self._thread("reader", lambda: self._read_stage(tokenized))]
        models: list[tuple[str, Takes, Encoder]] = [
            (f"model-{i}", tokenized, enc) for i, enc in enumerate(self.encoders)
        ]
        if self.lane is not None and isinstance(tokenized, Inbox):  # the lane's own thread
            models.append(("model-lane", tokenized.lane_only(), self.lane.encoder))
        stages += [
            self._thread(name, partial(self._model_stage, inbox, encoded, enc))
            for name, inbox, enc in models
        ]
        writer = self._thread("writer", lambda: self._write_stage(encoded, len(models)))
        self.heartbeat.start()
        for t in (*stages, writer):
            t.start()
        self.ready = True
        try:
            # The main thread supervises: signal handlers run here, a crash is seen in a poll.
            while writer.is_alive():
                writer.join(timeout=_POLL_S)
                if (crash := self._crash) is not None:
                    raise StageCrashed(f"{type(crash).__name__}: {crash}") from crash
        finally:
            self.ready = False
            self.stop_requested.set()
            self.heartbeat.stop()
        if self.settings.trim_interval_s:
            # The last acks landed after the last periodic trim: leave the stream tidy.
            self.retrying("trim", self.trim)
        log.info("worker_stopped", **self.stats.as_dict())
        return self.stats

    def reclaim(self, *, once: bool) -> ReclaimSummary:
        """``embedq reclaim``: take over idle entries and process them in this thread."""
        self.prepare()
        self.heartbeat.start()  # keeps what this process took while it works on it
        try:
            return run_reclaim_all(
                [
                    (self.parts.reclaimers[s.keys.stream], partial(self.process, stream=s))
                    for s in self.partitions
                ],
                once=once,
                interval_s=self.settings.reclaim_interval_s,
                stop=self.stop_requested,
            )
        finally:
            self.heartbeat.stop()

    def process(self, entries: Sequence[Entry], stream: Stream | None = None) -> None:
        """Check, encode, write and ack ``entries`` synchronously, outside the pipeline."""
        stream = stream or self.stream
        self.in_flight.add((stream.keys.stream, e.entry_id) for e in entries)
        for batch in self.batcher.batches(stream, entries):
            self.encode(batch, self.encoder)
            self.settler.settle(batch)

    def _log_start(self) -> None:
        dtype = str(self.encoder.dtype).removeprefix("torch.")
        self.metrics.describe_model(
            identity_of(self.encoder),
            self.encoder.device,
            dtype,
            replicas=len(self.encoders),
            model_dir=str(self.encoder.model_dir),
        )
        log.info(
            "worker_started",
            consumer=self.stream.consumer,
            stream=self.stream.keys.stream,
            group=self.stream.group,
            model=self.encoder.name,
            device=self.encoder.device,
            dtype=dtype,
            replicas=len(self.encoders),
            collection=self.sink.collection,
            drain=self.settings.drain,
        )

    def _thread(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except BaseException as exc:
                log.error("stage_crashed", stage=name, error=f"{type(exc).__name__}: {exc}"[:500])
                self.parts.crash.append(exc)
                self.stop_requested.set()

        return threading.Thread(target=guarded, name=f"embedq-{name}", daemon=True)

    # -- stage 1: read, check, tokenize, batch ---------------------------------------

    def _read_stage(self, out: Takes) -> None:
        for stream in self._readable():
            for entries in self._own_pending(stream):
                self._admit(stream, entries, out)
        # While the worker holds its share of work its acks make room; the lane is read
        # meanwhile, as while a bulk batch waits for room.
        lane = partial(self._poll_lane, out) if self.lane else None
        while not self.stop_requested.is_set():
            self.window.wait_for_room(lambda: len(self.in_flight), self.stop_requested, lane)
            with self.stats.cpu("read"):
                windows = self._timed("read", lambda: self.retrying("read", self.read))
            for stream, entries in windows:
                self._admit(stream, entries, out)
            if not windows and self.settings.drain and self._drained():
                break
        self._put(out, END, force=True)

    def _readable(self) -> list[Stream]:
        """The partitions reads, reclaims and own-pending reads include now: all of them,
        but the lane while a full Redis refuses its group (``OnlineLane.readable``)."""
        return [s for s in self.partitions if s.readable()]

    def _own_pending(self, stream: Stream) -> Iterator[list[Entry]]:
        """This consumer's own pending entries (read before a restart, never acked)."""
        after = "0"
        while not self.stop_requested.is_set():
            entries = self.retrying(
                "read own pending",
                partial(stream.read_own_pending, self.settings.read_count, after),
            )
            if not entries:
                return
            log.info("recovering_pending", count=len(entries), stream=stream.keys.stream)
            after = entries[-1].entry_id
            # Each restart re-delivers them: past max-deliveries they are poison to this
            # worker (a crash loop), not work.
            reclaimer = self.parts.reclaimers[stream.keys.stream]
            yield self.retrying("screen own pending", partial(reclaimer.screen, entries))

    def _admit(self, stream: Stream, entries: list[Entry], out: Takes) -> None:
        self.in_flight.add((stream.keys.stream, e.entry_id) for e in entries)
        if entries:
            self.stats.read_some()
        self._fault_point("after_read")
        for batch in self._timed("tokenize", lambda: self.batcher.batches(stream, entries)):
            # A lane batch never waits for room (embedq.worker.lane.Inbox); while a bulk one
            # does, the lane is read alone.
            self._put(out, batch, while_full=partial(self._poll_lane, out) if self.lane else None)
        release_free_heap()  # also for windows that made no batch (embedq.worker.heap)

    def read(self) -> list[tuple[Stream, list[Entry]]]:
        """Reclaimed entries when a reclaim is due and finds some, else new ones; each list
        with the (partition) stream it came from."""
        now = time.monotonic()
        if self.settings.trim_interval_s and now - self._last_trim >= self.settings.trim_interval_s:
            self._last_trim = now
            self.trim()
        if now - self._last_reclaim >= self.settings.reclaim_interval_s:
            self._last_reclaim = now
            found = self._reclaimed()
            if found:
                return found
        # 0 only when lane entries came in since ReadWindow.wait_for_room: a small read,
        # never COUNT 0 (XREADGROUP's "no limit").
        count = self.window.count(held=len(self.in_flight)) or MIN_COUNT
        windows = read_new_many(self._readable(), count, self.settings.block_ms)
        for _stream, entries in windows:
            self.window.saw(entries)
        return windows

    def _reclaimed(self) -> list[tuple[Stream, list[Entry]]]:
        found = []
        for stream in self._readable():
            key = stream.keys.stream
            # Our own entries can look idle right after a restart, before the first
            # heartbeat; they are already in the pipeline.
            claimed = self.parts.reclaimers[key].step(held=partial(self.in_flight.holds, key))
            if claimed:
                self.stats.add(reclaimed=len(claimed))
                self.metrics.reclaimed.inc(len(claimed))
                found.append((stream, claimed))
        return found

    def trim(self) -> None:
        """Drop fully acknowledged entries from every partition (XTRIM MINID, never past
        what a group still needs)."""
        for stream in self.partitions:
            trimmed, minid = stream.trim()
            log.debug("trimmed", stream=stream.keys.stream, trimmed=trimmed, minid=minid)

    def _drained(self) -> bool:
        if len(self.in_flight):
            # Our own batches are still on their way: wait for their acks here, without
            # calling Redis, so a drained run ends right after its last ack; then read once
            # more, since entries may have arrived meanwhile.
            while len(self.in_flight) and not self.stop_requested.is_set():
                time.sleep(0.01)
            return False
        pending = self.retrying("pending", lambda: sum(s.group_pending() for s in self.partitions))
        if pending == 0:
            return True
        # Entries another consumer holds (alive, or dead and waiting for the reclaim that the
        # next read performs).
        time.sleep(min(0.5, self.settings.reclaim_interval_s))
        return False

    # -- stage 2: the model ----------------------------------------------------------

    def _model_stage(self, inbox: Takes, out: queue.Queue[Stage], encoder: Encoder) -> None:
        while True:
            batch = self._get(inbox)
            if not isinstance(batch, Batch):
                inbox.put(END)  # let the other replicas see it too
                self._put(out, END, force=True)
                return
            started, rows, online = time.perf_counter(), len(batch.items), batch.online
            with self.parts.watchdog.working():
                self.encode(batch, encoder)
            batch.encode_s = time.perf_counter() - started
            if not online:  # the read window sizes bulk reads by the bulk replicas' pace
                self.window.measured(rows, batch.encode_s, len(self.encoders))
            self.metrics.forward_done(batch.encode_s, rows, batch.padded_tokens)
            self._fault_point("after_inference")
            release_free_heap()  # only if RSS grew: long texts grow the heap within a window
            self._put(out, batch, force=True)

    def encode(self, batch: Batch, encoder: Encoder) -> None:
        if self.lane is None:
            self.encoding.encode(batch, encoder)
        else:  # lane batches answered at once; the seat steps aside for them
            self.lane.encode(batch, encoder, self.encoding.encode)

    # -- stage 3: write, then ack ----------------------------------------------------

    def _write_stage(self, inbox: queue.Queue[Stage], producers: int) -> None:
        held, ended = Reorder(), 0  # replicas may finish out of order
        while ended < producers or len(held):
            # Everything already encoded joins this write (merged, up to WRITE_ROWS): the
            # per-write costs (fence, upsert call, settle) are paid once for all of it.
            for item in drain_now(inbox):
                ended += held.take(item)
            ready = held.ready(WRITE_ROWS)
            if ready:
                self._settle(merged(ready))
            elif ended == producers:
                if len(held):  # a gap: only a crashed stage leaves one
                    self._settle(held.pop_any())
            else:
                ended += held.take(self._get(inbox))

    def _settle(self, batch: Batch) -> None:
        with self.parts.watchdog.working():
            self.settler.settle(batch)

    # -- helpers ---------------------------------------------------------------------

    def _timed(self, stage: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.metrics.observe_stage(stage, time.perf_counter() - started)

    def _put(
        self,
        out: Takes,
        item: Stage,
        *,
        force: bool = False,
        while_full: Callable[[], None] | None = None,
    ) -> None:
        """Blocking put that gives up when a stage crashed (nobody would take the item);
        ``while_full`` is called between short waits for room."""
        while True:
            if self._crash is not None and not force:
                return
            try:
                out.put(item, timeout=_POLL_S if while_full is None else POLL_S)
                return
            except queue.Full:
                if self._crash is not None:
                    return
                if while_full is not None:
                    while_full()

    def _poll_lane(self, inbox: Takes) -> None:
        """While the reader waits for room for a bulk batch, the lane is read alone."""
        assert self.lane is not None
        self.lane.poll(self.batcher.batches, inbox)

    def _get(self, inbox: Takes) -> Stage:
        while True:
            try:
                return inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if self._crash is not None:
                    return END
