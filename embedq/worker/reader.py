"""Reading new entries: how many at once (bounded by bytes as well as by count), and one
read over several partition streams.

XREADGROUP takes a count, not a size: 512 entries of 1 MB texts would be half a gigabyte
in one read, held whole while its oversized entries wait to be dead-lettered. The window
keeps a running estimate of the entry size and reads fewer entries when ``count`` of them
would exceed ``max_bytes``; at least one entry is always read.

Nor is a count a share: a CPU worker that reads 512 long texts holds 25-40 s of work that a
worker joining a moment later cannot have (two workers on a 500-entry backlog: one took
all 500, issue 28). So the window also holds at most ``hold_s`` seconds of work at the
worker's measured rate (texts per second through the model, all replicas), less what the
worker already holds; until a rate is measured, it reads one window (a batch per replica).
A worker holding its share waits for room for a window worth batching rather than reading
the few entries each ack frees: windows of 8 packed long texts into small batches, 15-20 %
fewer texts/s (docs/benchmarks.md#worker-throughput-cpu).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence

import structlog

from embedq.queue.connection import is_cluster
from embedq.queue.entries import Entry
from embedq.queue.stream import Stream

log = structlog.get_logger("embedq.worker.reader")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
FIRST_COUNT = 32  # entries read before the worker has measured its rate
MIN_COUNT = 8  # a window below this batches too little to be worth a read
HOLD_WAIT_S = 0.01  # between looks at the work held while it is the worker's whole share
LANE_BLOCK_MS = 100  # an idle worker's wait on the lane while its groups differ (a migration)


class ReadWindow:
    def __init__(
        self,
        count: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        hold_s: float = 0.0,
        min_count: int = MIN_COUNT,
    ) -> None:
        self.max_count = count
        self.max_bytes = max_bytes
        self.hold_s = hold_s  # 0: no time bound, ``count`` entries a read
        # The smallest window worth a read while the worker holds work: a batch for each
        # model replica (a sliver of a window packs into slivers of batches).
        self.min_count = min_count
        self._mean_bytes = 0.0  # an exponential moving average of entry sizes
        self._rate = 0.0  # texts/s through the model, an exponential moving average

    def count(self, held: int = 0) -> int:
        """Entries the next read may take, while the worker holds ``held`` unsettled; 0:
        none yet, the worker holds its share (wait for its acks, then ask again)."""
        count = self.max_count
        if self._mean_bytes > 0:
            count = min(count, int(self.max_bytes // self._mean_bytes))
        if self.hold_s > 0:
            if self._rate <= 0:
                # One window until a forward pass measured the rate: reading FIRST_COUNT
                # again and again until the pipeline was full packed a whole backlog of
                # long texts into small batches.
                if held > 0:
                    return 0
                budget = max(FIRST_COUNT, self.min_count)
            else:
                total = int(self._rate * self.hold_s)
                # Room for a window of ``min_count``, or of half the hold at a slow rate
                # (so that the pipeline never runs dry waiting for it).
                window = max(MIN_COUNT, min(self.min_count, total // 2))
                budget = total - held
                if budget < window:
                    if held > 0:
                        return 0
                    budget = window
            count = min(count, budget)
        return max(1, count)

    def wait_for_room(
        self,
        held: Callable[[], int],
        stop: threading.Event,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """Until ``count`` lets a read take a window, or ``stop``; ``meanwhile`` (a read of
        the online lane) runs between looks, else a short sleep."""
        while not stop.is_set() and not self.count(held()):
            if meanwhile is not None:
                meanwhile()
            else:
                stop.wait(HOLD_WAIT_S)

    def measured(self, texts: int, seconds: float, replicas: int = 1) -> None:
        """One forward pass took ``seconds`` for ``texts``; ``replicas`` run side by side."""
        if texts <= 0 or seconds <= 0:
            return
        rate = texts / seconds * replicas
        weight = 1.0 if self._rate <= 0 else 0.3
        self._rate += weight * (rate - self._rate)

    def saw(self, entries: Sequence[Entry]) -> None:
        """Learn from a read: its entries' mean size moves the estimate (fast upwards, so
        one window of huge entries shrinks the next at once)."""
        if not entries:
            return
        # The values' bytes (field names add a few bytes an entry): every window, every entry.
        mean = sum(len(v) for e in entries for v in e.fields.values()) / len(entries)
        weight = 1.0 if mean > self._mean_bytes else 0.2
        self._mean_bytes += weight * (mean - self._mean_bytes)


def read_new_many(
    streams: Sequence[Stream], count: int, block_ms: int
) -> list[tuple[Stream, list[Entry]]]:
    """One XREADGROUP over several partition streams of one group (one BLOCK for all):
    up to ``count`` new entries per stream, each list paired with its stream. The
    interactive lane, when among them, is read first (embedq.worker.lane)."""
    streams = sorted((s for s in streams if s.readable()), key=lambda s: not s.keys.online)
    if len(streams) == 1:
        entries = streams[0].read_new(count, block_ms)
        return [(streams[0], entries)] if entries else []
    if len({s.group for s in streams}) > 1:
        return _read_by_group(streams, count, block_ms)
    if is_cluster(streams[0].client):
        return _read_each(streams, count, block_ms)
    return streams[0].read_new_together(streams[1:], count, block_ms)


def _read_by_group(
    streams: Sequence[Stream], count: int, block_ms: int
) -> list[tuple[Stream, list[Entry]]]:
    """``read_new_many`` when the streams are read as different groups (a migration's
    collection group for the tasks streams, ``--group`` for the interactive lane): one
    XREADGROUP names one group, so each group's streams are read without blocking, and when
    all were empty one short BLOCK waits on the lane (the first stream), whose requests
    must not wait a whole ``block_ms`` behind a quiet tasks stream."""
    found: list[tuple[Stream, list[Entry]]] = []
    for group in dict.fromkeys(s.group for s in streams):
        mine = [s for s in streams if s.group == group]
        found += _read_one_group(mine, count, 0)
    if found or block_ms <= 0:
        return found
    return _read_one_group(streams[:1], count, min(block_ms, LANE_BLOCK_MS))


def _read_one_group(
    streams: Sequence[Stream], count: int, block_ms: int
) -> list[tuple[Stream, list[Entry]]]:
    if len(streams) == 1:
        entries = streams[0].read_new(count, block_ms)
        return [(streams[0], entries)] if entries else []
    if is_cluster(streams[0].client):
        return _read_each(streams, count, block_ms)
    return streams[0].read_new_together(streams[1:], count, block_ms)


def _read_each(
    streams: Sequence[Stream], count: int, block_ms: int
) -> list[tuple[Stream, list[Entry]]]:
    """``read_new_many`` on a Redis Cluster, which refuses one command over keys of several
    slots (CROSSSLOT) and gives every partition a slot of its own: one read per partition
    without blocking; when all were empty, one BLOCK on a partition picked at random (each
    gets its turn), short enough that entries arriving on the others wait little."""
    found = [(stream, stream.read_new(count, 0)) for stream in streams]
    found = [(stream, entries) for stream, entries in found if entries]
    if found or block_ms <= 0:
        return found
    stream = random.choice(streams)
    entries = stream.read_new(count, max(10, block_ms // len(streams)))
    return [(stream, entries)] if entries else []


def join_collection_group(streams: Sequence[Stream], group: str) -> None:
    """Read the tasks streams as ``group``, the consumer group of the collection the worker
    writes (``Sink.group``; "" keeps ``--group``). During a migration each model's
    collection has its own group on the same streams, so every entry reaches both
    collections whichever workers run (issue 26). The interactive lane keeps ``--group``:
    its entries are answered once, by any worker, never written to a collection."""
    if not group:
        return
    for stream in streams:
        if not stream.keys.online and stream.group != group:
            log.info("collection_group", stream=stream.keys.stream, group=group, was=stream.group)
            stream.use_group(group)
