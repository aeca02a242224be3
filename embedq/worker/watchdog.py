"""Stages that make progress, and the bound past which one is stuck.

A forward pass that never returns (a hung CUDA kernel, a deadlock in a library) or a call
that ignores its timeout would otherwise hold its entries forever: the heartbeat keeps
refreshing them, readiness stays true, no one reclaims them and Kubernetes restarts
nothing. Each stage marks a unit of work (``working``); each retry attempt counts as
movement (``touch``). A stage busy on one unit for longer than ``limit_s`` is stuck: the
heartbeat stops refreshing the worker's entries (so another worker reclaims them after
``min_idle_s``) and the liveness probe fails (so the pod is restarted).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Watchdog:
    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._busy: dict[str, float] = {}  # stage (its thread's name) -> since when
        self._lock = threading.Lock()

    @contextmanager
    def working(self) -> Iterator[None]:
        """The calling stage is busy on one unit of work until the block ends."""
        stage = threading.current_thread().name
        with self._lock:
            self._busy[stage] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._busy.pop(stage, None)

    def touch(self) -> None:
        """The calling stage moved (a retry attempt): its clock starts again."""
        stage = threading.current_thread().name
        with self._lock:
            if stage in self._busy:
                self._busy[stage] = time.monotonic()

    def stuck(self) -> dict[str, float]:
        """Stages busy on one unit longer than the limit, with how long (seconds)."""
        now = time.monotonic()
        with self._lock:
            return {s: now - t for s, t in self._busy.items() if now - t > self.limit_s}
