"""All Redis access: one small class with named methods.

Multi-step state changes are Lua scripts in ``embedq/queue/lua`` registered once here and each
called from exactly one method. redis-py exceptions are translated into embedq's errors at
this boundary (``embedq.queue.connection.translated``), so callers only see embedq's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
import structlog

from embedq.core.config import Settings
from embedq.core.keys import Keys, partition_streams
from embedq.queue.connection import connect, is_cluster, translated
from embedq.queue.dlq import DeadLetterQueue
from embedq.queue.entries import Entry, as_entries, load_script, pairs, text
from embedq.queue.lag import ConsumerInfo, LagInfo

log = structlog.get_logger("embedq.queue.stream")

T = TypeVar("T")


@dataclass(frozen=True)
class Claimed:
    """One XAUTOCLAIM step: entries now ours, ids whose payload is gone, the next cursor."""

    cursor: str
    entries: list[Entry]
    deleted_ids: list[str]


class Stream:
    """The tasks stream of one consumer group, and its dead-letter stream."""

    def __init__(
        self, client: redis.Redis, stream: str, group: str, consumer: str, *, online: bool = False
    ) -> None:
        self.client = client
        self.keys = Keys(stream, online=online)  # online: the interactive lane (embedq.worker.lane)
        self.group = group
        self.consumer = consumer
        self.dlq = DeadLetterQueue(client, self.keys, group, consumer)
        # Whether the group can be used now (None: always); the interactive lane's owner
        # sets it (embedq.worker.lane.OnlineLane.readable): a full Redis refuses its group.
        self.usable: Callable[[], bool] | None = None
        self._heartbeat = client.register_script(load_script("heartbeat.lua"))
        self._trim = client.register_script(load_script("trim.lua"))
        self._delete_idle_consumers = client.register_script(
            load_script("delete_idle_consumers.lua")
        )
        self._group_at_tail = client.register_script(load_script("group_at_tail.lua"))

    def readable(self) -> bool:
        """Whether reads, reclaims, own-pending reads and consumer tidying may include this
        stream now: always, but the interactive lane while Redis refuses its group
        (``usable``)."""
        return self.usable is None or self.usable()

    # -- group lifecycle -------------------------------------------------------------

    def use_group(self, group: str) -> None:
        """Read (and ack, dead-letter) as ``group`` from now on: the group of the collection
        the worker writes (``Sink.group``), decided once the collection is known."""
        self.group = group
        self.dlq = DeadLetterQueue(self.client, self.keys, group, self.consumer)

    def ensure_group(self) -> bool:
        """Create the group at ``0`` (MKSTREAM); True when it was created now."""
        with translated("XGROUP CREATE"):
            try:
                self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            except redis.exceptions.OutOfMemoryError:
                # A full Redis refuses XGROUP CREATE even when the group is there: a worker
                # restarted then must still start and drain.
                if self._group_exists():
                    return False
                raise
            except redis.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return False
                raise
        return True

    def create_group_at_tail(self, group: str) -> bool:
        """Create ``group`` at the stream's tail (``$``, MKSTREAM) with its entries-read
        known, so its lag is exact from the start (group_at_tail.lua); True when it was
        created now, False when it was there."""
        with translated("XGROUP CREATE"):
            try:
                self._group_at_tail(keys=[self.keys.stream], args=[group])
            except redis.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return False
                raise
        return True

    def _group_exists(self) -> bool:
        try:
            groups: Any = self.client.xinfo_groups(self.keys.stream)
        except redis.ResponseError:  # no such key
            return False
        return any(text(g["name"]) == self.group for g in groups)

    def _with_group(self, action: str, call: Callable[[], T], siblings: Sequence[Stream] = ()) -> T:
        """Run ``call``; if the group vanished (Redis restarted without persistence),
        recreate it (and the groups of ``siblings``, when ``call`` reads those partition
        streams too), say so loudly, and run it again."""
        with translated(action):
            try:
                return call()
            except redis.ResponseError as exc:
                # UNBLOCKED: the stream key was deleted while we were blocked on it.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
        log.error(
            "group_recreated",
            stream=self.keys.stream,
            group=self.group,
            why="the consumer group was missing; Redis lost its data or someone deleted it",
        )
        for stream in (self, *siblings):
            stream.ensure_group()
        with translated(action):
            return call()

    # -- reading ---------------------------------------------------------------------

    def read_own_pending(self, count: int, after: str = "0") -> list[Entry]:
        """This consumer's own pending entries after ``after`` (history read, no BLOCK)."""
        if not self.readable():
            return []
        reply: Any = self._with_group(
            "XREADGROUP 0",
            lambda: self.client.xreadgroup(
                self.group, self.consumer, {self.keys.stream: after}, count=count
            ),
        )
        return as_entries(reply[0][1]) if reply else []

    def read_new(self, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` never-delivered entries, waiting up to ``block_ms``."""
        reply: Any = self._with_group(
            "XREADGROUP >",
            lambda: self.client.xreadgroup(
                self.group,
                self.consumer,
                {self.keys.stream: ">"},
                count=count,
                block=block_ms if block_ms > 0 else None,
            ),
        )
        return as_entries(reply[0][1]) if reply else []

    def read_new_together(
        self, siblings: Sequence[Stream], count: int, block_ms: int
    ) -> list[tuple[Stream, list[Entry]]]:
        """One XREADGROUP over this stream and ``siblings`` (streams of the same group on the
        same server; one BLOCK for all): up to ``count`` new entries per stream, each list
        paired with its stream."""
        by_key = {s.keys.stream: s for s in (self, *siblings)}
        reply: Any = self._with_group(
            "XREADGROUP >",
            lambda: self.client.xreadgroup(
                self.group,
                self.consumer,
                dict.fromkeys(by_key, ">"),
                count=count,
                block=block_ms if block_ms > 0 else None,
            ),
            siblings=siblings,
        )
        return [(by_key[text(key) or ""], as_entries(raw)) for key, raw in (reply or []) if raw]

    def autoclaim(self, min_idle_ms: int, cursor: str = "0-0", count: int = 100) -> Claimed:
        """Take over entries idle longer than ``min_idle_ms`` from any consumer.

        Redis 7 replies ``[cursor, claimed, deleted_ids]``; the third element lists pending
        ids whose payload was trimmed or deleted (Redis drops them from the pending list).
        """
        if not self.readable():
            return Claimed(cursor="0-0", entries=[], deleted_ids=[])

        def call() -> Any:
            return self.client.execute_command(  # type: ignore[no-untyped-call]
                "XAUTOCLAIM",
                self.keys.stream,
                self.group,
                self.consumer,
                min_idle_ms,
                cursor,
                "COUNT",
                count,
            )

        reply = self._with_group("XAUTOCLAIM", call)
        next_cursor = text(reply[0]) or "0-0"
        claimed = [
            Entry(entry_id=eid.decode(), fields=pairs(fields))
            for eid, fields in reply[1]
            if eid is not None
        ]
        deleted = [d.decode() for d in reply[2]] if len(reply) > 2 else []
        return Claimed(cursor=next_cursor, entries=claimed, deleted_ids=deleted)

    def delivery_counts(self, entry_ids: Sequence[str]) -> dict[str, int]:
        """Times each pending entry was delivered (entries no longer pending are absent).

        Exactly these ids: one XPENDING per id over the range [id, id], pipelined. (A range
        over the whole group's pending list, cut at some count, misses ids that sit behind
        other consumers' entries and would count them as delivered once.)"""
        if not entry_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for eid in entry_ids:
            pipe.xpending_range(self.keys.stream, self.group, min=eid, max=eid, count=1)
        with translated("XPENDING"):
            replies: Any = pipe.execute()
        counts: dict[str, int] = {}
        for eid, rows in zip(entry_ids, replies, strict=True):
            if rows:
                counts[eid] = int(rows[0]["times_delivered"])
        return counts

    # -- settling entries ------------------------------------------------------------

    def ack(self, entry_ids: Sequence[str]) -> int:
        """XACK, and forget any last error recorded for these entries (one round trip)."""
        if not entry_ids:
            return 0
        with translated("XACK"):
            # Not a MULTI: a Redis out of memory refuses every command queued in one, XACK
            # included, while a plain XACK (it frees memory) goes through. The HDEL only
            # drops a hint; the two need not be atomic.
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(self.keys.stream, self.group, *entry_ids)
            pipe.hdel(self.keys.errors, *entry_ids)
            acked, _ = pipe.execute()
        return int(acked)

    def heartbeat(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset idle time of the entries still owned by this consumer; returns those ids."""
        if not entry_ids:
            return []
        with translated("heartbeat"):
            owned = self._heartbeat(
                keys=[self.keys.stream], args=[self.group, self.consumer, *entry_ids]
            )
        return [text(o) or "" for o in owned]

    # -- last errors: why an entry that may later be dead-lettered did not get through ---

    def record_error(self, entry_ids: Sequence[str], error: str) -> None:
        """Remember ``error`` as the last one this consumer hit while holding the entries.

        A reclaimer that later dead-letters an entry for ``max_deliveries`` cannot know why
        the workers before it failed; this hash tells it. ``ack`` and ``dead_letter`` delete
        the field, so the hash only holds entries still in flight.
        """
        if not entry_ids:
            return
        value = f"{self.consumer}: {error}"[:1000]
        with translated("HSET errors"):
            self.client.hset(self.keys.errors, mapping=dict.fromkeys(entry_ids, value))

    def last_errors(self, entry_ids: Sequence[str]) -> dict[str, str]:
        """The recorded last error of each entry that has one."""
        if not entry_ids:
            return {}
        with translated("HMGET errors"):
            values: Any = self.client.hmget(self.keys.errors, list(entry_ids))
        return {
            eid: v.decode("utf-8", "replace")
            for eid, v in zip(entry_ids, values, strict=True)
            if v is not None
        }

    def forget_errors(self, entry_ids: Sequence[str]) -> None:
        """Drop recorded errors of entries that left the pending list another way."""
        if entry_ids:
            with translated("HDEL errors"):
                self.client.hdel(self.keys.errors, *entry_ids)

    # -- consumers ---------------------------------------------------------------------

    def delete_idle_consumers(self, min_idle_ms: int) -> list[str]:
        """Remove consumers idle at least ``min_idle_ms`` with nothing pending (never this
        one); one script, so a consumer cannot be handed an entry between check and delete."""
        if not self.readable():
            return []
        removed: Any = self._with_group(
            "delete idle consumers",
            lambda: self._delete_idle_consumers(
                keys=[self.keys.stream], args=[self.group, min_idle_ms, self.consumer]
            ),
        )
        return [text(name) or "" for name in removed]

    # -- trimming --------------------------------------------------------------------

    def trim(self) -> tuple[int, str | None]:
        """XTRIM MINID below the oldest entry any group still needs (one atomic script).
        Returns how many entries went and the MINID used (None: nothing was safe)."""
        with translated("trim"):
            trimmed, minid = self._trim(keys=[self.keys.stream])
        return int(trimmed), text(minid) or None

    # -- inspection ------------------------------------------------------------------

    def ping(self) -> None:
        """Raise ``QueueUnavailable`` or ``ConfigError`` unless Redis answers (readiness)."""
        with translated("PING"):
            self.client.ping()

    def group_pending(self) -> int:
        with translated("XPENDING"):
            try:
                summary = self.client.xpending(self.keys.stream, self.group)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return 0
                raise
        return int(summary["pending"])

    def lag(self) -> LagInfo:
        """The group's backlog on this stream, and Redis's memory where it lives."""
        info = self._lag()
        used, limit = self._memory()
        return replace(info, used_memory=used, maxmemory=limit)

    def _memory(self) -> tuple[int, int]:
        """(used_memory, maxmemory) of the node holding this stream; (0, 0) when INFO is not
        allowed (an ACL user without it): the lag is still worth reporting."""
        with translated("INFO memory"):
            try:
                if is_cluster(self.client):
                    cluster: Any = self.client  # a RedisCluster (typed as Redis, see connect)
                    node = cluster.get_node_from_key(self.keys.stream)
                    found: Any = cluster.info("memory", target_nodes=node)
                else:
                    found = self.client.info("memory")
            except redis.ResponseError:
                return 0, 0
        return int(found.get("used_memory", 0)), int(found.get("maxmemory", 0))

    def _lag(self) -> LagInfo:
        with translated("XINFO"):
            pipe = self.client.pipeline(transaction=False)
            pipe.xlen(self.keys.stream)
            pipe.xlen(self.keys.dlq)
            length, dlq_length = pipe.execute()
            try:
                groups = self.client.xinfo_groups(self.keys.stream)
            except redis.ResponseError:  # no such key
                groups = []
            group = next((g for g in groups if text(g["name"]) == self.group), None)
            consumers: list[ConsumerInfo] = []
            if group is not None:
                consumers = [
                    ConsumerInfo(
                        name=text(c["name"]) or "",
                        pending=int(c["pending"]),
                        idle_ms=int(c["idle"]),
                    )
                    for c in self.client.xinfo_consumers(self.keys.stream, self.group)
                ]
        if group is None:
            return LagInfo(
                self.keys.stream,
                self.group,
                int(length),
                None,
                0,
                None,
                None,
                [],
                int(dlq_length),
                group_exists=False,
            )
        lag = group.get("lag")
        entries_read = group.get("entries-read")
        return LagInfo(
            stream=self.keys.stream,
            group=self.group,
            length=int(length),
            lag=None if lag is None else int(lag),
            pending=int(group["pending"]),
            last_delivered_id=text(group.get("last-delivered-id")),
            entries_read=None if entries_read is None else int(entries_read),
            consumers=consumers,
            dlq_length=int(dlq_length),
            group_exists=True,
        )

    def oldest_ids(self, info: LagInfo) -> tuple[str | None, str | None]:
        """The ids of the oldest entry waiting for the group (the first after its position;
        the stream's first when there is no group yet) and of the oldest pending one; None
        where there is none. An id's first part is its XADD time: the age of the work."""
        after = info.last_delivered_id if info.group_exists else None
        with translated("XRANGE"):
            first = self.client.xrange(
                self.keys.stream, min=f"({after}" if after else "-", max="+", count=1
            )
            pending = self.client.xpending(self.keys.stream, self.group) if info.pending else {}
        waiting = text(first[0][0]) if first else None
        return waiting, text(pending.get("min")) if pending else None

    def count_after(self, entry_id: str, limit: int, page: int = 1000) -> int:
        """How many entries follow ``entry_id``, counting at most ``limit``: the lag when
        XINFO cannot compute it (NULL after an XDEL). It reads the entries (XRANGE pages of
        ``page``), so ``limit`` should stay small."""
        counted, after = 0, entry_id
        with translated("XRANGE"):
            while counted < limit:
                found = self.client.xrange(
                    self.keys.stream, min=f"({after}", max="+", count=min(page, limit - counted)
                )
                if not found:
                    break
                counted += len(found)
                after = text(found[-1][0]) or after
        return counted


def open_stream(settings: Settings) -> Stream:
    """The stream named by ``settings``, for this process's consumer name."""
    return Stream(
        connect(settings.redis_url, block_ms=settings.block_ms, cluster=settings.redis_cluster),
        settings.stream,
        settings.group,
        settings.consumer,
    )


def open_partitions(stream: Stream, partitions: int) -> list[Stream]:
    """``stream``'s partition streams (``[stream]`` itself for one), sharing its client,
    group and consumer name."""
    if partitions == 1:
        return [stream]
    return [
        Stream(stream.client, key, stream.group, stream.consumer)
        for key in partition_streams(stream.keys.stream, partitions)
    ]


def open_streams(settings: Settings) -> list[Stream]:
    """Every tasks stream ``settings`` names: its partitions, or the one stream."""
    return open_partitions(open_stream(settings), settings.partitions)
