"""``embedq verify``: does Milvus hold what the index says it holds?

The index (``P:index:C``, written by workers only after Milvus confirmed a write) records,
per id, the version and content hash of its row, or that it was deleted. ``verify`` reads
the whole index and every row's id, content hash and version, and reports the drift:

* ``missing``: the index says the id has a row; Milvus has none (deleted behind its back);
* ``changed``: the row's content hash or version is not the index's (written behind its
  back, or a stale write that was not repaired), or its vectors are not those the worker
  wrote (``vector_changed``, a subset: the index entry's vector digest, ``embedq.sink.digest``,
  differs from the row's; entries from workers that recorded no digest are not compared),
  or, with ``--sample N``, the configured model embeds its text to another vector
  (``sample_mismatch``, a subset: ``embedq.ops.sampling``);
* ``unknown``: a row the index does not know, or knows as deleted.

``repair`` sends the entry that the index's version names again (from the stream, so it
is re-embedded and written in order like any entry), and an ``op=delete`` for every unknown
row. An entry trimmed from the stream cannot be sent again: it is reported, and the
producer must re-send that id. Run it after a drain: a write in flight looks like drift.

Deletes trust the index, and an index that is not this collection's (Redis lost its data;
another ``--stream``, ``--partitions`` or ``--redis-url``) makes every row look unknown:
``refuse_unproven`` stops such a repair before it sends anything, and bounds a legitimate
one by ``--max-delete`` (``embedq.core.deletes``). ``adopt`` rebuilds the index from the rows
after Redis lost its data (``embedq.sink.epoch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from embedq.core.deletes import MaxDelete
from embedq.core.errors import DeletesRefused
from embedq.core.keys import partition_for
from embedq.ops.sampling import Sample
from embedq.queue.connection import translated
from embedq.queue.stream import Stream
from embedq.queue.versions import Held, Versions
from embedq.sink.digest import collection_tag, digest_tag, row_digest
from embedq.sink.milvus import Sink

Index = dict[str, tuple[Held, Stream]]  # id -> its index entry and partition stream


@dataclass
class Drift:
    rows: int = 0  # rows Milvus holds
    indexed: int = 0  # ids the index knows (deleted ones included)
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    unversioned: bool = False  # the collection predates versioned rows: only ids compared
    # Of ``changed``: the vectors' digest is not the index's (issue 25); and, with --sample,
    # rows whose text the model embeds to another vector (``with_sample``).
    vector_changed: list[str] = field(default_factory=list)
    sample: Sample | None = None

    @property
    def clean(self) -> bool:
        return not (self.missing or self.changed or self.unknown)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "indexed": self.indexed,
            "missing": self.missing,
            "changed": self.changed,
            "unknown": self.unknown,
            "unversioned": self.unversioned,
            "vector_changed": self.vector_changed,
            **_sample_report(self.sample),
            "clean": self.clean,
        }


@dataclass(frozen=True)
class Repair:
    resent: int
    deleted: int
    unrepairable: list[str]  # ids whose entry was trimmed from the stream


def _index(streams: Sequence[Stream], collection: str) -> dict[str, tuple[Held, Stream]]:
    found: dict[str, tuple[Held, Stream]] = {}
    for stream in streams:
        for doc_id, held in Versions(stream.client, stream.keys, collection).scan():
            found[doc_id] = (held, stream)
    return found


def verify(streams: Sequence[Stream], sink: Sink) -> tuple[Drift, dict[str, tuple[Held, Stream]]]:
    """The drift between the index and the collection (and the index, for ``repair``)."""
    index = _index(streams, sink.index_name)  # the physical collection's index
    drift = Drift(indexed=len(index), unversioned=not sink.versioned)
    seen: set[str] = set()
    tag = collection_tag(sink.target)
    with_vectors = _has_digests(index, tag)
    for row in sink.rows(vectors=with_vectors):
        drift.rows += 1
        doc_id = str(row["id"])
        seen.add(doc_id)
        entry = index.get(doc_id)
        if entry is None or entry[0].deleted:
            drift.unknown.append(doc_id)
            continue
        held = entry[0]
        versioned = (row.get("content_hash"), row.get("version"))
        if sink.versioned and versioned != (held.content_hash, held.version):
            drift.changed.append(doc_id)
        elif with_vectors and _vector_changed(row, held, sink, tag):
            drift.changed.append(doc_id)
            drift.vector_changed.append(doc_id)
    drift.missing = sorted(i for i, (h, _) in index.items() if not h.deleted and i not in seen)
    drift.unknown.sort()
    drift.changed.sort()
    drift.vector_changed.sort()
    return drift, index


# -- vectors (issue 25): the digest each worker recorded, and --sample ---------------------


def _has_digests(index: dict[str, tuple[Held, Stream]], tag: str) -> bool:
    """Whether any index entry carries a digest of this collection's vectors: only then are
    rows listed with their vectors (a listing several times larger)."""
    return any(digest_tag(held.vector_digest) == tag for held, _ in index.values())


def _vector_changed(row: dict[str, Any], held: Held, sink: Sink, tag: str) -> bool:
    """The row's vectors are not those the index's digest was computed from. An entry
    without a digest (an older worker) or with another collection's tag (written before
    ``embedq migrate`` moved the alias) is not compared."""
    if digest_tag(held.vector_digest) != tag:
        return False
    found = row_digest(row, tag, dense=sink.dimension != 0, sparse=sink.sparse)
    return found != held.vector_digest


def with_sample(drift: Drift, sample: Sample) -> None:
    """Add ``embedq.ops.sampling``'s result: a mismatched row is ``changed`` (``repair`` sends
    its entry again, so the configured model embeds it anew)."""
    drift.sample = sample
    drift.changed = sorted({*drift.changed, *sample.mismatched})


def _sample_report(sample: Sample | None) -> dict[str, Any]:
    if sample is None:
        return {}
    return {
        "sampled": sample.sampled,
        "sample_mismatch": sample.mismatched,
        "unsampleable": sample.unsampleable,
        "sample_min_cosine": sample.min_cosine,
    }


def repair(
    drift: Drift, index: dict[str, tuple[Held, Stream]], streams: Sequence[Stream]
) -> Repair:
    """Send again what drifted, through the stream (see the module doc); ``streams`` are
    every partition stream, in order."""
    resent, unrepairable = 0, []
    for doc_id in [*drift.missing, *drift.changed]:
        held, stream = index[doc_id]
        with translated("repair"):
            found: Any = stream.client.xrange(stream.keys.stream, held.version, held.version)
            if not found:
                unrepairable.append(doc_id)
                continue
            stream.client.xadd(stream.keys.stream, found[0][1])
        resent += 1
    for doc_id in drift.unknown:
        stream = streams[partition_for(doc_id, len(streams))]
        with translated("repair delete"):
            stream.client.xadd(stream.keys.stream, {"id": doc_id, "op": "delete"})
    return Repair(resent=resent, deleted=len(drift.unknown), unrepairable=unrepairable)


# -- guards on repair, and adopting the collection after Redis lost its data (issue 25) ----


def refuse_unproven(
    drift: Drift,
    index: Index,
    streams: Sequence[Stream],
    max_delete: MaxDelete,
    *,
    lost: str = "",
) -> None:
    """Raise ``DeletesRefused`` before ``repair`` sends anything, when the deletes it would
    send rest on evidence it cannot trust (the message says which, and what to do):

    * ``lost``: the epoch's line (``embedq.sink.epoch``) when Redis lost its data and the
      operator did not accept it: the rows are valid, the index forgot them;
    * the index holds no row at all, or ids sit on partition streams ``--partitions`` does
      not put them on: this is not the index of this collection (a lost Redis, another
      ``--stream``, ``--partitions`` or ``--redis-url``);
    * more deletes than ``max_delete`` allows of the collection's rows.

    A refused repair sends nothing, not even the resends of missing or changed rows: the
    operator reruns it once the evidence is fixed, as after a failed ``terraform plan``."""
    doomed = len(drift.unknown)
    if not doomed:
        return
    what = f"refused to delete {doomed} of {drift.rows} rows unknown to the index"
    if lost:
        raise DeletesRefused(
            f"{what}: {lost}. Nothing was sent; after re-sending everything from the "
            "source, --accept-redis-loss repairs anyway"
        )
    deployment = f"stream {streams[0].keys.base} with --partitions {len(streams)}"
    if not any(not held.deleted for held, _ in index.values()):
        raise DeletesRefused(
            f"{what}: the index of {deployment} holds no row of this collection (Redis lost "
            "its data, or --redis-url/--stream/--partitions name another deployment). "
            "Nothing was sent; run `embedq verify --adopt` (or drop the collection to empty it)"
        )
    misplaced = _misplaced(index, streams)
    if misplaced:
        raise DeletesRefused(
            f"{what}: {misplaced} is in the index of a partition stream that --partitions "
            f"{len(streams)} does not put it on: --partitions is not the producers'. "
            "Nothing was sent"
        )
    max_delete.check(doomed, drift.rows, "rows unknown to the index")


def _misplaced(index: Index, streams: Sequence[Stream]) -> str:
    """An id (and its stream) found on another partition than ``partition_for`` names."""
    position = {s.keys.stream: i for i, s in enumerate(streams)}
    for doc_id, (_, stream) in index.items():
        if position.get(stream.keys.stream) != partition_for(doc_id, len(streams)):
            return f"id {doc_id!r} (on {stream.keys.stream})"
    return ""


@dataclass(frozen=True)
class Adopted:
    rows: int  # rows the collection holds
    written: int  # index entries written from them
    kept: int  # entries left as they were: the index already holds that version or a newer
    foreign: int  # rows with no version in a versioned collection: not embedq's, left unknown


def adopt(streams: Sequence[Stream], sink: Sink, chunk: int = 1000) -> Adopted:
    """``embedq verify --adopt``: rebuild the index from the rows the collection holds
    (id, content hash, version, vector digest; no re-embedding), each on its partition's
    index, never over an entry as new or newer (a worker may be running: ``adopt.lua``); then record
    Redis's epoch in the collection, so the two sides agree again (``embedq.sink.epoch``).

    A row of a collection that predates versioned rows is adopted as version ``0-0`` with
    no content hash: any later entry for it is newer, and dedup re-embeds it. A row without
    a version in a versioned collection was written behind embedq's back: it stays
    unknown (``foreign``)."""
    from embedq.queue.entries import load_script
    from embedq.sink import epoch

    script = streams[0].client.register_script(load_script("adopt.lua"))
    waiting: dict[int, list[str]] = {i: [] for i in range(len(streams))}
    rows = written = foreign = 0

    def flush(i: int) -> None:
        nonlocal written
        if waiting[i]:
            with translated("adopt index"):
                keys = [streams[i].keys.index(sink.index_name)]
                written += int(script(keys=keys, args=waiting[i], client=streams[i].client))
            waiting[i] = []

    tag, dense = collection_tag(sink.target), sink.dimension != 0
    for row in sink.rows(vectors=True):  # Milvus is the truth now: its vectors' digests too
        rows += 1
        if sink.versioned and not row.get("version"):
            foreign += 1
            continue
        doc_id = str(row["id"])
        i = partition_for(doc_id, len(streams))
        digest = row_digest(row, tag, dense=dense, sparse=sink.sparse)
        version, content_hash = str(row.get("version") or "0-0"), str(row.get("content_hash", ""))
        waiting[i] += [doc_id, version, content_hash, digest]
        if len(waiting[i]) >= 4 * chunk:
            flush(i)
    for i in waiting:
        flush(i)
    epoch.accept(streams, sink)
    return Adopted(rows, written, kept=rows - written - foreign, foreign=foreign)
