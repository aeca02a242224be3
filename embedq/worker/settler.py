"""Settling batches: write to Milvus, then ack; dead-letter what can never be written.

The settler is the only place that decides an entry's fate once it was read:

* ``settle``: claim each id's write (``embedq.worker.write_order``: an id a newer version already
  wrote is acked without a write), upsert the rows and apply the deletes, and only then
  record the versions and XACK the entries (per partition stream). Milvus or Redis
  unreachable means retry with backoff, nothing acked or dead-lettered.
* a row Milvus refuses is isolated (``embedq.worker.pipeline.isolate``, which the model stage uses
  for its failures too) and dead-lettered alone.
* ``dead_letter`` / ``reject``: move an entry to its dead-letter stream with a reason (and
  ack the entries an item superseded), then count it for its job.

It receives what it needs (the sink, the retrier, the in-flight set, the job ledger, the
metrics) and never calls back into the worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import structlog

from embedq.core.backoff import Retrier
from embedq.core.errors import InfrastructureError, QueueFull, SinkRejected
from embedq.queue.entries import Entry
from embedq.queue.jobs import JobLedger
from embedq.queue.stream import Stream
from embedq.sink.columns import Columns, meta_json
from embedq.sink.digest import collection_tag
from embedq.sink.milvus import Sink
from embedq.worker.heartbeat import InFlight
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.pipeline import Batch, Item, Stats, isolate
from embedq.worker.write_order import Ordering

log = structlog.get_logger("embedq.worker.settler")

FaultPoint = Callable[[str], None]


class Settler:
    def __init__(
        self,
        sink: Sink,
        ledger: JobLedger,
        *,
        ordering: Ordering,
        retrying: Retrier,
        in_flight: InFlight,
        metrics: WorkerMetrics,
        stats: Stats,
        fault_point: FaultPoint = lambda _point: None,
    ) -> None:
        self.sink = sink
        self.ledger = ledger
        self.ordering = ordering
        self.retrying = retrying
        self.in_flight = in_flight
        self.metrics = metrics
        self.stats = stats
        self.fault_point = fault_point

    # -- write, then ack -----------------------------------------------------------------

    def settle(self, batch: Batch) -> None:
        """Write ``batch``'s rows and deletes in version order, then ack their entries."""
        batch.attach_vectors()
        for stream, items in _by_stream_items([*batch.items, *batch.deletes]).items():
            self._settle(stream, items, batch)

    def _settle(self, stream: Stream, items: list[Item], batch: Batch) -> None:
        attempt = 0
        while items:
            with self.stats.cpu("fence"):
                go, stale, busy = self.ordering.claim(stream, items)
            self._settle_claimed(stream, go, stale, batch)
            if busy:
                log.debug("write_waits", ids=len(busy), why="another worker writes these ids")
                self.ordering.wait(attempt)
                attempt += 1
            items = busy

    def _settle_claimed(
        self, stream: Stream, go: list[Item], stale: list[Item], batch: Batch
    ) -> None:
        if not go and not stale:
            return
        started = time.perf_counter()
        self.fault_point("after_fence")
        written, refused = self._write([i for i in go if not i.record.is_delete])
        deletes = [i for i in go if i.record.is_delete]
        if deletes:
            ids = [i.record.id for i in deletes]
            self.retrying(
                "delete",
                partial(self.sink.delete, ids),
                on_error=partial(self.record_error, deletes),
            )
        self.fault_point("after_write")
        wrote = time.perf_counter()
        # Out of the heartbeat's set first: an acked entry must not look "lost" to it.
        done = [*written, *deletes, *stale]
        self.in_flight.discard((stream.keys.stream, e.entry_id) for i in done for e in i.entries)
        with self.stats.cpu("ack"):
            self.ordering.commit(
                stream,
                [*written, *deletes],
                refused,
                done,
                tag=collection_tag(self.sink.target),
                sparse=self.sink.sparse,
            )
        entries = [e for i in done for e in i.entries]
        tokens = {i.entry.entry_id: len(i.ids) for i in written}  # a job's metered tokens
        with self.stats.cpu("jobs"):
            self._job_progress(partial(self.ledger.record_embedded, entries, tokens))
        self.stats.add(deleted=len(deletes), stale=len(stale))
        with self.stats.cpu("metrics"):
            self._count(batch, written, write_s=wrote - started, ack_s=time.perf_counter() - wrote)

    def _write(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """Upsert ``items``; a row Milvus refuses is isolated and dead-lettered. Returns
        (written, refused)."""
        written: list[Item] = []
        refused: list[Item] = []
        for group, outcome in isolate(
            items,
            self._upsert,
            SinkRejected,
            on_split=lambda _n, _exc: self.metrics.errors.labels(kind="sink_rejected").inc(),
        ):
            if isinstance(outcome, SinkRejected):
                self.metrics.errors.labels(kind="sink_rejected").inc()
                self.reject(group[0], "sink_rejected", str(outcome))
                refused += group
            else:
                written += group
        return written, refused

    def _upsert(self, items: list[Item]) -> int:
        held = [i for i in items if i.vector is not None]
        if not held:
            return 0
        # Columns, not a dict per row: building pymilvus's per-row request was most of the
        # write stage's CPU (embedq.sink.columns).
        with self.stats.cpu("build_rows"):
            columns = self._columns(held)
        with self.stats.cpu("upsert"):
            return self.retrying(
                "upsert",
                lambda: self.sink.upsert_columns(columns),
                on_error=lambda e: self.record_error(items, e),
            )

    def _columns(self, held: list[Item]) -> Columns:
        return Columns(
            ids=[i.record.id for i in held],
            vectors=np.stack([i.vector for i in held if i.vector is not None]),
            texts=[i.record.text for i in held],
            metas=[meta_json(i.record.meta) for i in held],
            content_hashes=[i.content_hash for i in held],
            versions=[i.version for i in held],
            sparse=[i.sparse for i in held],
        )

    def _count(self, batch: Batch, items: list[Item], *, write_s: float, ack_s: float) -> None:
        whole = len(items) == len(batch.items)  # token counts are per forward pass
        tokens = batch.tokens if whole else 0
        self.metrics.stage_seconds.labels(stage="write").observe(write_s)
        self.metrics.stage_seconds.labels(stage="ack").observe(ack_s)
        self.metrics.texts.inc(len(items))
        self.metrics.tokens.inc(tokens)
        self.metrics.padded_tokens.inc(batch.padded_tokens if whole else 0)
        self.metrics.batches.inc(batch.parts)
        self.metrics.acked(e.entry_id for item in items for e in item.entries)
        self.stats.add(texts=len(items), tokens=tokens, batches=batch.parts)
        log.debug(
            "batch_done",
            count=len(items),
            tokens=batch.tokens,
            padded_tokens=batch.padded_tokens,
            encode_ms=round(batch.encode_s * 1000, 1),
            write_ms=round(write_s * 1000, 1),
            ack_ms=round(ack_s * 1000, 1),
            latency_ms=round((time.perf_counter() - batch.created_at) * 1000, 1),
        )

    # -- dead letters --------------------------------------------------------------------

    def dead_letter(
        self, stream: Stream, entry: Entry, reason: str, error: str, deliveries: int = 1
    ) -> None:
        """Move ``entry`` to ``stream``'s dead-letter stream with why (and ack it)."""
        moved = self.retrying(
            "dead-letter", lambda: stream.dlq.move(entry, reason, error, deliveries)
        )
        self.in_flight.discard([(stream.keys.stream, entry.entry_id)])
        if moved:
            self.stats.add(dead_lettered=1)
            self.metrics.dead_lettered.labels(reason=reason).inc()
            self._job_progress(partial(self.ledger.record_dead_lettered, entry))
        log.warning(
            "dead_lettered",
            entry_id=entry.entry_id,
            stream=stream.keys.stream,
            reason=reason,
            error=error[:300],
            moved=moved,
        )

    def reject(self, item: Item, reason: str, error: str) -> None:
        """Dead-letter ``item``'s entry; the older entries it superseded are acked with it."""
        self.dead_letter(item.stream, item.entry, reason, error)
        if item.superseded:
            ids = [e.entry_id for e in item.superseded]
            self.in_flight.discard((item.stream.keys.stream, i) for i in ids)
            self.retrying("ack", lambda: item.stream.ack(ids))

    def _job_progress(self, count: Callable[[], None]) -> None:
        """Job counters are at-least-once hints: a full Redis refuses them (its acks still go
        through), and waiting on one would stop a worker that can still drain."""
        try:
            self.retrying("job progress", count, give_up_on=QueueFull)
        except QueueFull as exc:
            log.warning("job_progress_skipped", error=str(exc)[:200])

    def record_error(self, items: Sequence[Item], error: str) -> None:
        """Why these entries are late, for a reclaimer that dead-letters them later."""
        for stream, group in _by_stream_items(items).items():
            # Redis may be down too; the error is only a hint.
            with contextlib.suppress(InfrastructureError):
                stream.record_error([e.entry_id for i in group for e in i.entries], error)


def _by_stream_items(items: Sequence[Item]) -> dict[Stream, list[Item]]:
    grouped: dict[Stream, list[Item]] = {}
    for item in items:
        grouped.setdefault(item.stream, []).append(item)
    return grouped
