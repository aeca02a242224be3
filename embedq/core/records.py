"""The stream contract: what an entry carries and how it is checked.

An entry on the tasks stream has these fields (all values are bytes on the wire):

``id``    required; the producer's document/chunk id, the Milvus primary key (≤ 512 bytes)
``text``  required; UTF-8, not blank, at most ``max_text_bytes``
``meta``  optional; a JSON object stored next to the vector (at most ``max_meta_bytes``)
``job``   optional; the enqueue job that sent it (see ``embedq jobs``)
``op``    optional; ``delete`` removes the id's row (no ``text`` needed), ordered with the
          id's upserts; absent (or ``upsert``) writes it

The Redis entry id is never the primary key, so a producer that retries an XADD
overwrites its own row instead of creating a second one.

On the producer's side, ``to_item`` turns a source row into a ``Record``, or a ``Rejected``
saying where it is and why it cannot be one (``embedq.producer.sources`` reads the rows).
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedq.core.errors import PoisonInput

if TYPE_CHECKING:
    from embedq.producer.sources import Fields

MAX_ID_BYTES = 512  # the VARCHAR primary key's max_length in the collection
UPSERT, DELETE = "upsert", "delete"


def content_hash(text: bytes, meta: bytes = b"") -> str:
    """What a row holds, as producers and workers both compute it: the text's UTF-8 bytes and
    the meta exactly as sent. ``--dedup`` skips a record whose id already holds this hash;
    the index ledger and ``embedq verify`` compare it with the row's."""
    return hashlib.blake2b(text + b"\x00" + meta, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Record:
    """One text to embed, as a producer hands it to ``Producer.enqueue``."""

    id: str
    text: str
    meta: dict[str, Any] | None = None
    job: str | None = None
    op: str = UPSERT

    @property
    def is_delete(self) -> bool:
        return self.op == DELETE

    def to_fields(self) -> dict[str, str]:
        fields = {"id": self.id, "text": self.text}
        if self.meta is not None:
            fields["meta"] = json.dumps(self.meta, ensure_ascii=False, separators=(",", ":"))
        if self.job:
            fields["job"] = self.job
        return fields


@dataclass(frozen=True)
class Limits:
    max_text_bytes: int = 1_000_000
    max_meta_bytes: int = 65_536


def _utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonInput(
            "invalid_utf8", f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _json(raw: str) -> Any:
    """Parse meta; hostile JSON (nesting past the parser's recursion limit, an integer of
    thousands of digits) is poison like any invalid JSON, never a crash."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PoisonInput("meta_not_object", f"meta is not valid JSON: {exc.msg}") from None
    except (RecursionError, ValueError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise PoisonInput("meta_not_object", f"meta cannot be parsed: {why}") from None


def decode(fields: Mapping[bytes, bytes], limits: Limits) -> Record:
    """Check an entry's fields against the contract; raise ``PoisonInput`` with a reason."""
    if not fields:
        raise PoisonInput("payload_deleted", "entry has no fields (trimmed or deleted)")
    raw_id = fields.get(b"id")
    if raw_id is None or raw_id == b"":
        raise PoisonInput("missing_id", "entry has no 'id' field")
    if len(raw_id) > MAX_ID_BYTES:
        raise PoisonInput("id_too_long", f"id is {len(raw_id)} bytes, the limit is {MAX_ID_BYTES}")
    doc_id = _utf8(raw_id, "id")
    raw_job = fields.get(b"job")
    job = raw_job.decode("utf-8", "replace") if raw_job else None
    op = fields.get(b"op", b"upsert")
    if op == b"delete":
        return Record(id=doc_id, text="", job=job, op=DELETE)
    if op != b"upsert":
        raise PoisonInput("unknown_op", f"op is {op[:40]!r}; use 'upsert' or 'delete'")
    raw_text = fields.get(b"text")
    if raw_text is None:
        raise PoisonInput("missing_text", "entry has no 'text' field")
    if len(raw_text) > limits.max_text_bytes:
        raise PoisonInput(
            "text_too_large", f"text is {len(raw_text)} bytes, the limit is {limits.max_text_bytes}"
        )
    text = _utf8(raw_text, "text")
    if not text or text.isspace():  # (strip() would copy the text to say the same)
        raise PoisonInput("empty_text", "text is empty or whitespace only")
    meta: dict[str, Any] | None = None
    raw_meta = fields.get(b"meta")
    if raw_meta is not None:
        if len(raw_meta) > limits.max_meta_bytes:
            raise PoisonInput(
                "meta_too_large",
                f"meta is {len(raw_meta)} bytes, the limit is {limits.max_meta_bytes}",
            )
        parsed = _json(_utf8(raw_meta, "meta"))
        if not isinstance(parsed, dict):
            raise PoisonInput(
                "meta_not_object", f"meta is a JSON {type(parsed).__name__}, not an object"
            )
        meta = parsed
    return Record(id=doc_id, text=text, meta=meta, job=job)


# -- rows from a source (embedq.producer.sources) as records, or why they cannot be ----------


@dataclass(frozen=True)
class Rejected:
    """A source row that cannot become a record; counted and logged, never sent.

    ``meta`` is the row's meta where it could be read: document sync keeps every earlier id
    of the document a rejected record names, instead of deleting its row (issue 25)."""

    where: str
    reason: str
    meta: dict[str, Any] | None = field(default=None, compare=False)


Item = Record | Rejected


def _json_safe(value: Any) -> Any:
    """Values from CSV, Parquet or SQL as JSON types (dates and decimals as strings)."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime.date | datetime.time | decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)


def to_item(row: Mapping[str, Any], where: str, fields: Fields) -> Item:
    """One row (a mapping of column to value) as a Record, or why it cannot be one."""
    meta, bad_meta = _meta(row, fields)
    doc_id = row.get(fields.id)
    if doc_id is None and fields.id not in row:
        return Rejected(where, f"no {fields.id!r} field", meta)
    if doc_id is None or doc_id == "":
        return Rejected(where, f"empty {fields.id!r}", meta)
    text = row.get(fields.text)
    if not isinstance(text, str):
        return Rejected(where, f"no string {fields.text!r} field", meta)
    if bad_meta is not None:
        return Rejected(where, bad_meta)
    return Record(id=str(doc_id), text=text, meta=meta)


def _meta(row: Mapping[str, Any], fields: Fields) -> tuple[dict[str, Any] | None, str | None]:
    """The row's meta, or why it has none that can be stored."""
    meta = row.get(fields.meta) if fields.meta else None
    if meta is not None and not isinstance(meta, dict):
        return None, f"{fields.meta!r} is not a JSON object"
    if fields.meta_fields:
        meta = dict(meta or {})
        for name in fields.meta_fields:
            if name in row:
                meta[name] = _json_safe(row[name])
    return meta, None
