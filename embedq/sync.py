"""Document sync: what ``enqueue --doc-field F --cleanup incremental|full`` deletes.

The semantics of LangChain's indexing API, which users know: every record names its
document (``meta[F]``). Across runs a ledger remembers which ids each document had; at the
end of a run that sent everything,

* ``incremental``: for every document seen in this run, the ids it had before and no
  longer has are deleted (a re-chunked document that shrank leaves no old chunks);
* ``full``: also every id of every document *not* seen in this run is deleted (the source
  is a full snapshot: a document missing from it was removed).

Deletes go through the stream as ``op=delete`` entries, ordered with the upserts of their
ids (``embedq.versions``). The ledger (``S:docs:C``, a hash: document -> a JSON list of its
ids) is updated only after the run sent everything, so a failed run deletes nothing and a
re-run computes the same cleanup. It records what the producer said; what Milvus holds for
each id is the index (``P:index:C``), which only workers write, after Milvus confirmed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import redis

from embedq.errors import ConfigError
from embedq.keys import Keys
from embedq.records import Record
from embedq.redis_connection import translated

Cleanup = Literal["incremental", "full"]


@dataclass
class DocSync:
    """One run's documents and their ids, and the cleanup they imply."""

    client: redis.Redis
    stream: str
    collection: str
    doc_field: str
    cleanup: Cleanup
    seen: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cleanup not in ("incremental", "full"):
            raise ConfigError(f"--cleanup {self.cleanup}: use incremental or full")

    @property
    def key(self) -> str:
        return Keys(self.stream).docs(self.collection)

    def see(self, record: Record) -> str | None:
        """Note ``record``'s document; a reason to reject it when it names none."""
        doc = (record.meta or {}).get(self.doc_field)
        if doc is None or doc == "":
            return f"no meta field {self.doc_field!r} naming its document (--doc-field)"
        self.seen.setdefault(str(doc), set()).add(record.id)
        return None

    def stale_ids(self) -> tuple[list[str], list[str]]:
        """(ids to delete, documents to forget): what the ledger has that this run does not."""
        doomed: list[str] = []
        gone: list[str] = []
        for doc, before in self._ledger():
            now = self.seen.get(doc)
            if now is None:
                if self.cleanup == "full":
                    doomed += sorted(before)
                    gone.append(doc)
                continue
            doomed += sorted(before - now)
        return doomed, gone

    def record(self, gone: list[str]) -> None:
        """The ledger after a run that sent everything: this run's ids per document."""
        pipe = self.client.pipeline(transaction=False)
        for doc, ids in self.seen.items():
            pipe.hset(self.key, doc, json.dumps(sorted(ids), ensure_ascii=False))
        if gone:
            pipe.hdel(self.key, *gone)
        with translated("record documents"):
            pipe.execute()

    def _ledger(self) -> Iterator[tuple[str, set[str]]]:
        with translated("HSCAN documents"):
            for doc, ids in self.client.hscan_iter(self.key, count=1000):
                yield doc.decode(), set(json.loads(ids))
