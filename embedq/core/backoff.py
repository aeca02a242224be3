"""Backoff as a pure function (exponential, capped, with full jitter), and the retry loop
that uses it for infrastructure errors."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from embedq.core.errors import InfrastructureError, QueueUnavailable, SinkUnavailable

log = structlog.get_logger("embedq.retry")

T = TypeVar("T")


def compute_backoff(
    attempt: int, *, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Full jitter (uniform in [cap/2, cap] of the exponential step) keeps a fleet of workers
    that lost Milvus at the same moment from hammering it in lockstep when it returns.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    draw: float = (rng or random).uniform(0.5, 1.0)
    return float(step * draw)


@dataclass(frozen=True)
class Waiting:
    """A call that failed and waits for its dependency (readiness and metrics show it)."""

    action: str
    dependency: str  # redis, milvus or other (``dependency``)
    since_s: float  # time.monotonic() of the call's first failure


class Retrier:
    """Runs a call, retrying ``InfrastructureError`` with capped, jittered backoff.

    Entries in hand stay ours meanwhile: the heartbeat thread keeps resetting their idle
    time, so no reclaimer takes them (which would raise their delivery counts toward the
    dead-letter threshold). ``give_up`` is asked before each wait: a worker whose stage
    crashed stops retrying and lets the error through.

    ``on_failure`` hears of each failure event once: a call that failed, however many
    attempts it then took (issue 17: one outage counted 17 "errors", one per attempt); the
    log too: one warning, the retries at debug, ``infrastructure_recovered`` when it answers.
    ``waiting()`` lists the calls backing off right now, so readiness can say "cannot make
    progress"; ``wake()`` cuts every wait short once a dependency answers again, so a worker
    does not sit out a 30 s backoff after Redis or Milvus came back.
    """

    def __init__(
        self,
        on_failure: Callable[[str, InfrastructureError], None] | None = None,
        give_up: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], object] | None = None,
        on_attempt: Callable[[], None] | None = None,
    ) -> None:
        self.on_failure = on_failure
        self.on_attempt = on_attempt  # each failed attempt (embedq.worker.watchdog: still moving)
        self.give_up = give_up
        self.sleep = sleep  # None: wait until the backoff ends or ``wake()``
        self._woken = threading.Condition()
        self._wakes = 0  # how many times ``wake()`` ran: a wait ends when it changes
        self._waiting: dict[int, Waiting] = {}
        self._lock = threading.Lock()
        self._calls = itertools.count()  # a key per call: several threads retry at once

    def __call__(
        self,
        action: str,
        call: Callable[[], T],
        on_error: Callable[[str], None] | None = None,
        give_up_on: type[InfrastructureError] | None = None,
    ) -> T:
        """``give_up_on``: an error of this type is raised after its first log line."""
        attempt, key = 0, next(self._calls)
        try:
            while True:
                try:
                    result = call()
                except InfrastructureError as exc:
                    wakes = self._wakes  # a wake from now on, even before the wait, ends it
                    attempt += 1
                    delay = self._failed(action, exc, attempt, key)
                    if on_error is not None:
                        on_error(f"{action}: {exc}")
                    if self.give_up() or (give_up_on and isinstance(exc, give_up_on)):
                        raise
                    self._pause(delay, wakes)
                    continue
                if attempt:
                    self._recovered(action, key, attempt)
                return result
        finally:
            if attempt:
                with self._lock:
                    self._waiting.pop(key, None)

    def _failed(self, action: str, exc: InfrastructureError, attempt: int, key: int) -> float:
        """Count and say an attempt's failure; the seconds to wait before the next one."""
        if self.on_attempt is not None:
            self.on_attempt()
        delay = compute_backoff(attempt)
        if attempt == 1:
            with self._lock:
                self._waiting[key] = Waiting(action, dependency(exc), time.monotonic())
            if self.on_failure is not None:
                self.on_failure(action, exc)
        # One warning per failure, not per attempt (issue 28: a worker with Milvus down
        # printed one per retry before its final line); later attempts are debug, and the
        # call's end says how it went (``infrastructure_recovered``, or the caller's error).
        (log.warning if attempt == 1 else log.debug)(
            "infrastructure_error",
            action=action,
            dependency=dependency(exc),
            error=str(exc)[:300],
            attempt=attempt,
            retry_in_s=round(delay, 2),
            why="retrying with backoff until it answers",
        )
        return delay

    def _recovered(self, action: str, key: int, failures: int) -> None:
        with self._lock:
            since = self._waiting.get(key)
        log.info(
            "infrastructure_recovered",
            action=action,
            dependency=since.dependency if since else "other",
            failed_attempts=failures,
            down_s=round(time.monotonic() - since.since_s, 2) if since else None,
        )

    def waiting(self) -> list[Waiting]:
        """The calls backing off now, oldest first."""
        with self._lock:
            return sorted(self._waiting.values(), key=lambda w: w.since_s)

    def wake(self) -> None:
        """End every backoff wait now (a dependency answers again); each call retries."""
        with self._woken:
            self._wakes += 1
            self._woken.notify_all()

    def _pause(self, delay: float, wakes: int) -> None:
        if self.sleep is not None:
            self.sleep(delay)
            return
        with self._woken:
            self._woken.wait_for(lambda: self._wakes != wakes, timeout=delay)


def dependency(exc: InfrastructureError) -> str:
    """Which dependency failed, by the error's type: ``redis``, ``milvus`` or ``other``."""
    if isinstance(exc, QueueUnavailable):
        return "redis"
    if isinstance(exc, SinkUnavailable):
        return "milvus"
    return "other"
