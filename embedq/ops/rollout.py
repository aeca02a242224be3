"""The Redis side of a migration: one consumer group per physical collection, and the record.

A migration toward collection ``C`` (``embedq.ops.migrate``) gives ``C`` its own consumer
group ``G:C`` on every tasks stream (``embedq.core.keys.collection_group``), created at the
stream's tail when the migration starts: its **start position** ``T`` on each (partition)
stream. From then on every entry producers send is delivered to both groups, the live
collection's and ``C``'s, read by workers of each collection's model; neither collection
misses a write whichever workers run, before or after the alias moves, so a rollback loses
nothing either (issue 26). Trimming keeps what any group has not finished
(``trim.lua``), so the stream holds every entry one of them still needs.

What ``C``'s group does not see, the entries up to ``T``, reach ``C`` through the backfill:
once the live collection's group has finished every entry up to ``T`` (``wait_drained``),
the live collection holds the effect of each of them, and the backfill copies it under
``C``'s per-id version fence, where a stream write newer than the copied row wins.

The record (``Keys.migration``, a hash) keeps the alias, the source collection and its
group, ``C``'s group, the start positions, the phase and the rows copied; with the groups'
lag and the evaluation recorded on ``C`` (``embedq.ops.evaluate``) it is what ``migrate
--status`` prints (``status_lines``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from embedq.core.errors import ConfigError
from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.entries import text
from embedq.queue.lag import LagInfo, merge_partitions
from embedq.queue.stream import Stream

log = structlog.get_logger("embedq.ops.rollout")

BACKFILLING, BACKFILLED = "backfilling", "backfilled"
PROMOTED, ROLLED_BACK, OLD_DROPPED = "promoted", "rolled back", "old dropped"
ACTIVE_S = 10.0  # a consumer seen this recently is a running worker (``active_consumers``)
_START = "start:"


@dataclass
class Record:
    """What ``Keys.migration(target)`` holds."""

    alias: str
    source: str  # the collection the alias named when the migration started
    target: str
    source_group: str
    group: str  # the target's consumer group
    phase: str = BACKFILLING
    copied: int = 0
    failed: int = 0
    starts: dict[str, str] = field(default_factory=dict)  # stream -> the group's start id
    started_ms: int = 0

    def fields(self) -> dict[str, str]:
        found = {
            "alias": self.alias,
            "source": self.source,
            "target": self.target,
            "source_group": self.source_group,
            "group": self.group,
            "phase": self.phase,
            "copied": str(self.copied),
            "failed": str(self.failed),
            "started_ms": str(self.started_ms),
        }
        return found | {_START + s: start for s, start in self.starts.items()}

    @classmethod
    def parse(cls, raw: dict[str, str]) -> Record:
        return cls(
            alias=raw.get("alias", ""),
            source=raw.get("source", ""),
            target=raw.get("target", ""),
            source_group=raw.get("source_group", ""),
            group=raw.get("group", ""),
            phase=raw.get("phase", BACKFILLING),
            copied=int(raw.get("copied", 0) or 0),
            failed=int(raw.get("failed", 0) or 0),
            starts={k[len(_START) :]: v for k, v in raw.items() if k.startswith(_START)},
            started_ms=int(raw.get("started_ms", 0) or 0),
        )


class Rollout:
    """The record and the groups of one migration, on the deployment's tasks streams."""

    def __init__(self, streams: Sequence[Stream], target: str) -> None:
        self.streams = list(streams)
        self.client: redis.Redis = streams[0].client
        self.keys: Keys = streams[0].keys
        self.key = self.keys.migration(target)
        self.target = target

    def load(self) -> Record | None:
        with translated("HGETALL migration"):
            raw: Any = self.client.hgetall(self.key)
        if not raw:
            return None
        return Record.parse({text(k) or "": text(v) or "" for k, v in raw.items()})

    def save(self, record: Record, **changes: Any) -> Record:
        for name, value in changes.items():
            setattr(record, name, value)
        mapping: Any = record.fields()
        with translated("HSET migration"):
            self.client.hset(self.key, mapping=mapping)
        return record

    def forget(self) -> None:
        with translated("DEL migration"):
            self.client.delete(self.key)

    def start(self, record: Record) -> Record:
        """Create the target's group at each stream's tail (``$``), and record where it
        started: from there on it receives every entry (a group already there is kept)."""
        for stream in self.streams:
            stream.create_group_at_tail(record.group)
            record.starts.setdefault(stream.keys.stream, _last_delivered(stream, record.group))
        record.started_ms = record.started_ms or int(time.time() * 1000)
        log.info("migration_group_created", group=record.group, starts=record.starts)
        return self.save(record)

    def behind(self, group: str, starts: dict[str, str]) -> int:
        """Entries up to the start positions that ``group`` has not finished (delivered and
        acked); 0 once the collection it feeds holds the effect of every one of them."""
        left = 0
        for stream in self.streams:
            start = starts[stream.keys.stream]
            with translated("XINFO GROUPS"):
                groups: Any = self.client.xinfo_groups(stream.keys.stream)
            info = next((g for g in groups if text(g["name"]) == group), None)
            if info is None:
                raise ConfigError(
                    f"the live collection's group {group} does not exist on "
                    f"{stream.keys.stream}: start its workers (the backfill copies what they "
                    "wrote up to the migration's start)"
                )
            delivered = text(info.get("last-delivered-id")) or "0-0"
            if _key(delivered) < _key(start):
                with translated("XRANGE"):
                    # Undelivered up to the start: bounded by the count asked for.
                    undelivered: Any = self.client.xrange(
                        stream.keys.stream, f"({delivered}", start, count=10_000
                    )
                left += len(undelivered)
            with translated("XPENDING"):
                pending: Any = self.client.xpending_range(
                    stream.keys.stream, group, min="-", max=start, count=10_000
                )
            left += len(pending)
        return left

    def wait_drained(
        self,
        group: str,
        starts: dict[str, str],
        *,
        wait_s: float,
        said: Callable[[int], None],
        every_s: float = 5.0,
    ) -> None:
        """Until ``group`` finished every entry up to ``starts``; a ConfigError after
        ``wait_s`` (its workers are not running, or far behind)."""
        deadline = time.monotonic() + wait_s
        last = 0.0
        while (left := self.behind(group, starts)) > 0:
            now = time.monotonic()
            if now >= deadline:
                raise ConfigError(
                    f"the live collection's group {group} still has {left:,} entries from "
                    f"before the migration's start after {wait_s:.0f}s: run its workers "
                    "(the old model's), then run this again"
                )
            if now - last >= every_s:
                said(left)
                last = now
            time.sleep(0.2)

    def lag(self, group: str) -> LagInfo:
        """``group``'s backlog over the streams (``embedq lag``'s figures)."""
        parts = [Stream(s.client, s.keys.stream, group, s.consumer).lag() for s in self.streams]
        return merge_partitions(self.keys.base, group, parts)

    def destroy_group(self, group: str) -> None:
        """The group of a collection that is gone: nothing reads it any more, and trimming
        must not keep entries for it."""
        for stream in self.streams:
            with translated("XGROUP DESTROY"):
                self.client.xgroup_destroy(stream.keys.stream, group)
        log.info("migration_group_destroyed", group=group)

    def forget_index(self, index_name: str) -> None:
        """The per-id index and leases of a dropped collection, on every stream."""
        with translated("DEL index"):
            for stream in self.streams:
                keys = stream.keys
                self.client.delete(
                    keys.index(index_name), keys.leases(index_name), keys.index_owner(index_name)
                )


def records(streams: Sequence[Stream], alias: str) -> list[Record]:
    """Every migration recorded for ``alias``, oldest first."""
    keys = streams[0].keys
    found = []
    with translated("SCAN migrations"):
        for key in streams[0].client.scan_iter(match=keys.migration("*"), count=1000):
            raw: Any = streams[0].client.hgetall(key)
            parsed = Record.parse({text(k) or "": text(v) or "" for k, v in raw.items()})
            if parsed.alias == alias:
                found.append(parsed)
    return sorted(found, key=lambda r: r.started_ms)


def active_consumers(info: LagInfo, within_s: float) -> list[str]:
    """Consumers of a group seen in the last ``within_s`` seconds: workers still running."""
    return [c.name for c in info.consumers if c.idle_ms < within_s * 1000]


def _last_delivered(stream: Stream, group: str) -> str:
    with translated("XINFO GROUPS"):
        groups: Any = stream.client.xinfo_groups(stream.keys.stream)
    info = next(g for g in groups if text(g["name"]) == group)
    return text(info.get("last-delivered-id")) or "0-0"


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def backlog_of(info: LagInfo) -> int:
    """Entries a group has yet to finish: undelivered (its lag, else the stream length, an
    upper bound) plus pending."""
    undelivered = info.lag if info.lag is not None else info.length
    return undelivered + info.pending


def group_line(label: str, info: LagInfo) -> str:
    lag = "unknown" if info.lag is None else f"{info.lag:,}"
    active = len(active_consumers(info, ACTIVE_S))
    state = "" if info.group_exists else " (no such group)"
    return (
        f"{label:<9}group {info.group}{state}: lag {lag}, pending {info.pending:,}, "
        f"{active} worker(s) reading"
    )


def next_step(record: Record, live: str, new: LagInfo, old: LagInfo | None) -> str:
    """The next safe step of the migration ``record``, the alias naming ``live``."""
    if record.phase == BACKFILLING:
        return "--backfill (it waits for the live collection's group, then copies)"
    if record.phase == OLD_DROPPED:
        return "nothing: the migration is done"
    new_running = bool(active_consumers(new, ACTIVE_S))
    if live == record.source:
        if not new_running:
            return (
                f"start workers with the new --model (they read group {record.group}), "
                "then --promote"
            )
        return "--evaluate QUERIES, then --promote (once its group's lag is small)"
    old_running = old is not None and bool(active_consumers(old, ACTIVE_S))
    if old_running:
        return (
            "replace the old-model workers by new-model ones (--rollback stays lossless until "
            "--drop-old); then --drop-old"
        )
    return "--drop-old once no rollback is wanted (it drops " + record.source + " and its group)"
