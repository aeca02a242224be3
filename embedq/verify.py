"""``embedq verify``: does Milvus hold what the index says it holds?

The index (``P:index:C``, written by workers only after Milvus confirmed a write) records,
per id, the version and content hash of its row, or that it was deleted. ``verify`` reads
the whole index and every row's id, content hash and version, and reports the drift:

* ``missing``: the index says the id has a row; Milvus has none (deleted behind its back);
* ``changed``: the row's content hash or version is not the index's (written behind its
  back, or a stale write that was not repaired);
* ``unknown``: a row the index does not know, or knows as deleted.

``repair`` sends the entry that the index's version names again (from the stream, so it
is re-embedded and written in order like any entry), and an ``op=delete`` for every unknown
row. An entry trimmed from the stream cannot be sent again: it is reported, and the
producer must re-send that id. Run it after a drain: a write in flight looks like drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from embedq.keys import partition_for
from embedq.redis_connection import translated
from embedq.sink import Sink
from embedq.stream import Stream
from embedq.versions import Held, Versions


@dataclass
class Drift:
    rows: int = 0  # rows Milvus holds
    indexed: int = 0  # ids the index knows (deleted ones included)
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    unversioned: bool = False  # the collection predates versioned rows: only ids compared

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
    index = _index(streams, sink.collection)
    drift = Drift(indexed=len(index), unversioned=not sink.versioned)
    seen: set[str] = set()
    for row in sink.rows():
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
    drift.missing = sorted(i for i, (h, _) in index.items() if not h.deleted and i not in seen)
    drift.unknown.sort()
    drift.changed.sort()
    return drift, index


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
