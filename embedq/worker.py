"""The worker: read, encode, write, ack.

Three stages run at once, joined by small bounded queues, so the model never waits for
Redis or Milvus (as in TEI and infinity):

    reader  ── read (own pending first, reclaimed, new) → check contract → tokenize → batch
    model   ── forward pass, pool, normalize              (one thread per model replica)
    writer  ── upsert into Milvus → XACK                   (in batch order)

An entry is acked only after Milvus confirmed its write. Bad entries go to the dead-letter
stream with a reason. Infrastructure failures ack nothing: the stage retries with backoff
while the heartbeat thread keeps every in-flight entry ours. Memory is bounded by
``read_count`` plus the queue sizes, however long the backlog.

Shutdown order: the first SIGINT/SIGTERM stops the reader; batches already read are
encoded, written and acked; the process exits 0 (within ``grace_s``, else hard). A second
signal exits at once, leaving entries pending for the reclaimer. A stage that crashes
stops the whole worker loudly rather than leaving a stalled pipeline that looks healthy.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from embedq.backoff import compute_backoff
from embedq.batching import batch_limits, plan_batches
from embedq.config import Settings
from embedq.encoder import Encoder, Tokenized, release_free_heap
from embedq.errors import (
    EncodeFailed,
    InfrastructureError,
    PoisonInput,
    SinkRejected,
    StageCrashed,
)
from embedq.heartbeat import Heartbeat, InFlight
from embedq.metrics import WorkerMetrics
from embedq.reclaimer import Reclaimer
from embedq.records import Limits, Record, decode
from embedq.shutdown import GracefulShutdown
from embedq.sink import Row, Sink
from embedq.stream import Entry, Stream, partition_lanes, read_new_many

log = structlog.get_logger("embedq.worker")

T = TypeVar("T")

QUEUE_BATCHES = 4  # batches waiting between two stages; small keeps memory flat
_POLL_S = 0.2


@dataclass
class Job:
    """One decoded entry on its way through the pipeline, with the stream it came from."""

    lane: Stream
    entry: Entry
    record: Record
    ids: list[int] = field(default_factory=list)
    superseded: list[Entry] = field(default_factory=list)  # older entries for the same id

    @property
    def entries(self) -> list[Entry]:
        return [*self.superseded, self.entry]


@dataclass
class Batch:
    """Jobs that go through the model together; ``seq`` keeps writes in read order."""

    seq: int
    jobs: list[Job]
    vectors: npt.NDArray[np.float32] | None = None
    tokens: int = 0
    padded_tokens: int = 0
    encode_s: float = 0.0
    parts: list[Batch] = field(default_factory=list)  # set when the model split the batch
    created_at: float = field(default_factory=time.perf_counter)  # for latency to the ack


@dataclass
class Stats:
    texts: int = 0
    tokens: int = 0
    batches: int = 0
    dead_lettered: int = 0
    truncated: int = 0
    reclaimed: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        return {
            "texts": self.texts,
            "tokens": self.tokens,
            "batches": self.batches,
            "dead_lettered": self.dead_lettered,
            "truncated": self.truncated,
            "reclaimed": self.reclaimed,
            "elapsed_s": round(elapsed, 3),
            "texts_per_s": round(self.texts / elapsed, 1),
        }


_END = object()  # end-of-stream marker passed down the queues


class Worker:
    def __init__(
        self,
        settings: Settings,
        stream: Stream,
        encoder: Encoder | Sequence[Encoder],
        sink: Sink,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        # Batch limits left at 0 ("auto") take the defaults of the device the model is on.
        tokens, rows = batch_limits(
            self.encoder_device(encoder), settings.max_batch_tokens, settings.max_batch_rows
        )
        settings = settings.replace(max_batch_tokens=tokens, max_batch_rows=rows)
        self.settings = settings
        # One lane per partition stream; without partitions, just ``stream``.
        self.lanes = partition_lanes(stream, settings.partitions)
        self.stream = self.lanes[0]
        self.encoders = [encoder] if isinstance(encoder, Encoder) else list(encoder)
        self.encoder = self.encoders[0]
        self.sink = sink
        self.metrics = metrics or WorkerMetrics()
        self.limits = Limits(
            max_text_bytes=settings.max_text_bytes, max_meta_bytes=settings.max_meta_bytes
        )
        self.stats = Stats()
        self.stop_requested = threading.Event()
        self.in_flight = InFlight(on_change=self.metrics.in_flight.set)
        self.heartbeat = Heartbeat(
            self.lanes, self.in_flight, interval_s=max(0.2, min(10.0, settings.min_idle_s / 4))
        )
        self.reclaimers = {
            lane.keys.stream: Reclaimer(
                lane,
                min_idle_s=settings.min_idle_s,
                max_deliveries=settings.max_deliveries,
                count=settings.read_count,
                dead_letter=partial(self._dead_letter, lane),
                consumer_idle_delete_s=settings.consumer_idle_delete_s,
            )
            for lane in self.lanes
        }
        self.ready = False
        self._last_reclaim = 0.0
        self._last_trim = time.monotonic()
        self._seq = 0
        self._crash: BaseException | None = None
        self._faults_armed = bool(settings.fault_point)
        self._stats_lock = threading.Lock()

    @staticmethod
    def encoder_device(encoder: Encoder | Sequence[Encoder]) -> str:
        return (encoder if isinstance(encoder, Encoder) else encoder[0]).device

    # -- lifecycle -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the batches in hand; a second one exits at once."""
        GracefulShutdown(self.stop_requested, self.settings.grace_s).install()

    def prepare(self) -> None:
        """Join the group and make sure the collection exists (idempotent)."""
        for lane in self.lanes:
            if self._retrying("create group", lane.ensure_group):
                log.info("group_created", stream=lane.keys.stream, group=lane.group)
        self._retrying(
            "prepare collection",
            lambda: self.sink.ensure_collection(self.encoder.dimension, self.encoder.name),
        )

    def run(self) -> Stats:
        """Process entries until stopped (or, with ``drain``, until nothing is left)."""
        self.prepare()
        self.metrics.describe_model(
            self.encoder.name,
            self.encoder.device,
            str(self.encoder.dtype).removeprefix("torch."),
            self.encoder.dimension,
        )
        log.info(
            "worker_started",
            consumer=self.stream.consumer,
            stream=self.stream.keys.stream,
            group=self.stream.group,
            model=self.encoder.name,
            device=self.encoder.device,
            dtype=str(self.encoder.dtype).removeprefix("torch."),
            replicas=len(self.encoders),
            collection=self.sink.collection,
            drain=self.settings.drain,
        )
        self.stats = Stats()
        tokenized: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BATCHES)
        encoded: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BATCHES)
        threads = [self._thread("reader", self._read_stage, tokenized)]
        threads += [
            self._thread(f"model-{i}", self._model_stage, tokenized, encoded, enc)
            for i, enc in enumerate(self.encoders)
        ]
        writer = self._thread("writer", self._write_stage, encoded, len(self.encoders))
        self.heartbeat.start()
        for t in (*threads, writer):
            t.start()
        self.ready = True
        try:
            # The main thread only supervises: signal handlers run here, and a crashed stage
            # is noticed within one poll.
            while writer.is_alive():
                writer.join(timeout=_POLL_S)
                if self._crash is not None:
                    raise StageCrashed(
                        f"{type(self._crash).__name__}: {self._crash}"
                    ) from self._crash
        finally:
            self.ready = False
            self.stop_requested.set()
            self.heartbeat.stop()
        if self.settings.trim_interval_s:
            # The last acks landed after the last periodic trim: leave the stream tidy.
            self._retrying("trim", self.trim)
        log.info("worker_stopped", **self.stats.as_dict())
        return self.stats

    def _thread(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:
                log.error("stage_crashed", stage=name, error=f"{type(exc).__name__}: {exc}"[:500])
                self._crash = exc
                self.stop_requested.set()

        return threading.Thread(target=guarded, name=f"embedq-{name}", daemon=True)

    # -- stage 1: read, check, tokenize, batch ---------------------------------------

    def _read_stage(self, out: queue.Queue[Any]) -> None:
        for lane in self.lanes:
            for entries in self._own_pending(lane):
                self._admit(lane, entries, out)
        while not self.stop_requested.is_set():
            windows = self._timed("read", lambda: self._retrying("read", self.read))
            for lane, entries in windows:
                self._admit(lane, entries, out)
            if not windows and self.settings.drain and self._drained():
                break
        self._put(out, _END, force=True)

    def _own_pending(self, lane: Stream) -> Iterator[list[Entry]]:
        """This consumer's own pending entries (read before a restart, never acked)."""
        after = "0"
        while not self.stop_requested.is_set():
            entries = self._retrying(
                "read own pending",
                partial(lane.read_own_pending, self.settings.read_count, after),
            )
            if not entries:
                return
            log.info("recovering_pending", count=len(entries), stream=lane.keys.stream)
            after = entries[-1].entry_id
            yield entries

    def _admit(self, lane: Stream, entries: list[Entry], out: queue.Queue[Any]) -> None:
        self.in_flight.add((lane.keys.stream, e.entry_id) for e in entries)
        self._fault_point("after_read")
        for batch in self._timed("tokenize", partial(self.prepare_batches, lane, entries)):
            self._put(out, batch)
        release_free_heap()  # once per window: keeps RSS from creeping with the backlog

    def read(self) -> list[tuple[Stream, list[Entry]]]:
        """Reclaimed entries when a reclaim is due and finds some, else new ones; each list
        with the (partition) stream it came from."""
        now = time.monotonic()
        if self.settings.trim_interval_s and now - self._last_trim >= self.settings.trim_interval_s:
            self._last_trim = now
            self.trim()
        if now - self._last_reclaim >= self.settings.reclaim_interval_s:
            self._last_reclaim = now
            found = []
            for lane in self.lanes:
                key = lane.keys.stream
                # Our own entries can look idle right after a restart, before the first
                # heartbeat; they are already in the pipeline.
                claimed = [
                    e
                    for e in self.reclaimers[key].step()
                    if (key, e.entry_id) not in self.in_flight
                ]
                if claimed:
                    self.stats.reclaimed += len(claimed)
                    self.metrics.reclaimed.inc(len(claimed))
                    found.append((lane, claimed))
            if found:
                return found
        return read_new_many(self.lanes, self.settings.read_count, self.settings.block_ms)

    def trim(self) -> None:
        """Drop fully acknowledged entries from every lane (XTRIM MINID, never past what a
        group still needs)."""
        for lane in self.lanes:
            trimmed, minid = lane.trim()
            log.debug("trimmed", stream=lane.keys.stream, trimmed=trimmed, minid=minid)

    def _drained(self) -> bool:
        if len(self.in_flight):
            # Our own batches are still on their way: wait for their acks here, without
            # calling Redis, so a drained run ends right after its last ack; then read once
            # more, since entries may have arrived meanwhile.
            while len(self.in_flight) and not self.stop_requested.is_set():
                time.sleep(0.01)
            return False
        if self._retrying("pending", lambda: sum(lane.group_pending() for lane in self.lanes)) == 0:
            return True
        # Entries another consumer holds (alive, or dead and waiting for the reclaim that the
        # next read performs).
        time.sleep(min(0.5, self.settings.reclaim_interval_s))
        return False

    def prepare_batches(self, lane: Stream, entries: Sequence[Entry]) -> list[Batch]:
        """Contract checks and tokenization; poison entries are dead-lettered here."""
        latest: dict[str, Job] = {}
        for entry in entries:
            try:
                record = decode(entry.fields, self.limits)
            except PoisonInput as bad:
                self._dead_letter(lane, entry, bad.reason, bad.detail)
                continue
            job = Job(lane=lane, entry=entry, record=record)
            previous = latest.get(record.id)
            if previous is not None:
                # The same id twice in one window: the later entry wins and the earlier one is
                # acked with it, so an old text never overwrites a newer one out of order.
                job.superseded = [*previous.superseded, previous.entry]
            latest[record.id] = job
        jobs = list(latest.values())
        kept: list[Job] = []
        for job, tok in zip(jobs, self._tokenize(jobs), strict=True):
            if tok is None:
                continue
            if tok.truncated:
                if self.settings.on_overlong == "reject":
                    self._dead_letter_job(
                        job,
                        "overlong",
                        f"text exceeds the model's {self.encoder.max_seq_length} tokens",
                    )
                    continue
                self.stats.truncated += 1
                self.metrics.truncated.inc()
            job.ids = tok.ids
            kept.append(job)
        plan = plan_batches(
            [len(j.ids) for j in kept], self.settings.max_batch_tokens, self.settings.max_batch_rows
        )
        batches = []
        for indices in plan:
            batches.append(Batch(seq=self._seq, jobs=[kept[i] for i in indices]))
            self._seq += 1
        return batches

    def _tokenize(self, jobs: list[Job]) -> list[Tokenized | None]:
        try:
            return list(self.encoder.tokenize([j.record.text for j in jobs]))
        except EncodeFailed:
            pass
        # One text breaks the tokenizer: find it, keep the others.
        out: list[Tokenized | None] = []
        for job in jobs:
            try:
                out.append(self.encoder.tokenize([job.record.text])[0])
            except EncodeFailed as exc:
                self._dead_letter_job(job, "encode_failed", str(exc))
                out.append(None)
        return out

    def process(self, entries: Sequence[Entry], lane: Stream | None = None) -> None:
        """Check, encode, write and ack ``entries`` synchronously, outside the pipeline
        (``embedq reclaim`` uses it)."""
        lane = lane or self.stream
        self.in_flight.add((lane.keys.stream, e.entry_id) for e in entries)
        for batch in self.prepare_batches(lane, entries):
            self.encode(batch, self.encoder)
            self.settle(batch)

    # -- stage 2: the model ----------------------------------------------------------

    def _model_stage(
        self, inbox: queue.Queue[Any], out: queue.Queue[Any], encoder: Encoder
    ) -> None:
        while True:
            batch = self._get(inbox)
            if batch is _END:
                inbox.put(_END)  # let the other replicas see it too
                self._put(out, _END, force=True)
                return
            started = time.perf_counter()
            self.encode(batch, encoder)
            batch.encode_s = time.perf_counter() - started
            self.metrics.stage_seconds.labels(stage="inference").observe(batch.encode_s)
            self._fault_point("after_inference")
            self._put(out, batch, force=True)

    def encode(self, batch: Batch, encoder: Encoder) -> None:
        """Fill ``batch.vectors``; when the model fails, split until the culprit is alone."""
        try:
            result = encoder.forward([j.ids for j in batch.jobs])
        except EncodeFailed as exc:
            if len(batch.jobs) == 1:
                self._dead_letter_job(batch.jobs[0], "encode_failed", str(exc))
                batch.jobs = []
                return
            log.warning("batch_split", size=len(batch.jobs), error=str(exc)[:200])
            self.metrics.errors.labels(kind="encode").inc()
            half = len(batch.jobs) // 2
            batch.parts = [
                Batch(seq=batch.seq, jobs=batch.jobs[:half]),
                Batch(seq=batch.seq, jobs=batch.jobs[half:]),
            ]
            batch.jobs = []
            for part in batch.parts:
                self.encode(part, encoder)
            return
        batch.vectors = result.vectors
        batch.tokens, batch.padded_tokens = result.tokens, result.padded_tokens

    # -- stage 3: write, then ack ----------------------------------------------------

    def _write_stage(self, inbox: queue.Queue[Any], producers: int) -> None:
        waiting: list[tuple[int, int, Batch]] = []  # replicas may finish out of order
        next_seq, ended, tie = 0, 0, 0
        while ended < producers or waiting:
            while waiting and waiting[0][0] == next_seq:
                self.settle(heapq.heappop(waiting)[2])
                next_seq += 1
            if ended == producers:
                if waiting:  # a gap can only mean a crashed stage; settle what is here
                    self.settle(heapq.heappop(waiting)[2])
                continue
            item = self._get(inbox)
            if item is _END:
                ended += 1
                continue
            tie += 1
            heapq.heappush(waiting, (item.seq, tie, item))

    def settle(self, batch: Batch) -> None:
        for part in batch.parts:
            self.settle(part)
        if not batch.jobs or batch.vectors is None:
            return
        rows = [
            Row(id=j.record.id, vector=v, text=j.record.text, meta=j.record.meta)
            for j, v in zip(batch.jobs, batch.vectors, strict=True)
        ]
        started = time.perf_counter()
        try:
            self._retrying(
                "upsert",
                lambda: self.sink.upsert(rows),
                on_error=partial(self._record_error, batch),
            )
        except SinkRejected as exc:
            self.metrics.errors.labels(kind="sink_rejected").inc()
            if len(batch.jobs) == 1:
                self._dead_letter_job(batch.jobs[0], "sink_rejected", str(exc))
                return
            half = len(batch.jobs) // 2
            assert batch.vectors is not None
            for jobs, vectors in (
                (batch.jobs[:half], batch.vectors[:half]),
                (batch.jobs[half:], batch.vectors[half:]),
            ):
                self.settle(Batch(seq=batch.seq, jobs=jobs, vectors=vectors))
            return
        written = time.perf_counter()
        self._fault_point("after_write")
        self._ack(batch.jobs)
        acked = time.perf_counter()
        self.metrics.stage_seconds.labels(stage="write").observe(written - started)
        self.metrics.stage_seconds.labels(stage="ack").observe(acked - written)
        self.metrics.texts.inc(len(batch.jobs))
        self.metrics.tokens.inc(batch.tokens)
        self.metrics.padded_tokens.inc(batch.padded_tokens)
        self.metrics.batches.inc()
        with self._stats_lock:
            self.stats.texts += len(batch.jobs)
            self.stats.tokens += batch.tokens
            self.stats.batches += 1
        log.debug(
            "batch_done",
            count=len(batch.jobs),
            tokens=batch.tokens,
            padded_tokens=batch.padded_tokens,
            encode_ms=round(batch.encode_s * 1000, 1),
            write_ms=round((written - started) * 1000, 1),
            ack_ms=round((acked - written) * 1000, 1),
            latency_ms=round((acked - batch.created_at) * 1000, 1),
        )

    # -- helpers ---------------------------------------------------------------------

    def _fault_point(self, point: str) -> None:
        """Fault injection for the crash tests: SIGKILL this process at ``point``, once.

        Set only by tests (``--fault-point``): a real kill at an exact stage is the only way
        to prove that a crash there loses and duplicates nothing.
        """
        if self._faults_armed and self.settings.fault_point == point:
            log.warning("fault_injected", point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _ack(self, jobs: Sequence[Job]) -> None:
        """XACK the jobs' entries (per partition stream), then count them for their jobs."""
        by_lane: dict[str, tuple[Stream, list[Entry]]] = {}
        for job in jobs:
            by_lane.setdefault(job.lane.keys.stream, (job.lane, []))[1].extend(job.entries)
        for key, (lane, entries) in by_lane.items():
            ids = [e.entry_id for e in entries]
            # Out of the heartbeat's set first: an acked entry must not look "lost" to it.
            self.in_flight.discard((key, i) for i in ids)
            self._retrying("ack", partial(lane.ack, ids))
            self._retrying(
                "job progress", partial(lane.record_embedded, entries, self.encoder.name)
            )

    def _dead_letter(
        self, lane: Stream, entry: Entry, reason: str, error: str, deliveries: int = 1
    ) -> None:
        moved = self._retrying(
            "dead-letter", partial(lane.dead_letter, entry, reason, error, deliveries)
        )
        self.in_flight.discard([(lane.keys.stream, entry.entry_id)])
        if moved:
            with self._stats_lock:
                self.stats.dead_lettered += 1
            self.metrics.dead_lettered.labels(reason=reason).inc()
            self._retrying("job progress", partial(lane.record_dead_lettered, entry))
        log.warning(
            "dead_lettered",
            entry_id=entry.entry_id,
            stream=lane.keys.stream,
            reason=reason,
            error=error[:300],
            moved=moved,
        )

    def _dead_letter_job(self, job: Job, reason: str, error: str) -> None:
        self._dead_letter(job.lane, job.entry, reason, error)
        if job.superseded:
            ids = [e.entry_id for e in job.superseded]
            self.in_flight.discard((job.lane.keys.stream, i) for i in ids)
            self._retrying("ack", partial(job.lane.ack, ids))

    def _timed(self, stage: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - started)

    def _put(self, out: queue.Queue[Any], item: Any, *, force: bool = False) -> None:
        """Blocking put that gives up when a stage crashed (nobody would take the item)."""
        while True:
            if self._crash is not None and not force:
                return
            try:
                out.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if self._crash is not None:
                    return

    def _get(self, inbox: queue.Queue[Any]) -> Any:
        while True:
            try:
                return inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if self._crash is not None:
                    return _END

    def _record_error(self, batch: Batch, error: str) -> None:
        """Why these entries are late, for a reclaimer that dead-letters them later."""
        by_lane: dict[str, tuple[Stream, list[str]]] = {}
        for job in batch.jobs:
            ids = by_lane.setdefault(job.lane.keys.stream, (job.lane, []))[1]
            ids.extend(e.entry_id for e in job.entries)
        for lane, ids in by_lane.values():
            with contextlib.suppress(InfrastructureError):  # Redis may be down too
                lane.record_error(ids, error)

    def _retrying(
        self, action: str, call: Callable[[], T], on_error: Callable[[str], None] | None = None
    ) -> T:
        """Run ``call``, retrying infrastructure errors with capped, jittered backoff.

        Entries in hand stay ours meanwhile: the heartbeat thread keeps resetting their idle
        time, so no reclaimer takes them (which would raise their delivery counts toward
        the dead-letter threshold).
        """
        attempt = 0
        while True:
            try:
                return call()
            except InfrastructureError as exc:
                attempt += 1
                delay = compute_backoff(attempt)
                kind = "redis" if "redis" in str(exc) else "milvus"
                self.metrics.errors.labels(kind=kind).inc()
                log.warning(
                    "infrastructure_error",
                    action=action,
                    error=str(exc)[:300],
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                )
                if on_error is not None:
                    on_error(f"{action}: {exc}")
                if self._crash is not None:
                    raise
                time.sleep(delay)


def build_worker(settings: Settings, metrics: WorkerMetrics | None = None) -> Worker:
    """A worker wired from settings: stream, model, sink."""
    import torch

    from embedq.replicas import replicas_for, share_cpu_threads
    from embedq.sink import open_sink
    from embedq.stream import open_stream

    first = Encoder(settings.model, settings.device, settings.dtype)
    replicas = replicas_for(first.device, settings.replicas, torch.get_num_threads())
    if first.device == "cpu" and replicas > 1:
        log.info("cpu_threads_shared", replicas=replicas, threads_each=share_cpu_threads(replicas))
    # Replicas share the weights (inference only reads them); each gets its own model thread
    # in the pipeline and, on CUDA, its own stream.
    encoders = [first] + [first.replica() for _ in range(replicas - 1)]
    return Worker(settings, open_stream(settings), encoders, open_sink(settings), metrics)
