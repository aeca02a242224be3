"""The writer's view of encoded batches: back in read order, consecutive ones together.

Model replicas finish batches out of order; writes must follow read order (``Batch.seq``).
``Reorder`` holds what arrived early and hands out the consecutive run that is ready,
up to a row budget, which the writer merges into one write (``embedq.worker.pipeline.merged``).
"""

from __future__ import annotations

import heapq
import itertools
import queue
from typing import TypeVar

from embedq.worker.pipeline import Batch, Stage

T = TypeVar("T")


class Reorder:
    def __init__(self) -> None:
        self._waiting: list[tuple[int, int, Batch]] = []
        self._next_seq = 0
        self._tie = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def take(self, item: Stage) -> int:
        """Hold a batch until its turn; returns 1 for an end marker (a stage stopped)."""
        if not isinstance(item, Batch):
            return 1
        heapq.heappush(self._waiting, (item.seq, next(self._tie), item))
        return 0

    def ready(self, max_rows: int) -> list[Batch]:
        """The batches next in read order that have arrived, up to ``max_rows`` rows (at
        least one batch when the next one is here)."""
        out: list[Batch] = []
        rows = 0
        while self._waiting and self._waiting[0][0] == self._next_seq and rows < max_rows:
            batch = heapq.heappop(self._waiting)[2]
            out.append(batch)
            rows += len(batch.items) + len(batch.deletes)
            self._next_seq += 1
        return out

    def pop_any(self) -> Batch:
        """The earliest batch held, past a gap (only a crashed stage leaves one)."""
        return heapq.heappop(self._waiting)[2]


def drain_now(inbox: queue.Queue[T]) -> list[T]:
    """What ``inbox`` holds right now, without waiting."""
    found: list[T] = []
    while True:
        try:
            found.append(inbox.get_nowait())
        except queue.Empty:
            return found
