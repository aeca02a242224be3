"""Reading new entries: how many at once (bounded by bytes as well as by count), and one
read over several partition streams.

XREADGROUP takes a count, not a size: 512 entries of 1 MB texts would be half a gigabyte
in one read, held whole while its oversized entries wait to be dead-lettered. The window
keeps a running estimate of the entry size and reads fewer entries when ``count`` of them
would exceed ``max_bytes``; at least one entry is always read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from embedq.queue.connection import is_cluster
from embedq.queue.entries import Entry
from embedq.queue.stream import Stream

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ReadWindow:
    def __init__(self, count: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_count = count
        self.max_bytes = max_bytes
        self._mean_bytes = 0.0  # an exponential moving average of entry sizes

    def count(self) -> int:
        """Entries the next read may take."""
        if self._mean_bytes <= 0:
            return self.max_count
        return max(1, min(self.max_count, int(self.max_bytes // self._mean_bytes)))

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
