"""The dead-letter stream, as ``embedq dlq`` shows and repairs it.

A dead-letter entry (on ``<stream>:dlq``) is the original entry's fields, bytes kept
exactly, plus ``_dlq_*`` fields the dead-letter script adds: ``_dlq_reason``,
``_dlq_error``, ``_dlq_source_id`` (the entry id on the tasks stream),
``_dlq_stream``, ``_dlq_deliveries``, ``_dlq_consumer`` and ``_dlq_at_ms``; a field over
64 KiB is cut to its first KiB and named in ``_dlq_truncated`` (``name:bytes``), and such
an entry cannot be retried.

``retry`` re-enqueues the original fields as a new entry on the tasks stream (a fresh
delivery count) and removes the dead-letter entry, atomically; fix the cause first (a
model, a policy such as ``--on-overlong``, an outage), or the entry comes straight back.

With ``--partitions N`` each partition stream has its own dead-letter stream, and the
functions here take all of them (``partitions``: a ``DeadLetterQueue`` per partition stream, one
without partitions). Entry ids are unique only within one stream, so a partitioned dead
letter is named ``<i>/<id>`` (its partition, then its id): two partitions can dead-letter
in the same millisecond, and a bare id that matched both would retry or purge the wrong one.
"""

from __future__ import annotations

import heapq
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from embedq.core.errors import ConfigError
from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.entries import Entry, as_entries, entry_order, load_script, text

DLQ_PREFIX = b"_dlq_"
PAGE = 500
ERROR_LIMIT = 2000  # characters of the error kept in ``_dlq_error``
KEEP_FIELD_BYTES = 65_536  # a field larger than this is cut in the dead-letter copy ...
KEPT_HEAD_BYTES = 1024  # ... to its first KiB, and named in ``_dlq_truncated``


class DeadLetterQueue:
    """The dead-letter stream of one tasks (partition) stream: the one place that writes
    a dead-letter entry (``move``) and reads one back (``DeadLetter.from_entry``)."""

    def __init__(self, client: redis.Redis, keys: Keys, group: str, consumer: str) -> None:
        self.client = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self._move = client.register_script(load_script("dead_letter.lua"))
        self._retry = client.register_script(load_script("dlq_retry.lua"))

    def move(self, entry: Entry, reason: str, error: str = "", deliveries: int = 1) -> bool:
        """Copy ``entry`` here with why, and ack it on the tasks stream: one atomic script.
        False when it was no longer pending (someone else settled it): nothing written."""
        args: list[bytes | str | int] = [self.group, entry.entry_id]
        cut = []
        for name, value in entry.fields.items():
            if len(value) > KEEP_FIELD_BYTES:
                # A 1 MB text dead-lettered for its size would be stored twice; its head is
                # enough to recognise it. `dlq retry` refuses such an entry (it is not the
                # original any more): re-send it from the source.
                cut.append(f"{name.decode('utf-8', 'replace')}:{len(value)}")
            args += [name, value[:KEPT_HEAD_BYTES] if len(value) > KEEP_FIELD_BYTES else value]
        schema: dict[str, str | int] = {
            "reason": reason,
            "error": error[:ERROR_LIMIT],
            "source_id": entry.entry_id,
            "stream": self.keys.stream,
            "deliveries": deliveries,
            "consumer": self.consumer,
            "at_ms": int(time.time() * 1000),
        }
        if cut:
            schema["truncated"] = ",".join(cut)
        for field, why in schema.items():
            args += [DLQ_PREFIX + field.encode(), why]
        with translated("dead-letter"):
            return bool(
                self._move(keys=[self.keys.stream, self.keys.dlq, self.keys.errors], args=args)
            )

    def length(self) -> int:
        with translated("XLEN dlq"):
            return int(self.client.xlen(self.keys.dlq))

    def entries(self, start: str = "-", count: int = 100) -> list[Entry]:
        """Dead-letter entries from ``start`` (inclusive), oldest first."""
        with translated("XRANGE dlq"):
            raw: Any = self.client.xrange(self.keys.dlq, min=start, max="+", count=count)
        return as_entries(raw)

    def entry(self, dlq_id: str) -> Entry | None:
        with translated("XRANGE dlq"):
            raw: Any = self.client.xrange(self.keys.dlq, min=dlq_id, max=dlq_id)
        found = as_entries(raw)
        return found[0] if found else None

    def last_id(self) -> str | None:
        with translated("XREVRANGE dlq"):
            raw: Any = self.client.xrevrange(self.keys.dlq, count=1)
        return raw[0][0].decode() if raw else None

    def retry(self, dlq_ids: Sequence[str]) -> dict[str, str]:
        """Re-enqueue the original fields of these dead-letter entries and remove them from
        the dead-letter stream, atomically. Returns dead-letter id -> new entry id for each
        one sent back (ids not found, or with no original fields, are absent)."""
        if not dlq_ids:
            return {}
        with translated("dlq retry"):
            flat: Any = self._retry(keys=[self.keys.stream, self.keys.dlq], args=list(dlq_ids))
        found = [(text(flat[i]) or "", text(flat[i + 1]) or "") for i in range(0, len(flat), 2)]
        return {old: new for old, new in found if new}

    def delete(self, dlq_ids: Sequence[str]) -> int:
        if not dlq_ids:
            return 0
        with translated("XDEL dlq"):
            return int(self.client.xdel(self.keys.dlq, *dlq_ids))

    def purge(self) -> int:
        """Delete the whole dead-letter stream; returns how many entries it held."""
        with translated("purge dlq"):
            pipe = self.client.pipeline(transaction=True)
            pipe.xlen(self.keys.dlq)
            pipe.delete(self.keys.dlq)
            length, _ = pipe.execute()
        return int(length)


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
    stream: str = ""  # the tasks stream whose dead-letter stream holds it
    partition: int | None = None  # its partition, when there are several

    @classmethod
    def from_entry(cls, entry: Entry, stream: str = "", partition: int | None = None) -> DeadLetter:
        f = entry.fields

        def get(name: str) -> str:
            return f.get(DLQ_PREFIX + name.encode(), b"").decode("utf-8", "replace")

        return cls(
            dlq_id=entry.entry_id,
            reason=get("reason"),
            error=get("error"),
            source_id=get("source_id"),
            deliveries=int(get("deliveries") or 0),
            consumer=get("consumer"),
            at_ms=int(get("at_ms") or 0),
            original={k: v for k, v in f.items() if not k.startswith(DLQ_PREFIX)},
            stream=stream,
            partition=partition,
        )

    @property
    def ref(self) -> str:
        """How ``embedq dlq`` names it: the id, or ``<partition>/<id>`` with partitions."""
        return self.dlq_id if self.partition is None else f"{self.partition}/{self.dlq_id}"

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
            "dlq_id": self.ref,
            "stream": self.stream,
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


Partitions = Sequence["DeadLetterQueue"]


def _partition_index(partitions: Partitions, partition: int) -> int | None:
    return partition if len(partitions) > 1 else None


def _letters(partitions: Partitions, partition: int, reason: str | None) -> Iterator[DeadLetter]:
    stream = partitions[partition]
    last = stream.last_id()
    if last is None:
        return
    start = "-"
    while True:
        page = stream.entries(start, PAGE)
        for entry in page:
            letter = DeadLetter.from_entry(
                entry, stream.keys.stream, _partition_index(partitions, partition)
            )
            if reason is None or letter.reason == reason:
                yield letter
            if entry.entry_id == last:
                return
        if len(page) < PAGE:
            return
        start = "(" + page[-1].entry_id  # exclusive: the next page starts after this one


def iter_dead_letters(partitions: Partitions, reason: str | None = None) -> Iterator[DeadLetter]:
    """Every dead-letter entry present when called, oldest first (merged over partitions),
    optionally only one reason."""
    return heapq.merge(
        *(_letters(partitions, i, reason) for i in range(len(partitions))),
        key=lambda letter: entry_order(letter.dlq_id),
    )


# A stream entry id: milliseconds, and optionally "-" and a sequence number.
_ENTRY_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


def check_refs(refs: Sequence[str]) -> None:
    """Raise ``ConfigError`` for a name that cannot be a dead-letter entry's (Redis would
    answer "Invalid stream ID"): a document id given where a dead-letter id belongs, say."""
    bad = [ref for ref in refs if not _ENTRY_ID.fullmatch(ref.rpartition("/")[2])]
    if bad:
        raise ConfigError(
            f"{bad[0]!r} is not a dead-letter id: those look like 1718000000000-0 (with "
            "--partitions, 3/1718000000000-0), as `embedq dlq list` shows them"
        )


def locate(partitions: Partitions, refs: Sequence[str]) -> dict[str, tuple[int, Entry]]:
    """Where each dead-letter name is: name -> (partition, its entry). Names not found are absent.

    ``<i>/<id>`` names partition ``i``; a bare id is looked up in every partition and must
    be in exactly one (ConfigError otherwise, naming the candidates).
    """
    check_refs(refs)
    found: dict[str, tuple[int, Entry]] = {}
    for ref in refs:
        partition_text, slash, dlq_id = ref.rpartition("/")
        if slash:
            if not partition_text.isdigit() or int(partition_text) >= len(partitions):
                raise ConfigError(
                    f"dead-letter name {ref!r}: partition {partition_text!r} is not one of "
                    f"0..{len(partitions) - 1} (check --partitions)"
                )
            candidates = [int(partition_text)]
        else:
            candidates = list(range(len(partitions)))
        holders = [
            (i, entry) for i in candidates if (entry := partitions[i].entry(dlq_id)) is not None
        ]
        if len(holders) > 1:
            raise ConfigError(
                f"dead-letter id {ref} is in partitions {[i for i, _ in holders]}; name one, as "
                + " or ".join(f"{i}/{ref}" for i, _ in holders)
            )
        if holders:
            found[ref] = holders[0]
    return found


def show(partitions: Partitions, ref: str) -> DeadLetter | None:
    where = locate(partitions, [ref]).get(ref)
    if where is None:
        return None
    partition, entry = where
    return DeadLetter.from_entry(
        entry, partitions[partition].keys.stream, _partition_index(partitions, partition)
    )


def _by_partition(partitions: Partitions, refs: Sequence[str]) -> dict[int, dict[str, str]]:
    """The named entries that exist, grouped per partition: partition -> {entry id: name}."""
    grouped: dict[int, dict[str, str]] = {}
    for ref, (partition, entry) in locate(partitions, refs).items():
        grouped.setdefault(partition, {})[entry.entry_id] = ref
    return grouped


def retry(partitions: Partitions, refs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Send these dead-letter entries back to their tasks streams.

    Returns name -> (tasks stream, new entry id) for each one sent back; names not found,
    or entries with no original fields, are absent.
    """
    sent: dict[str, tuple[str, str]] = {}
    for partition, names in _by_partition(partitions, refs).items():
        stream = partitions[partition]
        ids = list(names)
        for i in range(0, len(ids), PAGE):
            for old, new in stream.retry(ids[i : i + PAGE]).items():
                sent[names[old]] = (stream.keys.stream, new)
    return sent


def purge(partitions: Partitions, refs: Sequence[str] | None = None) -> int:
    """Delete these dead-letter entries, or (``None``) every dead-letter stream."""
    if refs is None:
        return sum(stream.purge() for stream in partitions)
    removed = 0
    for partition, names in _by_partition(partitions, refs).items():
        ids = list(names)
        removed += sum(
            partitions[partition].delete(ids[i : i + PAGE]) for i in range(0, len(ids), PAGE)
        )
    return removed
