"""Model migration behind an alias: ``embedq migrate``.

Readers search ``--collection NAME``, a Milvus alias. Changing the model:

1. ``migrate --model NEW`` creates the shadow collection ``NAME__<fingerprint>`` for the new
   model and backfills it from the live collection's stored text (id, text, meta, content
   hash and version copied, vectors computed by NEW). Then it catches up, pass after pass,
   until a pass finds nothing to do: rows whose version changed are embedded again, ids
   deleted are deleted. The live collection keeps serving and its workers keep writing; every
   write reaches the shadow at the next pass (``--follow`` keeps passing until stopped), so
   new writes go to both until the switch.
2. ``migrate --promote --model NEW``: a last catch-up, then the alias moves to the shadow
   in one Milvus call (readers see one model or the other, never a mix), then one more pass
   copies versions newer than the shadow's that landed while it moved.
3. ``migrate --rollback`` moves the alias back to the collection it replaced;
   ``migrate --drop-old`` drops that one once it is no longer wanted.

With no action flag, ``migrate`` prints the plan (``plan``) and changes nothing. The first
migration of a collection that is not yet behind an alias adopts it only when asked
(``--adopt``, issue 26 item 6): renamed to ``NAME__<its fingerprint>``, with the alias NAME
created on it. Workers resolve NAME at start (``Sink.target``, the physical collection) and,
before each write, check again what that name is (``Sink.check_target``): a worker started
before the adoption switches to the renamed collection, and one whose model is not that of
the collection the name now reaches stops, its entries left pending (issue 26 item 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from embedq.core.errors import ConfigError, EncodeFailed, SinkRejected, SinkUnavailable
from embedq.model.encoder import EncodedBatch, Encoder
from embedq.sink.error_codes import translated
from embedq.sink.milvus import INDEX_PROPERTY, RECHECK_S, Row, Sink
from embedq.sink.schema import model_fingerprint

log = structlog.get_logger("embedq.ops.migrate")

SEPARATOR = "__"
PREVIOUS = "embedq.previous"  # property of a promoted collection: the one it replaced
BATCH_ROWS = 64
LISTING_TRIES = 5  # listings of the live collection per pass, when writes race them


@dataclass
class PassReport:
    """What one catch-up pass did."""

    total: int = 0  # rows the source holds
    todo: int = 0  # rows to embed again
    copied: int = 0
    deleted: int = 0
    failed: list[str] = field(default_factory=list)  # ids whose text the new model fails on
    elapsed_s: float = 0.0

    @property
    def idle(self) -> bool:
        """Nothing left that another pass could change (failed texts fail again)."""
        return not self.copied and not self.deleted


Report = Callable[[int, int, float], None]  # done, todo, seconds since the pass started


def shadow_name(name: str, fingerprint: str) -> str:
    return f"{name}{SEPARATOR}{fingerprint}"


def _version_key(version: str) -> tuple[int, int]:
    ms, _, seq = version.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() else (0, 0)


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

    def live(self) -> str:
        """The physical collection readers search now (NAME itself before any adoption)."""
        current = self.target()
        if current is not None:
            return current
        with translated("describe collection"):
            if not self.client.has_collection(self.name, timeout=self.timeout_s):
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
        with translated("describe collection"):
            there = bool(before) and self.client.has_collection(before, timeout=self.timeout_s)
        if not there:
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

    # -- the shadow ------------------------------------------------------------------

    def open(self, collection: str, *, create: bool = False) -> Sink:
        return self.sink.sibling(collection, create=create)

    def shadow(self, source: Sink, encoder: Encoder) -> Sink:
        """The new model's collection, created if missing, recording what it replaces."""
        name = shadow_name(self.name, model_fingerprint(encoder))
        shadow = self.open(name, create=True)
        created = shadow.ensure_for(encoder)
        if created or not self.properties(name).get(PREVIOUS):
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
    with translated("describe collection"):
        exists = migration.client.has_collection(target, timeout=migration.timeout_s)
    there = f"exists, {_rows_in(migration, target)} rows" if exists else "to create"
    return [
        *lines,
        f"plan: {step}. --follow (or --backfill): new-model collection {target} ({there}), "
        "backfilled from the live collection's text, then caught up pass after pass",
        f"plan: {step + 1}. --promote: a last catch-up, then {name} moves to {target}",
        f"plan: {step + 2}. --rollback moves it back; --drop-old drops the replaced collection",
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


def _signatures(sink: Sink) -> dict[str, str]:
    """Every id's version. Workers keep writing the live collection while a pass lists it,
    and a listing that a write raced fails (``Sink.rows`` counts the rows after it rather
    than return a list it cannot prove whole): it is taken again, a few times."""
    attempt = 1
    while True:
        try:
            return {str(r["id"]): str(r.get("version", "")) for r in sink.rows()}
        except SinkUnavailable:
            if attempt == LISTING_TRIES:
                raise
        time.sleep(0.2 * attempt)
        attempt += 1


def catch_up(
    source: Sink,
    shadow: Sink,
    encoder: Encoder,
    *,
    newer_only: bool = False,
    report: Report | None = None,
) -> PassReport:
    """One pass: embed again every row whose version the shadow lacks and delete ids the
    source no longer has (``newer_only``: only versions newer than the shadow's, no deletes:
    the pass after the switch, when new-model workers may write there too)."""
    started = time.monotonic()
    have, want = _signatures(shadow), _signatures(source)
    todo = [
        i
        for i, v in want.items()
        if i not in have
        or (have[i] != v and (not newer_only or _version_key(v) > _version_key(have[i])))
    ]
    gone = [] if newer_only else [i for i in have if i not in want]
    result = PassReport(total=len(want), todo=len(todo))
    for chunk in _chunks(todo, 512):
        rows = source.get(chunk, with_vectors=False)
        result.copied += shadow.upsert(_embedded(rows, encoder, result))
        if report is not None:
            done = min(result.copied + len(result.failed), len(todo))
            report(done, len(todo), time.monotonic() - started)
    shadow.delete(gone)
    result.deleted = len(gone)
    result.elapsed_s = time.monotonic() - started
    return result


def _chunks(ids: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _embedded(rows: list[dict[str, Any]], encoder: Encoder, result: PassReport) -> list[Row]:
    """Rows as the new model embeds them, in model batches of similar lengths; a text the
    model fails on alone is logged and left out (the shadow then lacks that id)."""
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
    result: PassReport,
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
        version=str(row.get("version", "")),
        sparse=sparse,
    )
