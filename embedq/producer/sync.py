"""Document sync: what ``enqueue --doc-field F --cleanup incremental|full`` deletes.

The semantics of LangChain's indexing API, which users know: every record names its
document (``meta[F]``). Across runs a ledger remembers which ids each document had; at the
end of a run that sent everything,

* ``incremental``: for every document seen in this run, the ids it had before and no
  longer has are deleted (a re-chunked document that shrank leaves no old chunks);
* ``full``: also every id of every document *not* seen in this run is deleted (the source
  is a full snapshot: a document missing from it was removed).

Only what the source really dropped is deleted (issue 25):

* an id written in this run is never deleted, whichever document it moved from (as
  LangChain deletes only keys not written in the run); the ledger records it under the
  document it is in now;
* a rejected record (too long, no text) that names its document keeps every earlier id of
  that document: its old row stays instead of vanishing with the typo;
* a rejected record that names no document could belong to any: the run deletes nothing;
* past ``max_delete`` (10% of the ledger's ids by default) nothing is deleted and the
  ledger is left as it was (``DeletesRefused``).

Deletes go through the stream as ``op=delete`` entries, ordered with the upserts of their
ids (``embedq.queue.versions``). The ledger (``S:docs:C``, a hash: document -> a JSON list of its
ids) is updated only after the run sent everything, so a failed run deletes nothing and a
re-run computes the same cleanup. It records what the producer said; what Milvus holds for
each id is the index (``P:index:C``), which only workers write, after Milvus confirmed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from embedq.core.deletes import DEFAULT, MaxDelete
from embedq.core.errors import ConfigError
from embedq.core.keys import Keys
from embedq.core.records import Record
from embedq.queue.connection import translated

Cleanup = Literal["incremental", "full"]


@dataclass
class Plan:
    """What a run's cleanup does: ids to delete, the ledger's new entries (an empty list
    forgets the document), and, when it deletes nothing on purpose, why."""

    doomed: list[str]
    entries: dict[str, list[str]]
    ledger_ids: int
    skipped: str = ""


@dataclass
class DocSync:
    """One run's documents and their ids, and the cleanup they imply."""

    client: redis.Redis
    stream: str
    collection: str
    doc_field: str
    cleanup: Cleanup
    max_delete: MaxDelete = field(default_factory=lambda: MaxDelete.parse(DEFAULT))
    where: dict[str, str] = field(default_factory=dict)  # id -> its document in this run
    seen: set[str] = field(default_factory=set)  # documents this run wrote to
    held: set[str] = field(default_factory=set)  # documents with a rejected record
    unnamed: int = 0  # rejected records that name no document

    def __post_init__(self) -> None:
        if self.cleanup not in ("incremental", "full"):
            raise ConfigError(f"--cleanup {self.cleanup}: use incremental or full")

    @property
    def key(self) -> str:
        return Keys(self.stream).docs(self.collection)

    def see(self, record: Record) -> str | None:
        """Note ``record``'s document; a reason to reject it when it names none."""
        doc = self._document(record.meta)
        if doc is None:
            return f"no meta field {self.doc_field!r} naming its document (--doc-field)"
        self.seen.add(doc)
        self.where[record.id] = doc  # the last write of an id wins, in Milvus as here
        return None

    def rejected(self, meta: dict[str, Any] | None) -> None:
        """Note a record that was not sent: its document keeps every id it had."""
        doc = self._document(meta)
        if doc is None:
            self.unnamed += 1
        else:
            self.held.add(doc)

    def plan(self) -> Plan:
        """The cleanup this run implies, checked against ``max_delete``."""
        doomed: list[str] = []
        entries: dict[str, list[str]] = {}
        now: dict[str, set[str]] = {}
        for doc_id, doc in self.where.items():
            now.setdefault(doc, set()).add(doc_id)
        ledger_ids = 0
        skipped = ""
        if self.unnamed:  # any document's chunk, for all we know: its rows must stay
            one = self.unnamed == 1
            skipped = (
                f"no cleanup in this run: {self.unnamed} rejected "
                f"{'record names' if one else 'records name'} no document"
            )
        for doc, before in self._ledger():
            ledger_ids += len(before)
            kept = {i for i in before if i not in self.where}  # not written in this run
            cleaned = doc in self.seen or self.cleanup == "full"
            if cleaned and not skipped and doc not in self.held:
                doomed += sorted(kept)
                kept = set()
            after = kept | now.pop(doc, set())
            if after != before:
                entries[doc] = sorted(after)
        entries |= {doc: sorted(ids) for doc, ids in now.items()}
        if doomed:
            self.max_delete.check(len(doomed), ledger_ids, "ids in the document ledger")
        return Plan(doomed, entries, ledger_ids, skipped)

    def record(self, plan: Plan) -> None:
        """The ledger after a run that sent everything and its deletes."""
        pipe = self.client.pipeline(transaction=False)
        for doc, ids in plan.entries.items():
            if ids:
                pipe.hset(self.key, doc, json.dumps(ids, ensure_ascii=False))
            else:
                pipe.hdel(self.key, doc)
            if len(pipe) >= 1000:
                with translated("record documents"):
                    pipe.execute()
        with translated("record documents"):
            pipe.execute()

    def _document(self, meta: dict[str, Any] | None) -> str | None:
        doc = (meta or {}).get(self.doc_field)
        return None if doc is None or doc == "" else str(doc)

    def _ledger(self) -> list[tuple[str, set[str]]]:
        with translated("HSCAN documents"):
            return [
                (doc.decode(), set(json.loads(ids)))
                for doc, ids in self.client.hscan_iter(self.key, count=1000)
            ]
