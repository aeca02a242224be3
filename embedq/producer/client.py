"""Producers: put records on the tasks stream(s), as resumable jobs.

>>> from embedq.producer.client import Producer
>>> with Producer.connect("redis://127.0.0.1:6379/0", stream="embedq:tasks") as p:
...     p.enqueue([{"id": "doc-1#0", "text": "hello", "meta": {"source": "doc-1"}}])
1

``Producer.run`` sends a whole source as a job: every entry carries the job id, and each
chunk of XADDs commits together with the job's source position (``embedq/queue/lua/enqueue.lua``),
so a job restarted with the same id skips what was sent and sends the rest: each record
exactly once in total. With ``partitions`` > 1, entries go to ``S:{p<i>}`` by a hash of their
id, and each partition keeps its own position (its XADDs and position share a cluster slot).

Options: ``dedup_model`` skips texts whose content hash was already embedded with that model
(or repeated earlier in the source); ``max_lag`` pauses while the backlog of the slowest
consumer group on the stream(s) is above it instead of growing Redis without bound. The
producer never trims: that is ``embedq trim``'s job, which keeps everything a group still needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import redis
import structlog

from embedq.core.errors import DeletesRefused, EmbedqError
from embedq.core.keys import Keys, partition_for
from embedq.core.records import Record, Rejected, content_hash
from embedq.producer.sync import DocSync
from embedq.queue.connection import connect, translated
from embedq.queue.jobs import EnqueueBatch, JobLedger, Sender, check_job_id
from embedq.queue.lag import backlog, group_names
from embedq.queue.stream import Stream, open_partitions
from embedq.queue.versions import Versions

log = structlog.get_logger("embedq.producer.client")

RecordLike = Record | Mapping[str, Any]


def as_record(item: RecordLike) -> Record:
    """A ``Record`` from a Record or a mapping with ``id``, ``text`` and optional ``meta``."""
    if isinstance(item, Record):
        return item
    try:
        doc_id, text = item["id"], item["text"]
    except KeyError as missing:
        raise ValueError(f"record has no {missing.args[0]!r} field") from None
    meta = item.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(
            f"record {doc_id!r}: meta must be a JSON object, got {type(meta).__name__}"
        )
    return Record(id=str(doc_id), text=str(text), meta=meta, job=item.get("job"))


@dataclass
class Counts:
    """What a run did so far; ``position`` is the number of source items read."""

    sent: int = 0
    unchanged: int = 0  # dedup: this id already holds this text and meta, or repeated
    deleted: int = 0  # document sync: ids a document no longer has
    rejected: int = 0
    resumed: int = 0  # sent by an earlier run of the same job, not sent again
    position: int = 0
    not_cleaned: str = ""  # document sync: why this run deleted nothing on purpose
    started_at: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def accepted(self) -> int:
        """Records that passed: sent now, sent before (resumed) or already held (dedup)."""
        return self.sent + self.unchanged + self.resumed

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(self.elapsed_s, 1e-9)
        return {
            "sent": self.sent,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "rejected": self.rejected,
            "resumed": self.resumed,
            "elapsed_s": round(elapsed, 3),
            "records_per_s": round(self.sent / elapsed, 1),
        }


@dataclass(frozen=True)
class _Step:
    """What every chunk of one ``Producer.run`` is checked against."""

    counts: Counts
    seen: set[tuple[str, str]]  # (id, content hash) already sent (or skipped) in this run
    dedup: bool
    max_lag: int
    poll_s: float
    sync: DocSync | None = None
    on_rejected: Callable[[Rejected], None] | None = None
    on_progress: Callable[[Counts], None] | None = None


class Producer:
    """Enqueues records on one tasks stream, or on its partitions."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str = "embedq:tasks",
        *,
        chunk: int = 1000,
        partitions: int = 1,
        group: str = "embedq",
        collection: str = "embedq",
        max_text_bytes: int = 1_000_000,
        wait_replicas: int = 0,
    ) -> None:
        self._ledger = JobLedger(client, stream, wait_replicas=wait_replicas)
        # Workers dead-letter a longer text (text_too_large); the producer refuses it at
        # the source instead of filling Redis with it.
        self.max_text_bytes = max_text_bytes
        self.counts = Counts()  # the last run's, so far
        self.collection = collection  # whose index --dedup and --cleanup consult
        # The partition streams, for their backlog (``max_lag``): producers read nothing, so
        # they need no consumer name.
        self._lanes = open_partitions(Stream(client, stream, group=group, consumer=""), partitions)
        self.streams = [lane.keys.stream for lane in self._lanes]
        self.client = client
        self.chunk = chunk

    @classmethod
    def connect(
        cls,
        url: str = "redis://127.0.0.1:6379/0",
        stream: str = "embedq:tasks",
        *,
        chunk: int = 1000,
        partitions: int = 1,
        group: str = "embedq",
        collection: str = "embedq",
        cluster: bool = False,
    ) -> Producer:
        """``cluster``: ``url`` names a node of a Redis Cluster."""
        client = connect(url, cluster=cluster)
        return cls(
            client, stream, chunk=chunk, partitions=partitions, group=group, collection=collection
        )

    def enqueue(self, records: Iterable[RecordLike], job: str | None = None) -> int:
        """Send every record (no dedup, no backpressure); returns how many were sent."""
        return self.run((as_record(r) for r in records), job=job).sent

    def delete(self, ids: Iterable[str]) -> int:
        """Send ``op=delete`` for each id (to its partition), ordered with that id's writes:
        a worker removes the row. Deleting an absent id is fine. Returns how many were sent."""
        sent = 0
        pipe = self.client.pipeline(transaction=False)
        for doc_id in ids:
            stream = self.streams[partition_for(doc_id, len(self.streams))]
            pipe.xadd(stream, {"id": doc_id, "op": "delete"})
            sent += 1
            if len(pipe) >= self.chunk:
                with translated("XADD delete"):
                    pipe.execute()
        if len(pipe):
            with translated("XADD delete"):
                pipe.execute()
        return sent

    def run(
        self,
        items: Iterable[Record | Rejected],
        *,
        job: str | None = None,
        source: str = "",
        total: int | None = None,
        dedup: bool = False,
        sync: DocSync | None = None,
        max_lag: int = 0,
        poll_s: float = 0.2,
        on_rejected: Callable[[Rejected], None] | None = None,
        on_progress: Callable[[Counts], None] | None = None,
    ) -> Counts:
        """Send ``items`` as job ``job`` (resuming it if it ran before); see the module doc.

        The job ends ``sent``, or ``failed`` / ``interrupted`` (Ctrl-C, SIGTERM) when this
        raises; a new job that sent nothing before failing is not recorded at all."""
        counts = self.counts = Counts()  # kept: a caller that sees an error reads it
        positions = self._start(job, source, total)
        step = _Step(counts, set(), dedup, max_lag, poll_s, sync, on_rejected, on_progress)
        try:
            self._send(items, positions, job or "", step)
        except BaseException as exc:
            if job is not None:
                self._ended_early(job, exc, fresh=max(positions.values()) < 0)
            raise
        if sync is not None:
            try:
                counts.deleted = self._clean_up(sync, counts)
            except DeletesRefused:
                if job is not None:  # everything was sent: only the cleanup was refused
                    self._ledger.finish(job)
                raise
        if job is not None:
            self._ledger.finish(job)
        if on_progress is not None:
            on_progress(counts)
        return counts

    def _send(
        self, items: Iterable[Record | Rejected], positions: dict[str, int], job: str, step: _Step
    ) -> None:
        counts, on_progress, on_rejected = step.counts, step.on_progress, step.on_rejected
        single = self.streams[0] if len(self.streams) == 1 else None

        def sent(n: int) -> None:
            counts.sent += n

        sender = Sender(self._ledger, job, sent)
        try:
            chunk: list[tuple[int, Record, str]] = []
            for ordinal, item in enumerate(items):
                counts.position = ordinal + 1
                if on_progress is not None and ordinal % self.chunk == 0:
                    on_progress(counts)  # it decides how often to report
                bad = item if isinstance(item, Rejected) else self._refused(item, step.sync)
                if bad is not None or isinstance(item, Rejected):  # (the second for mypy)
                    counts.rejected += 1
                    if bad is not None:
                        if step.sync is not None:
                            step.sync.rejected(bad.meta)
                        if on_rejected is not None:
                            on_rejected(bad)
                    continue
                stream = single or self.streams[partition_for(item.id, len(self.streams))]
                if ordinal <= positions[stream]:
                    counts.resumed += 1  # sent by an earlier run of this job
                    continue
                chunk.append((ordinal, item, stream))
                if len(chunk) >= self.chunk:
                    sender.put(self._batches(chunk, step))
                    chunk = []
            sender.put(self._batches(chunk, step))
        finally:
            sender.close()

    def _ended_early(self, job: str, exc: BaseException, *, fresh: bool) -> None:
        """Record how ``job`` ended when sending stopped on ``exc`` (best effort: Redis may be
        what failed; the job then stays ``sending`` until its keys are pruned)."""
        try:
            if fresh and self.counts.sent == 0:
                self._ledger.forget(job)  # nothing to resume: not worth listing
            elif isinstance(exc, KeyboardInterrupt):
                self._ledger.finish(job, "interrupted")
            else:
                self._ledger.finish(job, "failed", f"{type(exc).__name__}: {exc}")
        except EmbedqError as also:
            log.warning("job_state_not_recorded", job=job, error=str(also)[:200])

    def _start(self, job: str | None, source: str, total: int | None) -> dict[str, int]:
        """Register the job; the last source position it sent to each stream (-1: none)."""
        if job is None:
            return dict.fromkeys(self.streams, -1)
        check_job_id(job)
        self._ledger.start(job, source, len(self.streams), total)
        return self._ledger.positions(job, self.streams)

    def _refused(self, record: Record, sync: DocSync | None) -> Rejected | None:
        """Why ``record`` is not sent, if it is not: too large, or (syncing) no document."""
        if len(record.text) * 4 > self.max_text_bytes:  # UTF-8 is at most 4 bytes a char
            size = len(record.text.encode("utf-8"))
            if size > self.max_text_bytes:
                return Rejected(
                    f"record {record.id}",
                    f"text is {size} bytes, the limit is {self.max_text_bytes} (--max-text-bytes)",
                    record.meta,  # its document keeps its old rows (document sync)
                )
        why = sync.see(record) if sync is not None else None
        return None if why is None else Rejected(f"record {record.id}", why)

    def _clean_up(self, sync: DocSync, counts: Counts) -> int:
        """After a run that sent everything: delete what the documents no longer have, within
        ``sync.max_delete`` (else ``DeletesRefused``: nothing deleted, the ledger as it was).
        A run that accepted no record at all touches neither."""
        if not counts.accepted:
            counts.not_cleaned = "every record was rejected: no cleanup in this run"
            log.warning("cleanup_skipped", why=counts.not_cleaned)
            return 0
        plan = sync.plan()
        if plan.skipped:
            counts.not_cleaned = plan.skipped
            log.warning("cleanup_skipped", why=plan.skipped)
        deleted = self.delete(plan.doomed)
        sync.record(plan)
        log.info(
            "documents_synced",
            documents=len(sync.seen),
            deleted=deleted,
            cleanup=sync.cleanup,
            ledger_ids=plan.ledger_ids,
        )
        return deleted

    def _batches(self, chunk: list[tuple[int, Record, str]], step: _Step) -> list[EnqueueBatch]:
        """One chunk of records as script arguments per partition, after dedup, once the
        group has room for it."""
        if not chunk:
            return []
        rows = [(ordinal, record, stream, _meta_bytes(record)) for ordinal, record, stream in chunk]
        if step.dedup:
            rows = self._changed(rows, step)
        if step.max_lag:
            self._wait_for_room(step.max_lag, step.poll_s)
        values: dict[str, list[Any]] = {}
        last: dict[str, int] = {}
        for ordinal, record, stream, meta in rows:
            values.setdefault(stream, []).extend((record.id, record.text, meta, b""))
            last[stream] = ordinal
        return [EnqueueBatch(s, last[s], v) for s, v in values.items()]

    def _changed(self, rows: list[_Row], step: _Step) -> list[_Row]:
        """The rows whose id does not already hold this text and meta (in the collection's
        index, which workers write only after Milvus confirmed), nor repeat one sent earlier
        in this run."""
        fresh: list[tuple[_Row, str]] = []
        for row in rows:
            key = (row[1].id, content_hash(row[1].text.encode("utf-8"), row[3]))
            if key in step.seen:
                step.counts.unchanged += 1
                continue
            step.seen.add(key)
            fresh.append((row, key[1]))
        by_stream: dict[str, list[tuple[_Row, str]]] = {}
        for row, digest in fresh:
            by_stream.setdefault(row[2], []).append((row, digest))
        kept: list[_Row] = []
        for stream, group in by_stream.items():
            versions = Versions(self.client, Keys(stream), self.collection)
            held = versions.held([row[1].id for row, _ in group])
            for (row, digest), h in zip(group, held, strict=True):
                if h is not None and h.content_hash == digest:
                    step.counts.unchanged += 1
                else:
                    kept.append(row)
        kept.sort(key=lambda row: row[0])
        return kept

    def _wait_for_room(self, max_lag: int, poll_s: float) -> None:
        """Block while the slowest group's backlog is above ``max_lag``; one log line per
        pause (``_slowest`` says why the slowest and not ``--group``'s)."""
        waiting_since: float | None = None
        while True:
            group, pending, how, exists = self._slowest()
            if pending <= max_lag:
                if waiting_since is not None:
                    log.info(
                        "backpressure_resumed",
                        group=group,
                        backlog=pending,
                        max_lag=max_lag,
                        waited_s=round(time.monotonic() - waiting_since, 2),
                    )
                return
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.info(
                    "backpressure_wait",
                    group=group,
                    backlog=pending,
                    measured_by=how,
                    max_lag=max_lag,
                    # No group anywhere: nothing will drain the backlog until a worker
                    # starts, which "the group is behind" would not tell anyone (issue 18).
                    why=(
                        f"no worker has started: consumer group {group} does not exist yet "
                        "(start a worker, or run `embedq init`); pausing until the backlog "
                        "is under --max-lag"
                        if not exists
                        else f"consumer group {group} is behind; pausing instead of filling Redis"
                    ),
                )
            time.sleep(poll_s)

    def _slowest(self) -> tuple[str, int, str, bool]:
        """(group, backlog, how measured, whether it exists) of the group furthest behind
        on the streams; ``--group``'s while no group exists.

        Every group, not only ``--group``: during a migration the new collection has a
        group of its own, after ``migrate --drop-old`` it is the only one (``--group``'s is
        gone), and trimming keeps every entry any group has not read, so the slowest group
        is what bounds the stream's memory, which ``max_lag`` is there to bound (issue 26)."""
        names = group_names(self.client, self.streams) or [self._lanes[0].group]
        slowest: tuple[str, int, str, bool] | None = None
        for name in names:
            parts = [Stream(self.client, lane.keys.stream, name, "").lag() for lane in self._lanes]
            pending, how = backlog(parts)
            if slowest is None or pending > slowest[1]:
                slowest = (name, pending, how, any(p.group_exists for p in parts))
        assert slowest is not None  # names is never empty
        return slowest

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_Row = tuple[int, Record, str, bytes]  # source position, record, partition stream, meta bytes


def _meta_bytes(record: Record) -> bytes:
    return b"" if record.meta is None else orjson.dumps(record.meta, option=_ORJSON)


# Meta with integer keys (from a Parquet map, say) is written with string keys, as json does.
_ORJSON = orjson.OPT_NON_STR_KEYS
