"""The dead-letter stream, as ``embedq dlq`` shows and repairs it.

A dead-letter entry (on ``<stream>:dlq``) is the original entry's fields, bytes kept
exactly, plus ``_dlq_*`` fields the dead-letter script adds: ``_dlq_reason``,
``_dlq_error``, ``_dlq_source_id`` (the entry id on the tasks stream),
``_dlq_stream``, ``_dlq_deliveries``, ``_dlq_consumer`` and ``_dlq_at_ms``.

``retry`` re-enqueues the original fields as a new entry on the tasks stream (a fresh
delivery count) and removes the dead-letter entry, atomically; fix the cause first (a
model, a policy such as ``--on-overlong``, an outage), or the entry comes straight back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from embedq.stream import Entry, Stream

DLQ_PREFIX = b"_dlq_"
PAGE = 500


def _show(value: bytes) -> str:
    """A field value for a terminal: UTF-8 as is, anything else as escaped bytes."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value)


@dataclass(frozen=True)
class DeadLetter:
    dlq_id: str
    reason: str
    error: str
    source_id: str
    deliveries: int
    consumer: str
    at_ms: int
    original: dict[bytes, bytes]

    @classmethod
    def from_entry(cls, entry: Entry) -> DeadLetter:
        f = entry.fields

        def get(name: str) -> str:
            return f.get(b"_dlq_" + name.encode(), b"").decode("utf-8", "replace")

        return cls(
            dlq_id=entry.entry_id,
            reason=get("reason"),
            error=get("error"),
            source_id=get("source_id"),
            deliveries=int(get("deliveries") or 0),
            consumer=get("consumer"),
            at_ms=int(get("at_ms") or 0),
            original={k: v for k, v in f.items() if not k.startswith(DLQ_PREFIX)},
        )

    @property
    def doc_id(self) -> str:
        """The producer's id, when the entry had a readable one."""
        raw = self.original.get(b"id")
        return _show(raw) if raw is not None else ""

    def age_s(self, now_ms: int | None = None) -> float:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return max(0.0, (now - self.at_ms) / 1000)

    def summary(self) -> dict[str, Any]:
        """What ``dlq list --json`` prints per entry."""
        return {
            "dlq_id": self.dlq_id,
            "id": self.doc_id,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "age_s": round(self.age_s(), 1),
            "source_id": self.source_id,
        }

    def as_dict(self) -> dict[str, Any]:
        """What ``dlq show --json`` prints: everything, original fields made printable."""
        return {
            **self.summary(),
            "error": self.error,
            "consumer": self.consumer,
            "at_ms": self.at_ms,
            "fields": {_show(k): _show(v) for k, v in self.original.items()},
        }


def iter_dead_letters(stream: Stream, reason: str | None = None) -> Iterator[DeadLetter]:
    """Every dead-letter entry present when called, oldest first, optionally one reason."""
    last = stream.dlq_last_id()
    if last is None:
        return
    start = "-"
    while True:
        page = stream.dlq_entries(start, PAGE)
        for entry in page:
            letter = DeadLetter.from_entry(entry)
            if reason is None or letter.reason == reason:
                yield letter
            if entry.entry_id == last:
                return
        if len(page) < PAGE:
            return
        start = "(" + page[-1].entry_id  # exclusive: the next page starts after this one


def show(stream: Stream, dlq_id: str) -> DeadLetter | None:
    entry = stream.dlq_entry(dlq_id)
    return DeadLetter.from_entry(entry) if entry is not None else None


def retry(stream: Stream, dlq_ids: Sequence[str]) -> dict[str, str]:
    """Send these dead-letter entries back to the tasks stream; dead-letter id -> new id."""
    sent: dict[str, str] = {}
    for i in range(0, len(dlq_ids), PAGE):
        sent.update(stream.dlq_retry(dlq_ids[i : i + PAGE]))
    return sent


def purge(stream: Stream, dlq_ids: Sequence[str] | None = None) -> int:
    """Delete these dead-letter entries, or (``None``) the whole dead-letter stream."""
    if dlq_ids is None:
        return stream.dlq_purge()
    return sum(stream.dlq_delete(dlq_ids[i : i + PAGE]) for i in range(0, len(dlq_ids), PAGE))
