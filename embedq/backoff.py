"""Backoff as a pure function (exponential, capped, with full jitter), and the retry loop
that uses it for infrastructure errors."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from embedq.errors import InfrastructureError, QueueUnavailable, SinkUnavailable

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


class Retrier:
    """Runs a call, retrying ``InfrastructureError`` with capped, jittered backoff.

    Entries in hand stay ours meanwhile: the heartbeat thread keeps resetting their idle
    time, so no reclaimer takes them (which would raise their delivery counts toward the
    dead-letter threshold). ``give_up`` is asked before each wait: a worker whose stage
    crashed stops retrying and lets the error through.
    """

    def __init__(
        self,
        on_failure: Callable[[str, InfrastructureError], None] | None = None,
        give_up: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.on_failure = on_failure
        self.give_up = give_up
        self.sleep = sleep

    def __call__(
        self, action: str, call: Callable[[], T], on_error: Callable[[str], None] | None = None
    ) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except InfrastructureError as exc:
                attempt += 1
                delay = compute_backoff(attempt)
                if self.on_failure is not None:
                    self.on_failure(action, exc)
                log.warning(
                    "infrastructure_error",
                    action=action,
                    dependency=dependency(exc),
                    error=str(exc)[:300],
                    attempt=attempt,
                    retry_in_s=round(delay, 2),
                )
                if on_error is not None:
                    on_error(f"{action}: {exc}")
                if self.give_up():
                    raise
                self.sleep(delay)


def dependency(exc: InfrastructureError) -> str:
    """Which dependency failed, by the error's type: ``redis``, ``milvus`` or ``other``."""
    if isinstance(exc, QueueUnavailable):
        return "redis"
    if isinstance(exc, SinkUnavailable):
        return "milvus"
    return "other"
