"""Progress and time left: the one ETA rule (``eta_s``), duration format
(``format_duration``) and time format (``format_time_ms``) that ``enqueue``'s progress,
``embedq top`` and ``embedq jobs`` share, and ``Progress``, an enqueue run's bar on a
terminal or ``enqueue_progress`` log lines off one.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

import structlog

if TYPE_CHECKING:
    from embedq.producer.client import Counts

log = structlog.get_logger("embedq.core.progress")

BAR_WIDTH = 28


def eta_s(remaining: int | None, rate_per_s: float | None) -> float | None:
    """Seconds until ``remaining`` items are done at ``rate_per_s`` (their net shrink rate).

    0 when nothing remains; None (unknown) when ``remaining`` is unknown or the rate is not
    positive: a backlog that is not shrinking has no ETA, rather than a wrong one.
    """
    if remaining == 0:
        return 0.0
    if remaining is None or rate_per_s is None or rate_per_s <= 0:
        return None
    return remaining / rate_per_s


def format_duration(seconds: float | None) -> str:
    """``45s``, ``2m05s``, ``1h02m``; ``?`` for an unknown duration."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_time_ms(epoch_ms: int) -> str:
    """A Unix time in milliseconds as ``2026-06-01 12:00:05 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / 1000))


class Progress:
    """Called with the run's counts after each chunk; reports at most every ``every_s``."""

    def __init__(
        self,
        total: int | None,
        *,
        tty: bool | None = None,
        every_s: float = 5.0,
        out: TextIO | None = None,
    ) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.total = total
        # A bar redraws often; log lines are for collectors and should stay few.
        self.every_s = 0.2 if self.tty else every_s
        self._last = time.monotonic()
        self._drawn = False

    def __call__(self, counts: Counts) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        rate = counts.position / max(counts.elapsed_s, 1e-9)
        remaining = None if self.total is None else max(self.total - counts.position, 0)
        eta = eta_s(remaining, rate)
        if not self.tty:
            log.info(
                "enqueue_progress",
                read=counts.position,
                total=self.total,
                sent=counts.sent,
                unchanged=counts.unchanged,
                rejected=counts.rejected,
                records_per_s=round(rate, 1),
                eta_s=None if eta is None else round(eta, 1),
            )
            return
        if self.total:
            filled = int(BAR_WIDTH * min(counts.position / self.total, 1.0))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            where = f"[{bar}] {counts.position:,}/{self.total:,}"
        else:
            where = f"{counts.position:,} read"
        self.out.write(
            f"\r{where}  {rate:,.0f}/s  ETA {format_duration(eta)}  sent {counts.sent:,}"
            f"  unchanged {counts.unchanged:,}  rejected {counts.rejected:,} "
        )
        self.out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
