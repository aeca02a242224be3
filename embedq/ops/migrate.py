"""Model migration behind an alias: ``embedq migrate``.

Readers search ``--collection NAME``, a Milvus alias; each model writes its own physical
collection ``NAME__<fingerprint>`` (``embedq.sink.schema.model_collection``), fed by its own
consumer group on the same tasks streams (``embedq.ops.rollout``). Changing the model:

1. ``migrate --backfill --model NEW`` creates NEW's consumer group at the streams' tail
   (the migration's start) and then NEW's collection, recording that group on it
   (``embedq.group``). Workers started with ``--model NEW`` find that collection and read
   that group, so every write producers send from the start on reaches it. Once the live
   collection's workers finished every entry up to the start, the backfill copies the live
   collection (text re-embedded by NEW) under NEW's per-id version fence: a stream write
   newer than the copied row wins, whichever lands first.
2. ``migrate --promote --model NEW`` moves the alias in one Milvus call once NEW's workers
   are running and its group is caught up (readers see one model or the other, never a
   mix). The old model's workers go on writing the old collection from the old group:
   replace them whenever convenient; nothing is lost meanwhile.
3. ``migrate --rollback`` moves the alias back: the old collection received every write
   (its group kept them until some old-model worker wrote them). ``migrate --drop-old``
   drops it, destroys its group and forgets its index, once no worker reads that group.

With no action flag, ``migrate`` prints the plan (``plan``) and changes nothing;
``--status`` says where a migration stands. The first migration of a collection that is
not yet behind an alias adopts it only when asked (``--adopt``, issue 26 item 6): renamed
to ``NAME__<its fingerprint>``, with the alias NAME created on it; it keeps its index
(``embedq.index``) and the deployment's group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from embedq.core.errors import (
    ConfigError,
    EncodeFailed,
    MigrationRefused,
    SinkRejected,
    SinkUnavailable,
)
from embedq.core.keys import collection_group, partition_for
from embedq.model.encoder import EncodedBatch, Encoder
from embedq.ops.rollout import Record, Rollout
from embedq.queue.stream import Stream
from embedq.queue.versions import BUSY, GO, Versions, Written
from embedq.sink.digest import collection_tag, vector_digests
from embedq.sink.error_codes import translated
from embedq.sink.milvus import GROUP_PROPERTY, INDEX_PROPERTY, RECHECK_S, Row, Sink
from embedq.sink.schema import SEPARATOR, model_collection, model_fingerprint

log = structlog.get_logger("embedq.ops.migrate")

__all__ = ["SEPARATOR", "Migration", "backfill", "plan", "shadow_name", "source_sink"]

PREVIOUS = "embedq.previous"  # property of a promoted collection: the one it replaced
BATCH_ROWS = 64
CHUNK_IDS = 512  # ids read, embedded and written together by the backfill
NO_VERSION = "0-0"  # a row written before rows carried versions: any stream write is newer
RELEASE = ""  # a settle that only releases the lease (the write failed)
LISTING_TRIES = 5  # listings of the live collection, when writes race them

shadow_name = model_collection  # the name this module has always used for it


@dataclass
class BackfillReport:
    """What the backfill did."""

    total: int = 0  # ids the live collection's index lists
    copied: int = 0  # rows written into the new collection
    stale: int = 0  # rows a newer stream write had already replaced there
    missing: int = 0  # ids deleted from the live collection since (their delete follows)
    failed: list[str] = field(default_factory=list)  # ids whose text the new model fails on
    elapsed_s: float = 0.0


Report = Callable[[int, int, float], None]  # done, todo, seconds since the backfill started


class Migration:
    """The alias NAME and the collections behind it, on one Milvus."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.name = sink.collection
        self.client = sink.client
        self.timeout_s = sink.timeout_s

    # -- where the alias points -----------------------------------------------------

    def target(self) -> str | None:
        """The collection the alias points at; None when NAME is not an alias."""
        with translated("describe alias"):
            aliases = self.client.list_aliases(timeout=self.timeout_s).get("aliases", [])
            if self.name not in aliases:
                return None
            return str(
                self.client.describe_alias(self.name, timeout=self.timeout_s)["collection_name"]
            )

    def properties(self, collection: str) -> dict[str, str]:
        with translated("describe collection"):
            info = self.client.describe_collection(collection, timeout=self.timeout_s)
        return {str(k): str(v) for k, v in (info.get("properties") or {}).items()}

    def exists(self, collection: str) -> bool:
        with translated("describe collection"):
            return bool(self.client.has_collection(collection, timeout=self.timeout_s))

    def live(self) -> str:
        """The physical collection readers search now (NAME itself before any adoption)."""
        current = self.target()
        if current is not None:
            return current
        if not self.exists(self.name):
            raise ConfigError(f"collection {self.name} does not exist at {self.sink.uri}")
        return self.name

    def adopt(self, *, allowed: bool = True) -> str:
        """The collection behind the alias, putting NAME behind one first if it is not and
        ``allowed`` (``--adopt``); a ConfigError, changing nothing, when not allowed."""
        current = self.live()
        if current != self.name:
            return current
        fingerprint = self.properties(self.name).get("embedq.fingerprint") or "v0"
        renamed = shadow_name(self.name, fingerprint)
        if not allowed:
            raise ConfigError(
                f"{self.name} is a collection, not an alias: a migration first renames it to "
                f"{renamed} and creates the alias {self.name} on it; add --adopt to do that "
                "(running workers switch to the renamed collection before their next write)"
            )
        with translated("adopt collection"):
            # The renamed collection keeps its Redis index (keyed by NAME): Sink.index_name.
            self.client.alter_collection_properties(
                self.name, properties={INDEX_PROPERTY: self.name}, timeout=self.timeout_s
            )
            # Readers miss NAME for the moment between these two calls (writers wait).
            self.client.rename_collection(self.name, renamed, timeout=self.timeout_s)
            self.client.load_collection(renamed, timeout=self.timeout_s)
            self.client.create_alias(renamed, self.name, timeout=self.timeout_s)
        log.warning(
            "collection_adopted",
            collection=renamed,
            alias=self.name,
            why="the first migration puts the collection behind an alias: running workers "
            "switch to it by its new name before their next write",
        )
        # Until every running worker has re-checked NAME (Sink.check_target), one may still
        # write through it: nothing may move the alias before then.
        time.sleep(2 * RECHECK_S)
        return renamed

    def move_alias(self, collection: str) -> None:
        with translated("alter alias"):
            self.client.alter_alias(collection, self.name, timeout=self.timeout_s)
        log.info("alias_moved", alias=self.name, collection=collection)

    def previous(self) -> tuple[str, str]:
        """(the live collection, the one it replaced); a ConfigError when there is none."""
        current = self.target()
        if current is None:
            raise ConfigError(f"{self.name} is not an alias: nothing was migrated")
        before = self.properties(current).get(PREVIOUS, "")
        if not (before and self.exists(before)):
            raise ConfigError(
                f"{self.name} points at {current}, which replaced no collection that still "
                "exists (nothing to roll back to or drop)"
            )
        return current, before

    def drop(self, collection: str) -> None:
        with translated("list aliases"):
            aliases = self.client.list_aliases(collection, timeout=self.timeout_s)
        if aliases.get("aliases"):
            raise ConfigError(
                f"collection {collection} is still behind alias(es) {aliases['aliases']}"
            )
        with translated("drop collection"):
            self.client.drop_collection(collection, timeout=self.timeout_s)
        log.info("collection_dropped", collection=collection)

    # -- the new model's collection ---------------------------------------------------

    def open(self, collection: str, *, create: bool = False) -> Sink:
        return self.sink.sibling(collection, create=create)

    def shadow(self, source: Sink, encoder: Encoder, group: str = "") -> Sink:
        """The new model's collection, created if missing with what it replaces and the
        consumer group that feeds it in its properties (one call: a worker of the new model
        that finds it also finds its group)."""
        name = shadow_name(self.name, model_fingerprint(encoder))
        shadow = self.open(name, create=True)
        extra = {PREVIOUS: source.collection} | ({GROUP_PROPERTY: group} if group else {})
        created = shadow.ensure_for(encoder, properties=extra)
        if not created and not self.properties(name).get(PREVIOUS):
            with translated("alter collection"):
                self.client.alter_collection_properties(
                    name, properties={PREVIOUS: source.collection}, timeout=self.timeout_s
                )
        return shadow


def plan(migration: Migration, fingerprint: str) -> list[str]:
    """What ``migrate`` would do for the model of ``fingerprint``, read without a change."""
    name = migration.name
    live = migration.live()
    live_fp = migration.properties(live).get("embedq.fingerprint") or "v0"
    lines = [
        f"plan: {name} is "
        + (f"an alias of {live}" if live != name else "a collection (not behind an alias)")
        + f", model fingerprint {live_fp}, {_rows_in(migration, live)} rows"
    ]
    target = shadow_name(name, fingerprint)
    if live == target or (live == name and live_fp == fingerprint):
        return [*lines, f"plan: {name} already serves this model ({live}); nothing to do"]
    step = 1
    if live == name:
        lines.append(
            f"plan: {step}. --adopt: rename {name} to {shadow_name(name, live_fp)} and create "
            f"the alias {name} on it (running workers switch before their next write)"
        )
        step += 1
    there = (
        f"exists, {_rows_in(migration, target)} rows" if migration.exists(target) else "to create"
    )
    return [
        *lines,
        f"plan: {step}. --backfill: new-model collection {target} ({there}) with its own "
        "consumer group from now on, backfilled from the live collection's text",
        f"plan: {step + 1}. start workers with this --model (they write {target})",
        f"plan: {step + 2}. --promote: {name} moves to {target} once its group is caught up",
        f"plan: {step + 3}. replace the old workers; --rollback moves {name} back at any "
        "time; --drop-old drops the replaced collection and its group",
        "plan: nothing was changed (give an action flag)",
    ]


def _rows_in(migration: Migration, collection: str) -> str:
    try:
        return f"{migration.open(collection).count():,}"
    except (SinkUnavailable, SinkRejected):  # e.g. not loaded: the plan loads nothing
        return "?"


def source_sink(migration: Migration, collection: str) -> Sink:
    """The live collection, opened to be read; it must store text to be re-embedded."""
    source = migration.open(collection)
    source.ensure_collection(None, "", create=False)
    if not source.store_text:
        raise ConfigError(
            f"collection {collection} stores no text (created with --no-store-text): a "
            "backfill needs it. Re-enqueue the sources into a stream that a worker with the "
            f"new --model reads, writing to --collection {shadow_name(migration.name, '<fp>')}"
        )
    return source


def begin(
    migration: Migration,
    streams: Sequence[Stream],
    encoder: Encoder,
    *,
    group: str,
    adopt: bool,
) -> tuple[Sink, Sink, Rollout, Record]:
    """The live collection, the new model's (created with its group), and the migration's
    record: started now, or the one a previous run left. ``group``: the deployment's."""
    live = migration.adopt(allowed=adopt)
    target = shadow_name(migration.name, model_fingerprint(encoder))
    if live == target:
        raise ConfigError(f"{migration.name} already serves this model ({live})")
    source = source_sink(migration, live)
    rollout = Rollout(streams, target)
    record = rollout.load()
    if record is None:
        if migration.exists(target):
            raise MigrationRefused(
                f"collection {target} exists but no migration toward it is recorded in Redis "
                "(an older embedq made it, or Redis lost its data): its rows cannot be proven "
                "complete; --accept-redis-loss drops it and starts again; nothing was changed"
            )
        record = Record(
            alias=migration.name,
            source=live,
            target=target,
            source_group=source.group or group,
            group=collection_group(group, target),
        )
        # The group first: a new-model worker that finds the collection finds its group
        # already at the start position (it would create one at 0 and replay the stream).
        record = rollout.start(record)
    shadow = migration.shadow(source, encoder, record.group)
    # Before the backfill records anything in the new collection's index: one left by a
    # dropped collection of that name is emptied now, not by a new-model worker later.
    for stream in streams if shadow.incarnation else []:
        Versions(stream.client, stream.keys, shadow.index_name).own(
            shadow.incarnation, created=False
        )
    return source, shadow, rollout, record


def backfill(
    source: Sink,
    shadow: Sink,
    encoder: Encoder,
    streams: Sequence[Stream],
    *,
    lease_ms: int,
    report: Report | None = None,
) -> BackfillReport:
    """Copy every row the live collection's index lists into the new model's collection,
    re-embedded, each under the new collection's version fence: a row whose id the new
    collection's workers already wrote at the same or a newer version is left alone.

    Called once the live collection's group has finished every entry up to the
    migration's start (``Rollout.wait_drained``): each id's row there is then the effect
    of its last entry up to the start, or of a later one, which the new group delivers too.
    An id deleted before the start is in neither collection; one deleted after it is
    deleted by the new group's entry (recorded in the fence, so an older copy is stale)."""
    started = time.monotonic()
    fences = [Versions(s.client, s.keys, shadow.index_name) for s in streams]
    writer = _FencedWriter(shadow, lease_ms)
    todo = _ids_by_partition(source, streams)
    result = BackfillReport(total=sum(len(ids) for ids in todo))
    done = 0
    for part, ids in enumerate(todo):
        for chunk in _chunks(ids, CHUNK_IDS):
            rows = source.get(chunk, with_vectors=False)
            result.missing += len(chunk) - len(rows)
            embedded = _embedded(rows, encoder, result)
            copied, stale = writer.write(fences[part], embedded)
            result.copied += copied
            result.stale += stale
            done += len(chunk)
            if report is not None:
                report(done, result.total, time.monotonic() - started)
    result.elapsed_s = time.monotonic() - started
    log.info(
        "backfill_done",
        collection=shadow.target,
        total=result.total,
        copied=result.copied,
        stale=result.stale,
        missing=result.missing,
        failed=len(result.failed),
        elapsed_s=round(result.elapsed_s, 1),
    )
    return result


def _ids_by_partition(source: Sink, streams: Sequence[Stream]) -> list[list[str]]:
    """The live collection's ids, per partition: those its index says it holds (deleted ones
    left out). A collection whose index lists nothing while it holds rows (written with
    ordered writes off) is listed instead."""
    found: list[list[str]] = []
    for stream in streams:
        index = Versions(stream.client, stream.keys, source.index_name)
        found.append(sorted(i for i, held in index.scan() if not held.deleted))
    if any(found) or not source.count():
        return found
    log.warning(
        "backfill_listing",
        collection=source.collection,
        why="its index lists no id: the collection itself is listed (no writes may race it)",
    )
    by_part: list[list[str]] = [[] for _ in streams]
    for doc in sorted(_signatures(source)):
        by_part[partition_for(doc, len(streams))].append(doc)
    return by_part


def _signatures(sink: Sink) -> dict[str, str]:
    """Every id's version. A listing that a write raced fails (``Sink.rows`` counts the
    rows after it rather than return a list it cannot prove whole): it is taken again, a
    few times."""
    attempt = 1
    while True:
        try:
            return {str(r["id"]): str(r.get("version", "")) for r in sink.rows()}
        except SinkUnavailable:
            if attempt == LISTING_TRIES:
                raise
        time.sleep(0.2 * attempt)
        attempt += 1


class _FencedWriter:
    """Rows written into the new collection as a worker of its group would: lease, upsert,
    record (``fence.lua`` / ``settle.lua``), acking nothing."""

    def __init__(self, shadow: Sink, lease_ms: int) -> None:
        self.shadow = shadow
        self.lease_ms = lease_ms
        self.consumer = f"migrate-{os.getpid()}"
        self.tag = collection_tag(shadow.target)

    def write(self, fence: Versions, rows: Sequence[Row]) -> tuple[int, int]:
        """(written, stale). An id another writer holds is asked again once it settled."""
        copied = stale = 0
        pending = list(rows)
        attempt = 0
        while pending:
            wanted = [(r.id, r.version) for r in pending]
            statuses = fence.acquire(self.consumer, self.lease_ms, wanted)
            go = [r for r, s in zip(pending, statuses, strict=True) if s == GO]
            busy = [r for r, s in zip(pending, statuses, strict=True) if s == BUSY]
            stale += len(pending) - len(go) - len(busy)
            self._upsert(fence, go)
            copied += len(go)
            pending = busy
            if pending:
                time.sleep(min(0.02 * 2**attempt, 0.5))
                attempt += 1
        return copied, stale

    def _upsert(self, fence: Versions, rows: Sequence[Row]) -> None:
        if not rows:
            return
        try:
            self.shadow.upsert(rows)
        except BaseException:
            released = [Written(r.id, r.version, RELEASE) for r in rows]
            fence.settle("", self.consumer, released, [])
            raise
        digests = vector_digests(
            [r.vector for r in rows],
            [r.sparse for r in rows],
            self.tag,
            has_sparse=self.shadow.sparse,
        )
        written = [
            Written(r.id, r.version, r.content_hash, d) for r, d in zip(rows, digests, strict=True)
        ]
        fence.settle("", self.consumer, written, [])


def _chunks(ids: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _embedded(rows: list[dict[str, Any]], encoder: Encoder, result: BackfillReport) -> list[Row]:
    """Rows as the new model embeds them, in model batches of similar lengths; a text the
    model fails on alone is logged and left out (the new collection then lacks that id)."""
    tokenized = encoder.tokenize([str(r.get("text", "")) for r in rows])
    order = sorted(range(len(rows)), key=lambda i: len(tokenized[i].ids))
    out: list[Row] = []
    for start in range(0, len(order), BATCH_ROWS):
        part = order[start : start + BATCH_ROWS]
        try:
            done = [(part, encoder.forward([tokenized[i].ids for i in part]))]
        except EncodeFailed:
            done = _one_by_one(part, [tokenized[i].ids for i in part], encoder, rows, result)
        for group, batch in done:
            for n, i in enumerate(group):
                sparse = batch.sparse[n] if batch.sparse else None
                out.append(_row(rows[i], batch.vectors[n], sparse))
    return out


def _one_by_one(
    part: list[int],
    ids: list[list[int]],
    encoder: Encoder,
    rows: list[dict[str, Any]],
    result: BackfillReport,
) -> list[tuple[list[int], EncodedBatch]]:
    """A batch the model failed on, text by text, without the texts it fails on alone."""
    done = []
    for i, token_ids in zip(part, ids, strict=True):
        try:
            done.append(([i], encoder.forward([token_ids])))
        except EncodeFailed as exc:
            result.failed.append(str(rows[i]["id"]))
            log.error("migrate_encode_failed", id=rows[i]["id"], error=str(exc)[:200])
    return done


def _row(row: dict[str, Any], vector: Any, sparse: dict[int, float] | None) -> Row:
    return Row(
        id=str(row["id"]),
        vector=vector,
        text=str(row.get("text", "")),
        meta=row.get("meta"),
        content_hash=str(row.get("content_hash", "")),
        version=str(row.get("version", "")) or NO_VERSION,
        sparse=sparse,
    )
