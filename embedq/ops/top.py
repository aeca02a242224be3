"""``embedq top``: throughput and time-to-drain from successive ``Stream.lag()`` samples.

The arithmetic is a pure function over samples (``rates``); the command only samples,
renders and sleeps. Completed entries are counted from the group's own counters:
``entries_read - pending`` grows by one for every entry acked (written or dead-lettered),
so the rate needs no cooperation from the workers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from embedq.core.progress import eta_s, format_duration
from embedq.queue.lag import LagInfo, consumer_table, describe


@dataclass(frozen=True)
class Sample:
    at_s: float  # time.monotonic() when taken
    info: LagInfo

    @property
    def completed(self) -> int | None:
        """Entries the group has acked so far (None when Redis does not count reads).

        None of them before the group exists: counting from 0 then lets a ``top`` started
        before the first worker show throughput at its second sample, not a minute later
        when the group-less samples have left the window (issue 18)."""
        if self.info.entries_read is None:
            if not self.info.group_exists:
                return 0
            # Redis does not count reads here (a partition merged in without one, a group
            # set to an arbitrary id): what left the stream's backlog is the same count, as
            # long as no trim runs between two samples (issue 12: throughput "unknown"
            # next to a backlog visibly falling).
            backlog = self.backlog
            return None if backlog is None else self.info.length - backlog
        return self.info.entries_read - self.info.pending

    @property
    def backlog(self) -> int | None:
        """Entries still to process: undelivered plus pending (None when lag is unknown)."""
        if not self.info.group_exists:
            return self.info.length  # a group created at 0 will have to read all of it
        if self.info.lag is None:
            return None
        return self.info.lag + self.info.pending


@dataclass(frozen=True)
class Rates:
    """How fast the group drains, over a window of samples, and the time left."""

    window_s: float  # time spanned by the samples used (0 with fewer than two)
    done_per_s: float | None  # entries acked per second over the window
    backlog: int | None
    backlog_change_per_s: float | None  # negative while draining
    eta_s: float | None  # None: unknown, or the backlog is not shrinking

    def as_dict(self) -> dict[str, Any]:
        return {
            "window_s": round(self.window_s, 3),
            "done_per_s": None if self.done_per_s is None else round(self.done_per_s, 2),
            "backlog": self.backlog,
            "backlog_change_per_s": (
                None if self.backlog_change_per_s is None else round(self.backlog_change_per_s, 2)
            ),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }


def rates(samples: Sequence[Sample], window_s: float = 60.0) -> Rates:
    """Rates over the samples of the last ``window_s`` seconds, and the ETA to drain.

    The ETA divides the backlog by its net shrink rate (consumption minus new arrivals), so
    a fleet that keeps up with producers but never catches up shows no ETA rather than a
    wrong one. A group recreated mid-window (its counters went backwards) restarts the window.
    """
    if not samples:
        return Rates(0.0, None, None, None, None)
    recent = _since_last_reset([s for s in samples if samples[-1].at_s - s.at_s <= window_s])
    first, last = recent[0], recent[-1]
    span = last.at_s - first.at_s
    backlog = last.backlog
    if span <= 0:
        return Rates(0.0, None, backlog, None, eta_s(backlog, None))
    done_per_s = None
    if first.completed is not None and last.completed is not None:
        done_per_s = (last.completed - first.completed) / span
    change = None
    if first.backlog is not None and backlog is not None:
        change = (backlog - first.backlog) / span
    shrink_per_s = None if change is None else -change
    return Rates(span, done_per_s, backlog, change, eta_s(backlog, shrink_per_s))


def _since_last_reset(samples: list[Sample]) -> list[Sample]:
    """The samples after the last counter reset: a recreated group restarts entries_read at 0."""
    start = 0
    for i in range(1, len(samples)):
        before, after = samples[i - 1].info.entries_read, samples[i].info.entries_read
        if before is not None and after is not None and after < before:
            start = i
    return samples[start:]


class Window:
    """The samples of the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque()

    def add(self, info: LagInfo, at_s: float | None = None) -> Rates:
        now = time.monotonic() if at_s is None else at_s
        self.samples.append(Sample(now, info))
        while self.samples and now - self.samples[0].at_s > self.window_s:
            self.samples.popleft()
        return rates(list(self.samples), self.window_s)


def render(info: LagInfo, r: Rates) -> str:
    """The screen for one sample, as plain text."""
    lines = describe(info)
    if r.window_s <= 0:
        lines.append("throughput   (measuring: needs a second sample)")
    else:
        rate = "unknown" if r.done_per_s is None else f"{r.done_per_s:.1f}/s"
        lines.append(f"throughput   {rate} over the last {r.window_s:.0f}s")
        if r.backlog_change_per_s is not None:
            lines.append(f"backlog      {r.backlog} ({r.backlog_change_per_s:+.1f}/s)")
    if r.eta_s is not None:
        lines.append(f"eta          {format_duration(r.eta_s)} to drain")
    elif r.window_s > 0:
        lines.append("eta          unknown (the backlog is not shrinking)")
    return "\n".join(lines + consumer_table(info))
