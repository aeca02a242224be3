"""What flows between the worker's stages: items, batches, the end marker, and counts.

An ``Item`` is one decoded entry on its way through the pipeline (with the partition
stream it came from, and older entries for the same id that it supersedes). A ``Batch`` is
the items that go through the model together; ``seq`` keeps writes in read order. The
stage queues carry ``Batch | End``: ``END`` tells the next stage that nothing follows.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from embedq.core.errors import EmbedqError
from embedq.core.records import Record
from embedq.queue.entries import Entry, entry_order
from embedq.queue.stream import Stream


@dataclass
class Item:
    """One decoded entry, with the stream it came from."""

    stream: Stream
    entry: Entry
    record: Record
    content_hash: str = ""  # text + meta as sent (embedq.core.records.content_hash)
    text_hash: str = ""  # the text alone: the vector cache's key
    ids: list[int] = field(default_factory=list)  # token ids, once tokenized
    vector: npt.NDArray[np.float32] | None = None  # once encoded
    sparse: dict[int, float] | None = None  # once encoded, by a sparse model (embedq.model.sparse)
    superseded: list[Entry] = field(default_factory=list)  # older entries for the same id

    @property
    def version(self) -> str:
        """What the row must be the effect of: this entry's id (embedq.queue.versions)."""
        return self.entry.entry_id

    @property
    def entries(self) -> list[Entry]:
        return [*self.superseded, self.entry] if self.superseded else [self.entry]


@dataclass
class Batch:
    """Items that go through the model together, and deletes that travel with them;
    ``seq`` keeps writes in read order."""

    seq: int
    items: list[Item]
    deletes: list[Item] = field(default_factory=list)  # op=delete: no model, no vector
    vectors: npt.NDArray[np.float32] | None = None  # one per item, once encoded
    sparse: list[dict[int, float]] | None = None  # one per item, from a sparse model
    tokens: int = 0
    padded_tokens: int = 0
    encode_s: float = 0.0
    created_at: float = field(default_factory=time.perf_counter)  # for latency to the ack
    parts: int = 1  # model batches merged into this one for writing (``merged``)

    def attach_vectors(self) -> None:
        """Each item holds its own vector (rows of ``vectors``), so items can regroup."""
        if self.items and self.vectors is not None:
            for item, vector in zip(self.items, self.vectors, strict=True):
                item.vector = vector
            self.vectors = None
        if self.items and self.sparse is not None:
            for item, sparse in zip(self.items, self.sparse, strict=True):
                item.sparse = sparse
            self.sparse = None

    @property
    def online(self) -> bool:
        """Items of the interactive lane: answered on reply keys, never written (a window
        is batched per stream, so a batch is all lane or all bulk; embedq.worker.lane)."""
        return bool(self.items) and self.items[0].stream.keys.online


def merged(batches: Sequence[Batch]) -> Batch:
    """Consecutive batches as one write: one fence, one upsert, one settle for all of them
    (the writer's per-call costs are per write, not per model batch). An id in more than
    one of them keeps its newest version; the older entries ride along as superseded."""
    if len(batches) == 1:
        return batches[0]
    for batch in batches:
        batch.attach_vectors()
    everything = [i for b in batches for i in (*b.deletes, *b.items)]
    if len({i.record.id for i in everything}) == len(everything):
        latest = everything  # no id in two of them (the usual case): nothing to supersede
    else:
        latest = supersede(sorted(everything, key=lambda i: entry_order(i.entry.entry_id)))
    return Batch(
        seq=batches[0].seq,
        items=[i for i in latest if not i.record.is_delete],
        deletes=[i for i in latest if i.record.is_delete],
        tokens=sum(b.tokens for b in batches),
        padded_tokens=sum(b.padded_tokens for b in batches),
        encode_s=sum(b.encode_s for b in batches),
        created_at=min(b.created_at for b in batches),
        parts=sum(b.parts for b in batches),
    )


def supersede(items: list[Item]) -> list[Item]:
    """The last item per id of ``items`` (in stream order); the earlier ones ride along as
    superseded and are acked with it, so an old text never overwrites a newer one out of
    order."""
    latest: dict[str, Item] = {}
    for item in items:
        previous = latest.pop(item.record.id, None)
        if previous is not None:
            item.superseded = [*previous.superseded, previous.entry, *item.superseded]
        latest[item.record.id] = item
    return list(latest.values())


R = TypeVar("R")
E = TypeVar("E", bound=EmbedqError)


def isolate(
    items: list[Item],
    attempt: Callable[[list[Item]], R],
    failure: type[E],
    on_split: Callable[[int, E], None] | None = None,
) -> Iterator[tuple[list[Item], R | E]]:
    """Run ``attempt`` on ``items``; when it raises ``failure``, split the items in halves
    and try each, until the failing ones are alone. Yields each group that went through
    with its result, and each lone culprit (a list of one) with its error, in order."""
    try:
        yield items, attempt(items)
        return
    except failure as exc:
        if len(items) == 1:
            yield items, exc
            return
        if on_split is not None:
            on_split(len(items), exc)
    half = len(items) // 2
    yield from isolate(items[:half], attempt, failure, on_split)
    yield from isolate(items[half:], attempt, failure, on_split)


class End:
    """The end-of-stream marker a stage puts on its output queue when it stops."""

    def __repr__(self) -> str:
        return "END"


END: Final = End()

Stage = Batch | End


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Stats:
    """What a worker did, for its exit line and its ``worker_stopped`` log."""

    texts: int = 0
    tokens: int = 0
    batches: int = 0
    dead_lettered: int = 0
    truncated: int = 0
    reclaimed: int = 0
    deleted: int = 0
    stale: int = 0  # entries acked without a write: a newer version was already written
    started_at: float = field(default_factory=time.monotonic)
    # From the first entry read to the last one settled: the rate a worker reports leaves
    # out the time it waited for work (issue 18: an exit line that counted idle time).
    first_read_at: float | None = None
    last_settled_at: float | None = None
    # CPU seconds by stage (read, decode, tokenize, forward, pool, build_rows, upsert, ack,
    # ...), each thread's own time: what feeding a fast device costs per text (issue 13).
    cpu_s: dict[str, float] = field(default_factory=dict)
    process_cpu_at_start: float = field(default_factory=_process_cpu_s)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def restart(self) -> None:
        """Zero the counters and the clock (a worker's run starts here)."""
        with self._lock:
            for name in COUNTERS:
                setattr(self, name, 0)
            self.started_at = time.monotonic()
            self.first_read_at = self.last_settled_at = None
            self.cpu_s = {}
            self.process_cpu_at_start = _process_cpu_s()

    @contextmanager
    def cpu(self, stage: str) -> Iterator[None]:
        """Charge this thread's CPU time inside the block to ``stage``."""
        started = time.thread_time()
        try:
            yield
        finally:
            self.charge(stage, time.thread_time() - started)

    def charge(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.cpu_s[stage] = self.cpu_s.get(stage, 0.0) + seconds

    def read_some(self) -> None:
        """Entries arrived (the working time starts at the first)."""
        if self.first_read_at is None:
            with self._lock:
                self.first_read_at = self.first_read_at or time.monotonic()

    def add(self, **counts: int) -> None:
        """Add to counters from any stage thread."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            if any(counts.get(n) for n in ("texts", "dead_lettered", "deleted", "stale")):
                self.last_settled_at = time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started_at, 1e-9)
        working = 0.0
        if self.first_read_at is not None and self.last_settled_at is not None:
            working = max(self.last_settled_at - self.first_read_at, 0.0)
        return {
            **{name: getattr(self, name) for name in COUNTERS},
            "elapsed_s": round(elapsed, 3),
            "working_s": round(working, 3),
            "texts_per_s": round(self.texts / working, 1) if working > 0 else 0.0,
            # Every thread's CPU since the run started (model loading left out), peak RSS.
            "process_cpu_s": round(_process_cpu_s() - self.process_cpu_at_start, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "cpu_us_per_text": {
                stage: round(seconds / self.texts * 1e6, 1)
                for stage, seconds in sorted(self.cpu_s.items())
            }
            if self.texts
            else {},
        }


COUNTERS = (
    "texts",
    "tokens",
    "batches",
    "dead_lettered",
    "truncated",
    "reclaimed",
    "deleted",
    "stale",
)
