"""The backlog of a consumer group, as ``embedq lag``, ``top`` and the stream gauges show
it: one stream's ``LagInfo`` (read by ``Stream.lag``), partition streams merged into one
(``merge_partitions``), the ``lag --json`` object (``lag_json``) and the text both
commands print (``describe``, ``consumer_table``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embedq.core.keys import partition_streams

if TYPE_CHECKING:
    import redis

    from embedq.sink.epoch import Standing

# How many partition streams ``partitions_found`` looks for, in one round trip.
_PARTITIONS_PROBED = 256


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
    # Redis's memory (INFO memory) where the stream lives: used and maxmemory (0: no limit).
    used_memory: int = 0
    maxmemory: int = 0

    @property
    def redis_full(self) -> bool:
        """At ``maxmemory`` (with ``noeviction``, producers' writes are refused)."""
        return 0 < self.maxmemory <= self.used_memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "redis_memory": {
                "used_bytes": self.used_memory,
                "max_bytes": self.maxmemory,
                "full": self.redis_full,
            },
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


def merge_partitions(base: str, group: str, parts: Sequence[LagInfo]) -> LagInfo:
    """The lag of partition streams as one ``LagInfo``: counts summed, ``lag`` None when any
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
    # A partition whose group is not there yet has read nothing: it does not make the sum
    # unknown (``top`` counts throughput from it).
    reads = [p.entries_read for p in parts if p.group_exists]
    return LagInfo(
        stream=base,
        group=group,
        length=sum(p.length for p in parts),
        lag=None if None in lags else sum(lag or 0 for lag in lags),
        pending=sum(p.pending for p in parts),
        used_memory=max(p.used_memory for p in parts),  # the fullest node
        maxmemory=max(p.maxmemory for p in parts),
        last_delivered_id=None,  # one per partition
        entries_read=None if not reads or None in reads else sum(r or 0 for r in reads),
        consumers=sorted(consumers.values(), key=lambda c: c.name),
        dlq_length=sum(p.dlq_length for p in parts),
        group_exists=all(p.group_exists for p in parts),
    )


def lag_json(base: str, group: str, parts: Sequence[LagInfo]) -> dict[str, Any]:
    """The ``embedq lag --json`` object over partition streams: the same keys as one
    stream's, summed by ``merge_partitions``, plus each partition under ``partitions``."""
    info = merge_partitions(base, group, parts).as_dict()
    if len(parts) > 1:
        info["partitions"] = [p.as_dict() for p in parts]
    return info


def describe(info: LagInfo) -> list[str]:
    """The stream, group, lag, pending and dead-letter lines of ``lag`` and ``top``."""
    lines = [f"stream       {info.stream}  (length {info.length})"]
    if not info.group_exists:
        lines.append(f"group        {info.group}  (does not exist yet: no worker has started)")
    else:
        lag = "unknown (Redis cannot compute it)" if info.lag is None else str(info.lag)
        lines += [
            f"group        {info.group}",
            f"lag          {lag}",
            f"pending      {info.pending}",
        ]
    lines.append(f"dead-letter  {info.dlq_length}")
    if info.redis_full:
        lines.append(
            f"redis        FULL: {info.used_memory:,} bytes used of maxmemory "
            f"{info.maxmemory:,}; producers are refused, workers go on (free memory: "
            "embedq trim, a larger maxmemory)"
        )
    return lines


def group_names(client: redis.Redis, streams: Sequence[str]) -> list[str]:
    """Every consumer group on ``streams``, in order of first appearance: the deployment's
    and, during a migration, the new collection's (``embedq.core.keys.collection_group``)."""
    import redis

    from embedq.queue.connection import translated

    found: dict[str, None] = {}
    for stream in streams:
        with translated("XINFO GROUPS"):
            try:
                groups: Any = client.xinfo_groups(stream)
            except redis.ResponseError as exc:  # no such stream yet: no group either
                if "no such key" not in str(exc).lower():
                    raise
                groups = []
        for g in groups:
            name = g["name"]
            found[name.decode() if isinstance(name, bytes) else str(name)] = None
    return list(found)


def _table(columns: dict[str, str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A header line and one line per row, each cell formatted by its column's spec (``<48``,
    ``>9``). Widths are fixed, not fitted to the cells: ``top`` redraws its consumer table
    every sample, and its columns must not move from one screen to the next."""
    specs = list(columns.values())

    def line(cells: Sequence[object]) -> str:
        return " ".join(f"{cell:{spec}}" for cell, spec in zip(cells, specs, strict=True))

    return [line(list(columns)), *(line(row) for row in rows)]


def _lag_cell(lag: int | None) -> str:
    return "unknown" if lag is None else str(lag)


def group_table(infos: Sequence[LagInfo]) -> list[str]:
    """One line per consumer group (lag, pending, consumers) when there are several, as
    during a migration: each physical collection's group has its own backlog."""
    if len(infos) <= 1:
        return []
    return _table(
        {"group": "<48", "lag": ">9", "pending": ">8", "consumers": ">9"},
        [(g.group, _lag_cell(g.lag), g.pending, len(g.consumers)) for g in infos],
    )


def consumer_table(info: LagInfo) -> list[str]:
    """One line per consumer (pending entries, idle time) under a header; none without any."""
    if not info.consumers:
        return []
    return _table(
        {"consumer": "<32", "pending": ">8", "idle": ">10"},
        [(c.name, c.pending, f"{c.idle_ms / 1000:.1f}s") for c in info.consumers],
    )


def partition_table(parts: Sequence[LagInfo]) -> list[str]:
    """One line per partition stream (length, lag, pending, dead letters); none for one."""
    if len(parts) <= 1:
        return []
    return _table(
        {"partition": "<40", "length": ">9", "lag": ">9", "pending": ">8", "dlq": ">6"},
        [(p.stream, p.length, _lag_cell(p.lag), p.pending, p.dlq_length) for p in parts],
    )


def partitions_found(client: redis.Redis, base: str) -> int:
    """How many partition streams ``base:{p<i>}`` exist (the highest index + 1; 0: none).

    ``lag`` and ``top`` ask when ``base`` itself does not exist: a deployment's partitions
    were probably left out of the command (no ``--partitions`` / ``EMBEDQ_PARTITIONS``),
    and "length 0" would read as an empty queue (issue 18).
    """
    from embedq.queue.connection import translated

    if "{" in base:
        return 0  # a stream with a hash tag has no partition streams (embedq.core.keys)
    with translated("EXISTS partitions"):
        pipe = client.pipeline(transaction=False)
        for key in partition_streams(base, _PARTITIONS_PROBED):
            pipe.exists(key)
        found = pipe.execute()
    return max((i + 1 for i, n in enumerate(found) if n), default=0)


def partitions_hint(base: str, found: int) -> str:
    """The line ``lag`` and ``top`` print when ``partitions_found`` saw some."""
    return (
        f"note         no stream {base}, but partition streams {base}:{{p0}}.."
        f"{{p{found - 1}}} exist: add --partitions {found} (or EMBEDQ_PARTITIONS={found})"
    )


def backlog(parts: Iterable[LagInfo]) -> tuple[int, str]:
    """Entries the group has yet to finish, summed over partitions, and how it was measured:
    the group's lag where Redis knows it, else the stream length (an upper bound on
    pending + undelivered; exact once ``embedq trim`` runs)."""
    total, how = 0, "lag"
    for info in parts:
        if info.group_exists and info.lag is not None:
            total += info.lag
        else:
            total += info.length
            how = "length"
    return total, how


def loss_fields(standing: Standing | None) -> dict[str, Any]:
    """``lag --json``'s word on the deployment's epoch (``embedq.sink.epoch``):
    ``redis_data_lost`` is true when the collection records an epoch Redis does not hold
    (with the line in ``redis_data_lost_message``), null when the collection could not be
    read (no such collection, Milvus down, a Milvus Lite file a worker holds)."""
    if standing is None:
        return {"redis_data_lost": None, "redis_data_lost_message": None}
    return standing.as_dict()


def loss_lines(standing: Standing | None) -> list[str]:
    """The one line ``lag`` and ``top`` print when Redis lost its data; none otherwise."""
    return [f"LOST         {standing.line()}"] if standing is not None and standing.lost else []
