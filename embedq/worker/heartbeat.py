"""Entries in hand and the heartbeat that keeps them ours.

Every entry a worker has read and not yet acked or dead-lettered is *in flight*. A
heartbeat thread resets their idle time every ``interval_s`` (an ownership-checked
XCLAIM JUSTID in Lua), so a reclaimer only takes entries whose worker is really gone, however
long a batch or a Milvus outage lasts: the reclaim threshold does not depend on batch time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import structlog

from embedq.core.errors import InfrastructureError
from embedq.queue.stream import Stream
from embedq.worker.watchdog import Watchdog

log = structlog.get_logger("embedq.worker.heartbeat")

_CHUNK = 500  # ids per script call: keeps each Lua run short on a busy Redis


InFlightId = tuple[str, str]  # (stream key, entry id): entry ids repeat across partitions


class InFlight:
    """A thread-safe set of (stream, entry id) read but not yet settled."""

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._ids: dict[InFlightId, None] = {}
        self._lock = threading.Lock()
        self._on_change = on_change

    def add(self, ids: Iterable[InFlightId]) -> None:
        with self._lock:
            self._ids.update(dict.fromkeys(ids))
            size = len(self._ids)
        if self._on_change:
            self._on_change(size)

    def discard(self, ids: Iterable[InFlightId]) -> None:
        with self._lock:
            for i in ids:
                self._ids.pop(i, None)
            size = len(self._ids)
        if self._on_change:
            self._on_change(size)

    def snapshot(self) -> dict[str, list[str]]:
        """Entry ids in flight, by stream."""
        by_stream: dict[str, list[str]] = {}
        with self._lock:
            for stream, entry_id in self._ids:
                by_stream.setdefault(stream, []).append(entry_id)
        return by_stream

    def __contains__(self, entry_id: object) -> bool:
        with self._lock:
            return entry_id in self._ids

    def holds(self, stream: str, entry_id: str) -> bool:
        return (stream, entry_id) in self

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


class Heartbeat:
    """Background thread: heartbeat every in-flight entry every ``interval_s``."""

    def __init__(
        self,
        streams: Sequence[Stream],
        in_flight: InFlight,
        interval_s: float,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.streams = {s.keys.stream: s for s in streams}
        self.in_flight = in_flight
        self.interval_s = interval_s
        self.watchdog = watchdog or Watchdog(float("inf"))
        self._said_stuck = False
        # More to do at each beat (and once at start): the lane's "who serves" record.
        self.also: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _also(self) -> None:
        for task in self.also:
            try:
                task()
            except Exception as exc:  # a record others read: the beat itself goes on
                log.warning("heartbeat_task_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> int:
        """One heartbeat over everything in flight; returns how many ids were lost. None
        while a stage is stuck: its entries must become reclaimable."""
        stuck = self.watchdog.stuck()
        if stuck:
            if not self._said_stuck:
                log.error(
                    "stage_stuck",
                    stages={s: round(t, 1) for s, t in stuck.items()},
                    limit_s=self.watchdog.limit_s,
                    then="stopped heartbeating its entries: another worker reclaims them "
                    "after min-idle; /healthz fails so the pod is restarted",
                )
                self._said_stuck = True
            return 0
        self._said_stuck = False
        lost = 0
        for key, ids in self.in_flight.snapshot().items():
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                owned = set(self.streams[key].heartbeat(chunk))
                # Settled meanwhile (the writer discards before it acks) is not lost.
                gone = [(key, i) for i in chunk if i not in owned and (key, i) in self.in_flight]
                if gone:
                    # No longer ours to keep alive; the writer may still settle them (harmless).
                    self.in_flight.discard(gone)
                    lost += len(gone)
        if lost:
            # Another worker reclaimed them (we looked dead for longer than min-idle). The
            # write stays correct: upserts are idempotent and acking a foreign entry is a no-op
            # for correctness, but it is worth knowing that min-idle is too tight.
            log.warning(
                "ownership_lost",
                count=lost,
                why="another consumer reclaimed entries this worker still holds",
            )
        return lost

    def _run(self) -> None:
        self._also()
        while not self._stop.wait(self.interval_s):
            self._also()
            try:
                self.beat()
            except InfrastructureError as exc:
                # Redis is down: nothing to do but try again; min-idle is the margin.
                log.warning("heartbeat_failed", error=str(exc)[:200])
            except Exception as exc:  # never let the heartbeat die quietly
                log.error("heartbeat_crashed", error=f"{type(exc).__name__}: {exc}"[:300])
