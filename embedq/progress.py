"""Progress of an enqueue run: a bar on a terminal, ``enqueue_progress`` log lines off one."""

from __future__ import annotations

import sys
import time
from typing import TextIO

import structlog

from embedq.producer import Counts

log = structlog.get_logger("embedq.progress")

BAR_WIDTH = 28


def _eta_s(done: int, total: int | None, rate: float) -> float | None:
    if total is None or rate <= 0:
        return None
    return max(total - done, 0) / rate


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


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
        eta = _eta_s(counts.position, self.total, rate)
        if not self.tty:
            log.info(
                "enqueue_progress",
                read=counts.position,
                total=self.total,
                sent=counts.sent,
                skipped=counts.skipped,
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
            f"  skipped {counts.skipped:,}  rejected {counts.rejected:,} "
        )
        self.out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
