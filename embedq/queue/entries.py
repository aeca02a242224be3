"""A stream entry as read from Redis, and the reply shapes that carry entries.

Shared by the consumer-group access (``embedq.queue.stream``), the dead-letter stream
(``embedq.queue.dlq``) and the job ledger (``embedq.queue.jobs``), which all read entries
but must not depend on one another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

RawEntry = tuple[bytes, dict[bytes, bytes] | None]


@dataclass(frozen=True)
class Entry:
    """A stream entry as read: its id and raw fields (empty when the payload was deleted)."""

    entry_id: str
    fields: dict[bytes, bytes] = field(default_factory=dict)


def text(value: bytes | str | None) -> str | None:
    """A Redis reply value as text (None stays None)."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def as_entries(raw: Iterable[RawEntry]) -> list[Entry]:
    """XRANGE / XREADGROUP entries as ``Entry`` values (redis-py's fresh dicts kept as
    they are: no copy per entry)."""
    return [
        Entry(eid.decode(), fields if type(fields) is dict else dict(fields or {}))
        for eid, fields in raw
    ]


def pairs(fields: Any) -> dict[bytes, bytes]:
    """XAUTOCLAIM via execute_command returns fields as a flat list (or None if deleted)."""
    if not fields:
        return {}
    if isinstance(fields, dict):
        return dict(fields)
    return {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}


def entry_order(entry_id: str) -> tuple[int, int]:
    """A sortable form of a stream entry id (``ms-seq``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def load_script(name: str) -> str:
    """The text of ``embedq/queue/lua/<name>``; each script is registered once by its owner."""
    return (files("embedq.queue") / "lua" / name).read_text(encoding="utf-8")
