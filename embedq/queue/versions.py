"""Per-id versions: the fenced write that keeps the index equal to the last entry per id.

The guarantee: after a drain, every id's row is the effect of the *last* valid entry for
that id in its partition stream, whatever the interleaving of workers, kills, reclaims,
retries, split batches and outages. The version of an entry is its stream entry id (ids
grow within a stream, and producers send every entry of one id to the same partition).

How (``fence.lua``, ``settle.lua``; both keys share the partition's hash slot):

1. Before writing, a worker takes each id's **lease** (``P:leases:C``). An id whose index
   entry (``P:index:C``) already holds this version or a newer one is *stale*: acked, not
   written. An id leased by another live worker is *busy*: the worker waits until that
   write settles (then its own version is stale, or it goes) or the lease expires.
2. After Milvus confirmed the write, one script records the versions in the index (with
   the content hash and the written vectors' digest, ``embedq.sink.digest``), releases the
   leases and XACKs the entries.

So two writes of one id never overlap, and an older version never lands after a newer
one was recorded. The failure window: a lease lasts ``min_idle_s`` (when a dead worker's
entries become reclaimable), and a write's RPC is bounded by ``milvus_timeout_s`` (shorter);
a process paused between taking the lease and Milvus applying its write for longer than
that can land an old row after a newer one. ``settle.lua`` detects it (a newer version is in
the index when the late writer settles) and sends the newer entry again, so the index
converges on it; what stays open is Milvus applying a write after its client gave up
(a timed-out RPC that still lands), bounded by the server's own request timeout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.entries import load_script, text

GO, STALE, BUSY = "go", "stale", "busy"
DELETED = "-"  # the content hash recorded for a deleted id


@dataclass(frozen=True)
class Written:
    """One id's write, as ``settle`` records it."""

    id: str
    version: str
    content_hash: str  # DELETED for a delete
    # The written vectors' digest (embedq.sink.digest); "" for a delete, a refused write, or a
    # writer that computes none.
    vector_digest: str = ""


@dataclass(frozen=True)
class Conflict:
    """An id whose newer version was recorded while an older write was in flight."""

    id: str
    newer_version: str
    resent_as: str  # the newer entry's copy on the stream; "" when it was trimmed


@dataclass(frozen=True)
class Held:
    version: str
    content_hash: str
    vector_digest: str = ""  # "" where an older worker recorded none: not compared

    @property
    def deleted(self) -> bool:
        return self.content_hash == DELETED

    @classmethod
    def parse(cls, value: str) -> Held:
        """An index value: "<version> <content hash>[ <vector digest>]"."""
        version, _, rest = value.partition(" ")
        content_hash, _, vector_digest = rest.partition(" ")
        return cls(version, content_hash, vector_digest)


class Versions:
    """The index and leases of one (partition) stream for one collection."""

    def __init__(self, client: redis.Redis, keys: Keys, collection: str) -> None:
        self.client = client
        self.keys = keys
        self.retarget(collection)
        self._fence = client.register_script(load_script("fence.lua"))
        self._settle = client.register_script(load_script("settle.lua"))
        self._own = client.register_script(load_script("index_owner.lua"))

    def retarget(self, collection: str) -> None:
        """Keep the index of ``collection``: the physical one (``Sink.index_name``), never
        an alias that may name another collection tomorrow (issue 26 item 3)."""
        self.index_key = self.keys.index(collection)
        self.leases_key = self.keys.leases(collection)
        self.owner_key = self.keys.index_owner(collection)

    def acquire(self, consumer: str, lease_ms: int, wanted: Sequence[tuple[str, str]]) -> list[str]:
        """Lease each (id, version) or say why not: ``GO``, ``STALE`` or ``BUSY`` per id."""
        if not wanted:
            return []
        args: list[str | int] = [consumer, lease_ms]
        for doc_id, version in wanted:
            args += [doc_id, version]
        with translated("fence"):
            found: Any = self._fence(keys=[self.index_key, self.leases_key], args=args)
        return [text(s) or "" for s in found]

    def settle(
        self, group: str, consumer: str, written: Sequence[Written], ack: Sequence[str]
    ) -> list[Conflict]:
        """Record ``written`` in the index, release their leases and XACK ``ack``: one
        script. Returns the ids whose newer version had to be sent again."""
        args: list[str | int] = [group, consumer, len(written)]
        for w in written:
            args += [w.id, w.version, w.content_hash, w.vector_digest]
        args += list(ack)
        keys = [self.keys.stream, self.index_key, self.leases_key, self.keys.errors]
        with translated("settle"):
            flat: Any = self._settle(keys=keys, args=args)
        values = [text(v) or "" for v in flat]
        return [Conflict(*values[i : i + 3]) for i in range(0, len(values), 3)]

    def held(self, ids: Sequence[str]) -> list[Held | None]:
        """What the index says each id holds (None: never written)."""
        if not ids:
            return []
        with translated("HMGET index"):
            found: Any = self.client.hmget(self.index_key, list(ids))
        return [None if v is None else Held.parse(text(v) or "") for v in found]

    def own(self, incarnation: str, *, created: bool) -> bool:
        """Make the index describe ``incarnation`` of its collection (``Sink.incarnation``):
        emptied when it described another one (a dropped collection of the same name), or
        none and the caller ``created`` the collection; True when emptied. Atomic
        (``index_owner.lua``): a worker that started on the collection at the same time as
        its creator may have recorded writes already, and they are kept."""
        keys = [self.index_key, self.leases_key, self.owner_key]
        with translated("own index"):
            found: Any = self._own(keys=keys, args=[incarnation, "1" if created else "0"])
        return bool(int(found))

    def scan(self, count: int = 1000) -> Any:
        """Every (id, Held) of the index, in HSCAN pages (for ``embedq verify``)."""
        with translated("HSCAN index"):
            for doc_id, value in self.client.hscan_iter(self.index_key, count=count):
                yield text(doc_id) or "", Held.parse(text(value) or "")
