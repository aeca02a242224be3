"""In-memory stand-ins for the stream, the job ledger and the sink (dramatiq's StubBroker is
the model): the settle / batch / split logic runs against them in milliseconds, and the
failures a real Redis or Milvus can't be made to produce on demand (a row refused after
the third call, an outage of exactly two calls) are produced here. The real-process tests
prove the wiring; these prove the decisions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedq.core.errors import SinkRejected, SinkUnavailable
from embedq.core.keys import Keys
from embedq.queue.entries import Entry
from embedq.sink.columns import Columns
from embedq.sink.milvus import Row

FIELDS = ("id", "vector", "text", "meta", "content_hash", "version")


@dataclass
class StubDeadLetters:
    stream: StubStream
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # entry id, reason, error

    def move(self, entry: Entry, reason: str, error: str = "", deliveries: int = 1) -> bool:
        if entry.entry_id not in self.stream.pending:
            return False
        self.stream.pending.discard(entry.entry_id)
        self.stream.events.append(("dead_letter", entry.entry_id))
        self.moved.append((entry.entry_id, reason, error))
        return True


class StubStream:
    """One partition stream of a consumer group: what was delivered, acked, dead-lettered."""

    def __init__(self, name: str = "stub:tasks") -> None:
        self.keys = Keys(name)
        self.pending: set[str] = set()
        self.acked: list[str] = []
        self.errors: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []
        self.dlq = StubDeadLetters(self)
        self._seq = 0

    def deliver(self, *fields: dict[bytes, bytes]) -> list[Entry]:
        """New entries, as XREADGROUP would hand them to this consumer."""
        out = []
        for f in fields:
            self._seq += 1
            entry = Entry(f"1-{self._seq}", f)
            self.pending.add(entry.entry_id)
            out.append(entry)
        return out

    def ack(self, entry_ids: Sequence[str]) -> int:
        n = 0
        for eid in entry_ids:
            self.events.append(("ack", eid))
            if eid in self.pending:
                self.pending.discard(eid)
                self.acked.append(eid)
                n += 1
        return n

    def record_error(self, entry_ids: Sequence[str], error: str) -> None:
        for eid in entry_ids:
            self.errors[eid] = error


class StubLedger:
    def __init__(self) -> None:
        self.embedded: list[str] = []
        self.dead_lettered: list[str] = []
        self.tokens = 0

    def record_embedded(
        self, entries: Sequence[Entry], tokens: Mapping[str, int] | None = None
    ) -> None:
        self.embedded += [e.entry_id for e in entries]
        self.tokens += sum((tokens or {}).values())

    def record_dead_lettered(self, entry: Entry) -> None:
        self.dead_lettered.append(entry.entry_id)


class StubSink:
    """Rows by id. ``reject(row)`` refuses a row as Milvus refuses invalid data (the whole
    call fails); ``outages`` makes that many next calls fail as unreachable."""

    collection = "stub"
    target = "stub"  # the collection writes go to (the settler tags vector digests with it)
    sparse = False

    def __init__(
        self, reject: Callable[[Row], bool] = lambda _row: False, events: list[Any] | None = None
    ) -> None:
        self.rows: dict[str, Row] = {}
        self.deleted: list[str] = []
        self.reject = reject
        self.outages = 0
        self.calls = 0
        self.events = events if events is not None else []

    def upsert(self, rows: Sequence[Row]) -> int:
        self.calls += 1
        if self.outages:
            self.outages -= 1
            raise SinkUnavailable("milvus unavailable during upsert: stub outage")
        bad = [r.id for r in rows if self.reject(r)]
        if bad:
            raise SinkRejected(f"milvus rejected the upsert: invalid row {bad[0]}")
        for row in rows:
            self.rows[row.id] = row
            self.events.append(("write", row.id))
        return len(rows)

    def upsert_columns(self, columns: Columns) -> int:
        return self.upsert(
            [
                Row(
                    r["id"],
                    np.asarray(r["vector"], dtype=np.float32),
                    r["text"],
                    r["meta"],
                    r["content_hash"],
                    r["version"],
                )
                for r in columns.rows(FIELDS)
            ]
        )

    def delete(self, ids: Sequence[str]) -> None:
        self.calls += 1
        for doc_id in ids:
            self.rows.pop(doc_id, None)
            self.deleted.append(doc_id)
            self.events.append(("delete", doc_id))


class HeldForward:
    """A stand-in for a bulk forward pass that takes as long as a test wants: with
    ``Encoder.forward`` patched to ``method()``, every pass a bulk model thread
    (``embedq-model-0``, ``-1``...) runs waits until ``release()``; the lane's model thread
    (``embedq-model-lane``) and every other thread run the real model at once."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self._forward = forward
        self.entered = threading.Event()  # a bulk pass is in progress (held)
        self._released = threading.Event()

    def method(self) -> Callable[..., Any]:
        def forward(encoder: Any, batch: Any) -> Any:
            name = threading.current_thread().name
            if name.startswith("embedq-model-") and name != "embedq-model-lane":
                self.entered.set()
                self._released.wait(timeout=120)
            return self._forward(encoder, batch)

        return forward

    @property
    def held(self) -> bool:
        return self.entered.is_set() and not self._released.is_set()

    def release(self) -> None:
        self._released.set()
