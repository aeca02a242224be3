"""What ``embedq migrate`` checks before it changes anything, and the group that feeds the
collection readers search (issue 26).

* **Redis lost its data** (``embedq.sink.epoch``): the migration's record, both consumer
  groups, the index of each collection and the entries not yet written are gone with it.
  No step can then prove the collection it keeps complete, so every step that changes
  something refuses (``refuse_if_lost``) until the live collection is recovered (``embedq
  verify --adopt``) and the operator accepts the loss for the other collection
  (``--accept-redis-loss``): the recovery the README's migration runbook gives.
* **Writers during ``--adopt``**: adopting renames the live collection; a write that races
  the rename can be acknowledged and lost (seen on Milvus Lite). ``refuse_unless_quiet``
  lets it run only while the deployment's group has nothing to write and no producer is
  feeding a running worker.
* **The live group** (``live_group``): after ``--promote`` the collection the alias names
  is fed by its own group ``G:<collection>``, and after ``--drop-old`` the deployment's
  group ``G`` is gone; what watches the backlog (``lag``, KEDA) must follow it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from embedq.core.errors import MigrationRefused
from embedq.core.progress import format_time_ms
from embedq.ops.migrate import Migration
from embedq.ops.rollout import ACTIVE_S, OLD_DROPPED, PROMOTED, active_consumers, records
from embedq.queue.connection import translated as queue_translated
from embedq.queue.entries import text
from embedq.queue.lag import LagInfo, merge_partitions
from embedq.queue.stream import Stream
from embedq.sink.epoch import PROPERTY, Epoch, Standing, in_redis
from embedq.sink.error_codes import translated
from embedq.sink.schema import SEPARATOR

RUNBOOK = "the README's migration runbook, 'Redis lost its data during a migration'"


@dataclass(frozen=True)
class Loss:
    """A collection of the alias's family that records an epoch Redis does not hold."""

    collection: str
    standing: Standing

    def line(self) -> str:
        seen = self.standing.collection
        assert seen is not None  # lost implies a recorded epoch
        held = self.standing.redis.token if self.standing.redis else "(none)"
        return (
            f"Redis lost its data since {format_time_ms(seen.created_ms)} ({self.collection} "
            f"records the epoch {seen.token}, Redis holds {held}; or --redis-url/--stream "
            "name another deployment): the migration's record, groups and indexes are gone, "
            "so no collection can be proven complete"
        )


def losses(migration: Migration, streams: Sequence[Stream]) -> list[Loss]:
    """The alias's collections (NAME and every NAME__<fingerprint>) that outlived Redis's
    data: workers record Redis's epoch for NAME in each collection they write."""
    redis_epoch = in_redis(streams[0], migration.name)
    found = []
    for name in family(migration):
        recorded = Epoch.parse(migration.properties(name).get(PROPERTY))
        standing = Standing(redis_epoch, recorded)
        if standing.lost:
            found.append(Loss(name, standing))
    return found


def family(migration: Migration) -> list[str]:
    """The physical collections of the alias: NAME itself, or those behind it."""
    with translated("list collections"):
        names = migration.client.list_collections(timeout=migration.timeout_s)
    prefix = migration.name + SEPARATOR
    return sorted(str(n) for n in names if n == migration.name or str(n).startswith(prefix))


def refuse_if_lost(migration: Migration, streams: Sequence[Stream], *, accept: bool) -> list[str]:
    """A MigrationRefused, changing nothing, while Redis lost its data; with ``accept``
    (``--accept-redis-loss``) once the live collection agrees with Redis again (``embedq
    verify --adopt``), the collections whose loss the operator accepts."""
    found = losses(migration, streams)
    if not found:
        return []
    live = migration.live()
    if not accept:
        raise MigrationRefused(f"{found[0].line()}; nothing was changed. Recover first: {RUNBOOK}")
    if any(loss.collection == live for loss in found):
        raise MigrationRefused(
            f"{found[0].line()}; --accept-redis-loss goes only after `embedq verify --adopt` "
            f"rebuilt the index of the live collection {live} (after re-sending from the "
            "source what was in flight); nothing was changed"
        )
    return [loss.collection for loss in found]


def refuse_unless_quiet(streams: Sequence[Stream], group: str, collection: str) -> None:
    """Return once ``group`` is quiet: nothing undelivered or pending, and no worker read
    it in the last ``ACTIVE_S`` seconds while an entry was added in that time (producers
    still writing). A MigrationRefused when it has work, or after ``ACTIVE_S`` of writes:
    ``--adopt`` renames ``collection`` under them."""
    deadline = time.monotonic() + ACTIVE_S
    while True:
        info = group_lag(streams, group)
        undelivered = info.lag if info.lag is not None else _any_undelivered(streams, group)
        running = active_consumers(info, ACTIVE_S)
        writing = bool(running) and _added_within(streams, ACTIVE_S)
        if not (undelivered or info.pending or writing):
            return
        if undelivered or info.pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # a stream that just went quiet (a drain's last entries) passes
    raise MigrationRefused(
        f"--adopt renames {collection}, and group {group} is not quiet ({undelivered:,} "
        f"undelivered, {info.pending:,} pending, {len(running)} worker(s) read it in the last "
        f"{ACTIVE_S:.0f}s{', entries still added' if writing else ''}): a write racing the "
        "rename can be lost. Pause the producers, let the workers finish, then --adopt "
        "again; nothing was changed"
    )


def _any_undelivered(streams: Sequence[Stream], group: str) -> int:
    """1 when an entry follows ``group``'s last delivered one on some stream, else 0: what
    a NULL lag (entries deleted, a group created at an id) leaves to find out."""
    for stream in streams:
        with queue_translated("XINFO GROUPS"):
            try:
                groups: Any = stream.client.xinfo_groups(stream.keys.stream)
            except redis.ResponseError:  # no such stream: nothing to deliver
                continue
        found = next((g for g in groups if text(g["name"]) == group), None)
        last = text(found.get("last-delivered-id")) if found is not None else None
        with queue_translated("XRANGE"):
            after: Any = stream.client.xrange(stream.keys.stream, f"({last or '0-0'}", count=1)
        if after:
            return 1
    return 0


def _added_within(streams: Sequence[Stream], seconds: float) -> bool:
    """Whether a producer added an entry to ``streams`` in the last ``seconds`` (by Redis's
    clock: entry ids are its milliseconds)."""
    client = streams[0].client
    now_s, now_us = client.time()
    now_ms = now_s * 1000 + now_us // 1000
    for stream in streams:
        with queue_translated("XINFO STREAM"):
            try:
                info: Any = client.xinfo_stream(stream.keys.stream)
            except redis.ResponseError:  # no such stream: nothing was added
                continue
        last = str(text(info.get("last-generated-id")) or "0-0")
        if now_ms - int(last.partition("-")[0]) < seconds * 1000:
            return True
    return False


def group_lag(streams: Sequence[Stream], group: str) -> LagInfo:
    parts = [Stream(s.client, s.keys.stream, group, s.consumer).lag() for s in streams]
    return merge_partitions(streams[0].keys.base, group, parts)


def live_group(streams: Sequence[Stream], alias: str, group: str) -> str:
    """The group that feeds the collection ``alias`` names, by the newest migration Redis
    records for it: its new collection's group once promoted (and after ``--drop-old``),
    else its source's. ``group`` itself when no migration of it is recorded, or when
    ``group`` is not the deployment's group that the migration started from (a group
    asked for by name)."""
    found = records(streams, alias)
    if not found:
        return group
    newest = found[-1]
    if not (newest.source_group == group or newest.group.startswith(group + ":")):
        return group
    return newest.group if newest.phase in (PROMOTED, OLD_DROPPED) else newest.source_group
