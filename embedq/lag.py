"""The backlog of a consumer group, as ``embedq lag``, ``top`` and the stream gauges show
it: one stream's ``LagInfo`` (read by ``Stream.lag``), and partition streams summed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True)
class LagInfo:
    """What ``embedq lag`` reports. ``lag`` is None when Redis cannot compute it."""

    stream: str
    group: str
    length: int
    lag: int | None
    pending: int
    last_delivered_id: str | None
    entries_read: int | None
    consumers: list[ConsumerInfo]
    dlq_length: int
    group_exists: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "group": self.group,
            "group_exists": self.group_exists,
            "length": self.length,
            "lag": self.lag,
            "pending": self.pending,
            "last_delivered_id": self.last_delivered_id,
            "entries_read": self.entries_read,
            "dlq_length": self.dlq_length,
            "consumers": [
                {"name": c.name, "pending": c.pending, "idle_ms": c.idle_ms} for c in self.consumers
            ],
        }


def combine_lag(base: str, group: str, parts: Sequence[LagInfo]) -> LagInfo:
    """The lag of partition streams as one: counts summed, ``lag`` None when any
    partition's is unknown, each consumer's pending summed and its idle time the least."""
    if len(parts) == 1:
        return parts[0]
    consumers: dict[str, ConsumerInfo] = {}
    for part in parts:
        for c in part.consumers:
            seen = consumers.get(c.name)
            consumers[c.name] = (
                c
                if seen is None
                else ConsumerInfo(c.name, seen.pending + c.pending, min(seen.idle_ms, c.idle_ms))
            )
    lags = [p.lag for p in parts]
    reads = [p.entries_read for p in parts]
    return LagInfo(
        stream=base,
        group=group,
        length=sum(p.length for p in parts),
        lag=None if None in lags else sum(lag or 0 for lag in lags),
        pending=sum(p.pending for p in parts),
        last_delivered_id=None,  # one per partition
        entries_read=None if None in reads else sum(r or 0 for r in reads),
        consumers=sorted(consumers.values(), key=lambda c: c.name),
        dlq_length=sum(p.dlq_length for p in parts),
        group_exists=all(p.group_exists for p in parts),
    )


def combined_lag(base: str, group: str, parts: Sequence[LagInfo]) -> dict[str, Any]:
    """``embedq lag --json`` over partition streams: the same keys as one stream's, summed
    by ``combine_lag``, plus each partition under ``partitions``."""
    info = combine_lag(base, group, parts).as_dict()
    if len(parts) > 1:
        info["partitions"] = [p.as_dict() for p in parts]
    return info
