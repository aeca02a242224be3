"""Graceful shutdown of a worker process.

The first SIGTERM or SIGINT sets ``stop``: the worker stops reading and finishes the batches
in hand (write, then ack), and a timer gives it ``grace_s`` to do so. Signals that arrive
together count as one: a Ctrl-C in a terminal, or ``timeout -s INT``, signals the process
and its group, which delivers the same SIGINT two or more times within a millisecond
(issue 28), so a signal within ``TOGETHER_S`` of the first is that same request.

When the grace period ends first (a CPU worker's window of long texts can take longer than
30 s), the worker lets the batches in hand go cleanly: it logs its summary
(``worker_stopped``, ``released`` saying why), calls ``on_release`` (the CLI prints its
summary line) and exits 0. The entries in hand stay pending: a restarted worker with the
same consumer name reads them first, or a reclaimer takes them over after ``--min-idle``,
which is what at-least-once needs. Only a second, separate signal (an operator insisting)
exits at once with ``EXIT_FORCED``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

import structlog

log = structlog.get_logger("embedq.worker.shutdown")

EXIT_FORCED = 1  # exit status after a second, separate signal
EXIT_RELEASED = 0  # the grace period ended: the entries in hand left pending, cleanly
TOGETHER_S = 0.5  # signals this close to the first are the same request (a process group's)


class GracefulShutdown:
    def __init__(
        self,
        stop: threading.Event,
        grace_s: float,
        *,
        on_release: Callable[[], None] | None = None,
        together_s: float = TOGETHER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stop = stop
        self.grace_s = grace_s
        self.on_release = on_release
        self.together_s = together_s
        self.clock = clock
        self.signals = 0
        self.first_at: float | None = None

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only, as Python requires)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        now = self.clock()
        name = signal.Signals(signum).name
        if self.first_at is None:
            self.first_at = now
            self.signals = 1
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
        if now - self.first_at < self.together_s:
            return  # the same request, delivered again (to the process and to its group)
        self.signals += 1
        log.warning("forced_exit", signal=name, then="leaving entries pending for the reclaimer")
        exit_now()

    def _on_grace_expired(self, _signum: int, _frame: FrameType | None) -> None:
        log.warning(
            "grace_over",
            grace_s=self.grace_s,
            then="letting the batches in hand go: their entries stay pending for the reclaimer",
        )
        if self.on_release is not None:
            try:
                self.on_release()
            except Exception as exc:  # the summary is a courtesy; the exit must happen
                log.warning("release_summary_failed", error=f"{type(exc).__name__}: {exc}")
        exit_now(EXIT_RELEASED)


def exit_now(code: int = EXIT_FORCED) -> NoReturn:
    """Leave at once; the entries in hand stay pending for a reclaimer.

    Raising instead would unwind into interpreter shutdown while a stage thread may be
    inside torch, which aborts the process (std::terminate, exit -6); nothing here needs
    cleaning up, so the exit is immediate."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
