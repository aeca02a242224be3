"""The reclaimer: take over entries that dead or stuck workers left pending.

Each worker runs a reclaim step every ``reclaim_interval_s``; ``embedq reclaim`` runs the
same steps standalone (one pass over the pending list, or continuously). XAUTOCLAIM hands
over entries idle longer than ``min_idle_s``; one delivered more than ``max_deliveries``
times is dead-lettered instead of processed again, with the last error a worker recorded
for it. Live workers heartbeat the entries they hold, so idleness means a dead or hung
worker, never a slow batch.

The reclaimer also keeps the groups tidy (``ConsumerTidy``): consumers idle longer than
``consumer_idle_delete_s`` with nothing pending are removed (a consumer that still holds
entries never is: deleting it would make them unclaimable).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from embedq.queue.entries import Entry
from embedq.queue.stream import Stream

log = structlog.get_logger("embedq.worker.reclaimer")

DeadLetter = Callable[[Entry, str, str, int], None]
Process = Callable[[Sequence[Entry]], None]

START = "0-0"


class ConsumerTidy:
    """Remove the consumers idle past ``idle_delete_s`` with nothing pending, from every
    stream a worker reads at once. A worker joins the group of each stream it reads (its
    partitions and the online lane), so a dead one leaves its name in all of them; tidied
    stream by stream, its removal was logged once per stream and counted as that many
    consumers (issue 28). One call does them all and says so in one line."""

    def __init__(self, streams: Sequence[Stream], idle_delete_s: float) -> None:
        self.streams = list(streams)
        self.idle_delete_s = idle_delete_s
        self._last = float("-inf")  # the first call tidies
        self._lock = threading.Lock()  # ``embedq reclaim`` runs a reclaimer per thread

    def __call__(self) -> int:
        """Tidy if the last tidy is a tenth of the idle threshold old; how many consumers
        went (0 when it was not due)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.idle_delete_s / 10:
                return 0
            self._last = now
        removed: dict[str, list[str]] = {}
        for stream in self.streams:
            for name in stream.delete_idle_consumers(int(self.idle_delete_s * 1000)):
                removed.setdefault(name, []).append(stream.keys.stream)
        if removed:
            log.info(
                "consumers_removed",
                names=sorted(removed),
                streams=sorted({key for keys in removed.values() for key in keys}),
                idle_s=self.idle_delete_s,
                why="idle with nothing pending",
            )
        return len(removed)


class Reclaimer:
    def __init__(
        self,
        stream: Stream,
        *,
        min_idle_s: float,
        max_deliveries: int,
        count: int,
        dead_letter: DeadLetter,
        consumer_idle_delete_s: float = 600.0,
        tidy: ConsumerTidy | None = None,
    ) -> None:
        """``tidy``: shared by the reclaimers of one worker's streams (None: this stream's
        own, every ``consumer_idle_delete_s``)."""
        self.stream = stream
        self.min_idle_ms = int(min_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.count = count
        self.dead_letter = dead_letter
        self.tidy = tidy or ConsumerTidy([stream], consumer_idle_delete_s)
        self.cursor = START
        self.claimed_total = 0
        self.deleted_total = 0
        self.dead_lettered_total = 0
        self.consumers_removed_total = 0  # by the tidies this reclaimer's passes ran

    def step(self, held: Callable[[str], bool] = lambda _entry_id: False) -> list[Entry]:
        """One XAUTOCLAIM call from the saved cursor; the entries to process now.

        ``held``: entries this worker already has in its pipeline. After a Redis outage
        longer than min-idle its own entries look abandoned and come back here with a
        raised delivery count; they are neither processed twice nor dead-lettered."""
        step = self.stream.autoclaim(self.min_idle_ms, self.cursor, count=self.count)
        self.cursor = step.cursor
        if step.deleted_ids:
            # Redis already dropped these from the pending list; there is nothing to
            # process, only to count and say.
            self.deleted_total += len(step.deleted_ids)
            self.stream.forget_errors(step.deleted_ids)
            log.warning(
                "reclaim_found_deleted",
                count=len(step.deleted_ids),
                first_id=step.deleted_ids[0],
                why="pending entries whose payload was trimmed or deleted; "
                "Redis dropped them from the pending list",
            )
        if self.cursor == START:
            self._tidy_consumers()
        claimed = [e for e in step.entries if not held(e.entry_id)]
        if not claimed:
            return []
        self.claimed_total += len(claimed)
        keep = self.screen(claimed)
        log.info(
            "reclaimed", count=len(claimed), kept=len(keep), dead_lettered=len(claimed) - len(keep)
        )
        return keep

    def screen(self, entries: Sequence[Entry]) -> list[Entry]:
        """Dead-letter the entries delivered more than ``max_deliveries`` times (with the
        last error a worker recorded for them); the rest, to process. Used on reclaimed
        entries and on a restarted worker's own pending ones, which a crash loop under one
        consumer name re-reads again and again."""
        counts = self.stream.delivery_counts([e.entry_id for e in entries])
        over = [e for e in entries if counts.get(e.entry_id, 1) > self.max_deliveries]
        errors = self.stream.last_errors([e.entry_id for e in over])
        for entry in over:
            deliveries = counts[entry.entry_id]
            why = errors.get(entry.entry_id) or (
                f"never acked in {deliveries} deliveries: each worker holding it stopped "
                "(crash, OOM kill, preemption) or hung without a recorded error"
            )
            self.dead_letter(entry, "max_deliveries", why, deliveries)
            self.dead_lettered_total += 1
        return [e for e in entries if counts.get(e.entry_id, 1) <= self.max_deliveries]

    def _tidy_consumers(self) -> None:
        """After each full pass over the pending list (at most every tenth of the idle
        threshold, whichever reclaimer of the worker gets there first)."""
        self.consumers_removed_total += self.tidy()


@dataclass(frozen=True)
class ReclaimSummary:
    claimed: int
    dead_lettered: int
    deleted: int
    consumers_removed: int


def run_reclaim(
    reclaimer: Reclaimer,
    process: Process,
    *,
    once: bool,
    interval_s: float,
    stop: threading.Event,
) -> ReclaimSummary:
    """``embedq reclaim``: claim idle entries and process them with ``process``.

    ``once`` makes one full pass over the pending list (XAUTOCLAIM until its cursor comes
    back to 0-0) and returns; otherwise passes repeat every ``interval_s`` until ``stop``.
    """
    reclaimer.cursor = START
    while not stop.is_set():
        entries = reclaimer.step()
        if entries:
            process(entries)
        if reclaimer.cursor == START:
            if once:
                break
            stop.wait(interval_s)
    return ReclaimSummary(
        claimed=reclaimer.claimed_total,
        dead_lettered=reclaimer.dead_lettered_total,
        deleted=reclaimer.deleted_total,
        consumers_removed=reclaimer.consumers_removed_total,
    )


def run_reclaim_all(
    pairs: Sequence[tuple[Reclaimer, Process]],
    *,
    once: bool,
    interval_s: float,
    stop: threading.Event,
) -> ReclaimSummary:
    """``run_reclaim`` over every partition stream: in turn with ``once``, else one thread
    per partition until ``stop``. Returns the summed summary."""
    if once or len(pairs) == 1:
        results = [run_reclaim(r, p, once=once, interval_s=interval_s, stop=stop) for r, p in pairs]
    else:
        results = []
        threads = [
            threading.Thread(
                target=lambda r=r, p=p: results.append(
                    run_reclaim(r, p, once=False, interval_s=interval_s, stop=stop)
                ),
                name="embedq-reclaim",
                daemon=True,
            )
            for r, p in pairs
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    return ReclaimSummary(
        claimed=sum(r.claimed for r in results),
        dead_lettered=sum(r.dead_lettered for r in results),
        deleted=sum(r.deleted for r in results),
        consumers_removed=sum(r.consumers_removed for r in results),
    )
