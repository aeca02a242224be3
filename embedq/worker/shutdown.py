"""Graceful shutdown of a worker process.

The first SIGTERM or SIGINT sets ``stop``: the worker stops reading and finishes the batches
in hand (write, then ack), and a timer gives it ``grace_s`` to do so. A second signal, or
the end of the grace period, exits the process at once with ``EXIT_FORCED``: the entries in
hand stay pending for a reclaimer, which is what at-least-once needs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

import structlog

log = structlog.get_logger("embedq.worker.shutdown")

EXIT_FORCED = 1  # exit status after a second signal or the end of the grace period


class GracefulShutdown:
    def __init__(self, stop: threading.Event, grace_s: float) -> None:
        self.stop = stop
        self.grace_s = grace_s
        self.signals = 0

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only, as Python requires)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info(
                "stop_requested",
                signal=name,
                then="finishing the batches in hand",
                grace_s=self.grace_s,
            )
            self.stop.set()
            signal.signal(signal.SIGALRM, self._on_grace_expired)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            return
        log.warning("forced_exit", signal=name, then="leaving entries pending for the reclaimer")
        exit_now()

    def _on_grace_expired(self, _signum: int, _frame: FrameType | None) -> None:
        log.warning(
            "forced_exit",
            reason="grace period over",
            then="leaving entries pending for the reclaimer",
        )
        exit_now()


def exit_now() -> NoReturn:
    """Leave at once; the entries in hand stay pending for a reclaimer.

    Raising instead would unwind into interpreter shutdown while a stage thread may be
    inside torch, which aborts the process (std::terminate, exit -6); nothing here needs
    cleaning up, so the exit is immediate."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FORCED)
