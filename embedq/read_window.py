"""How many entries to read at once, bounded by bytes as well as by count.

XREADGROUP takes a count, not a size: 512 entries of 1 MB texts would be half a gigabyte
in one read, held whole while its oversized entries wait to be dead-lettered. The window
keeps a running estimate of the entry size and reads fewer entries when ``count`` of them
would exceed ``max_bytes``; at least one entry is always read.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedq.entries import Entry

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
        mean = sum(len(k) + len(v) for e in entries for k, v in e.fields.items()) / len(entries)
        weight = 1.0 if mean > self._mean_bytes else 0.2
        self._mean_bytes += weight * (mean - self._mean_bytes)
