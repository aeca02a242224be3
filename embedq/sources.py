"""Where producer records come from: JSONL, CSV, Parquet, plain text, a SQL query.

Each reader is an iterator of ``Record | Rejected`` in a stable order (the order of the
file, of a sorted directory walk, or of the query), usable without the CLI::

    for item in read_csv("docs.csv", Fields(id="doc_id", text="body", meta_fields=("lang",))):
        ...

A row that cannot become a record is a ``Rejected`` naming where it is and why; a source
that cannot be read at all (missing file, missing column, SQL error) raises ``ConfigError``.
``open_source`` picks the reader from the file extension and knows the total where the
source allows (for a progress bar).
"""

from __future__ import annotations

import csv
import datetime
import decimal
import itertools
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson

from embedq.config import dsn_secrets
from embedq.errors import ConfigError
from embedq.records import Record

Format = Literal["jsonl", "csv", "parquet", "text"]
FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet", "text")
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
# CSV's default field limit (128 KiB) is below the stream's 1 MB text limit.
_CSV_FIELD_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class Rejected:
    """A source row that cannot become a record; counted and logged, never sent."""

    where: str
    reason: str


Item = Record | Rejected


@dataclass(frozen=True)
class Fields:
    """Which columns hold the id and the text, and which are carried as ``meta``.

    ``meta`` names a column holding a JSON object (JSONL only); ``meta_fields`` are columns
    copied into ``meta`` under their own names (every source).
    """

    id: str = "id"
    text: str = "text"
    meta: str | None = "meta"
    meta_fields: tuple[str, ...] = ()


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
    doc_id = row.get(fields.id)
    if doc_id is None and fields.id not in row:
        return Rejected(where, f"no {fields.id!r} field")
    if doc_id is None or doc_id == "":
        return Rejected(where, f"empty {fields.id!r}")
    text = row.get(fields.text)
    if not isinstance(text, str):
        return Rejected(where, f"no string {fields.text!r} field")
    meta = row.get(fields.meta) if fields.meta else None
    if meta is not None and not isinstance(meta, dict):
        return Rejected(where, f"{fields.meta!r} is not a JSON object")
    if fields.meta_fields:
        meta = dict(meta or {})
        for name in fields.meta_fields:
            if name in row:
                meta[name] = _json_safe(row[name])
    return Record(id=str(doc_id), text=text, meta=meta)


def _open_binary(path: str) -> tuple[BinaryIO, str]:
    if path == "-":
        return sys.stdin.buffer, "<stdin>"
    try:
        return Path(path).open("rb"), path
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_jsonl(path: str, fields: Fields = Fields()) -> Iterator[Item]:
    """One record per JSON line; ``path`` ``-`` reads standard input."""
    handle, name = _open_binary(path)
    try:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield Rejected(f"{name}:{number}", f"not valid JSON ({exc})")
                continue
            if not isinstance(row, dict):
                yield Rejected(f"{name}:{number}", "line is not a JSON object")
                continue
            yield to_item(row, f"{name}:{number}", fields)
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def read_csv(path: str, fields: Fields = Fields(), delimiter: str | None = None) -> Iterator[Item]:
    """One record per CSV row, columns named by the header (``.tsv``: tab-separated)."""
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        handle = sys.stdin if path == "-" else Path(path).open(encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    name = "<stdin>" if path == "-" else path
    try:
        reader = csv.DictReader(handle, delimiter=delimiter)
        header = reader.fieldnames or []
        _require_columns(name, header, fields)
        for row in reader:
            # csv counts physical lines, so a quoted text spanning lines is still findable.
            yield to_item(row, f"{name}:{reader.line_num}", fields)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise ConfigError(f"{name}: malformed CSV: {exc}") from None
    finally:
        if handle is not sys.stdin:
            handle.close()


def _require_columns(name: str, columns: Iterable[str], fields: Fields) -> None:
    present = set(columns)
    missing = [c for c in (fields.id, fields.text, *fields.meta_fields) if c not in present]
    if missing:
        raise ConfigError(
            f"{name}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(sorted(present)) or 'none'})"
        )


def read_parquet(path: str, fields: Fields = Fields(), batch_rows: int = 8192) -> Iterator[Item]:
    """One record per row, streamed a record batch at a time (only the needed columns)."""
    parquet = _parquet_file(path)
    _require_columns(path, parquet.schema_arrow.names, fields)
    wanted = list(dict.fromkeys([fields.id, fields.text, *fields.meta_fields]))
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
        for row in batch.to_pylist():
            number += 1
            yield to_item(row, f"{path}:row {number}", fields)


def _parquet_file(path: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("Parquet needs pyarrow: pip install 'embedq[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid for a file that is not Parquet
        raise ConfigError(f"{path} is not a Parquet file: {exc}") from None


def read_text(path: str, id_prefix: str | None = None) -> Iterator[Item]:
    """Plain text: a file is one document per line, id ``<prefix>:<line>`` (the prefix
    defaults to the file name, ``stdin`` for ``-``), a blank line ``Rejected`` so that it is
    counted; a directory is one document per file, id its path relative to the directory
    (with ``id_prefix`` before it, if given: two directories holding the same file names
    need different prefixes, or their rows overwrite each other's)."""
    root = Path(path)
    if root.is_dir():
        yield from _read_text_dir(root, id_prefix)
        return
    prefix = id_prefix if id_prefix is not None else ("stdin" if path == "-" else root.name)
    handle, name = _open_binary(path)
    try:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                yield Rejected(f"{name}:{number}", "blank line")
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield Rejected(f"{name}:{number}", f"not UTF-8 ({exc.reason})")
                continue
            yield Record(id=f"{prefix}:{number}", text=text)
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _text_files(root: Path) -> list[Path]:
    """Regular files under ``root`` in a stable order, skipping hidden ones."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read_text_dir(root: Path, id_prefix: str | None) -> Iterator[Item]:
    for file in _text_files(root):
        relative = file.relative_to(root).as_posix()
        doc_id = f"{id_prefix}:{relative}" if id_prefix else relative
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Rejected(str(file), f"not UTF-8 ({exc.reason})")
            continue
        except OSError as exc:
            yield Rejected(str(file), f"cannot read ({exc.strerror or exc})")
            continue
        if not text.strip():
            yield Rejected(str(file), "empty file")
            continue
        yield Record(id=doc_id, text=text)


def read_sql(
    dsn: str, query: str, fields: Fields = Fields(), itersize: int = 2000
) -> Iterator[Item]:
    """Rows of ``query`` on PostgreSQL, through a server-side cursor (``itersize`` rows per
    round trip), so a large table is never held in memory. For a resumable job the query
    must order its rows (``ORDER BY`` a key): resuming counts rows from the start."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError("--sql needs psycopg: pip install 'embedq[postgres]'") from None
    fields = Fields(fields.id, fields.text, None, fields.meta_fields)

    def scrubbed(exc: Exception) -> str:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for secret in dsn_secrets(dsn):
            message = message.replace(secret, "***")
        return message

    try:
        connection = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot connect to PostgreSQL: {scrubbed(exc)}") from None
    except Exception as exc:  # a malformed DSN is a ProgrammingError or ValueError
        raise ConfigError(f"bad PostgreSQL DSN: {type(exc).__name__}") from None
    try:
        with connection.cursor(name="embedq_enqueue") as cursor:
            cursor.itersize = itersize
            try:
                cursor.execute(query)
                columns = [c.name for c in cursor.description or []]
                _require_columns("the query", columns, fields)
                for number, row in enumerate(cursor, start=1):
                    yield to_item(dict(zip(columns, row, strict=True)), f"row {number}", fields)
            except psycopg.Error as exc:
                raise ConfigError(f"SQL query failed: {scrubbed(exc)}") from None
    finally:
        connection.close()


@dataclass
class Source:
    """A readable source: its items, a name for the job record, and its size if known."""

    name: str
    items: Iterable[Item]
    total: int | None = None

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)


def detect_format(path: str) -> Format:
    if path == "-":
        return "jsonl"
    if Path(path).is_dir():
        return "text"
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise ConfigError(
            f"cannot tell the format of {path} from its extension; pass --format "
            f"({', '.join(FORMATS)})"
        )
    return found


def _count_lines(path: str, *, blank: bool = False) -> int | None:
    """Lines of a file (one fast pass; blank ones only if ``blank``: the text reader counts
    them, the JSONL reader skips them), or None for standard input."""
    if path == "-":
        return None
    try:
        with Path(path).open("rb") as handle:
            return sum(1 for line in handle if blank or line.strip())
    except OSError:
        return None  # the reader reports the error itself


def open_source(
    path: str = "-",
    *,
    fmt: str = "auto",
    fields: Fields = Fields(),
    id_prefix: str | None = None,
    sql: str | None = None,
    dsn: str = "",
) -> Source:
    """The source a CLI invocation names: a SQL query when ``sql`` is given, else a file,
    a directory (plain text) or ``-`` (standard input), in ``fmt`` or by extension."""
    if sql:
        if not dsn:
            raise ConfigError("--sql needs --dsn (or EMBEDQ_DSN), e.g. postgresql://host/db")
        return Source("sql", read_sql(dsn, sql, fields))
    if path != "-" and not Path(path).exists():
        raise ConfigError(f"cannot read {path}: no such file or directory")
    chosen = detect_format(path) if fmt == "auto" else fmt
    if chosen == "jsonl":
        return Source(path, read_jsonl(path, fields), _count_lines(path))
    if chosen == "csv":
        return Source(path, read_csv(path, fields))
    if chosen == "parquet":
        return Source(path, read_parquet(path, fields), int(_parquet_file(path).metadata.num_rows))
    if chosen == "text":
        if Path(path).is_dir():
            return Source(path, read_text(path, id_prefix), len(_text_files(Path(path))))
        return Source(path, read_text(path, id_prefix), _count_lines(path, blank=True))
    raise ConfigError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def first_or_none(source: Source) -> Source | None:
    """``source`` with its first item read ahead, or None when it has none (an empty file,
    empty standard input, a query without rows): a job that would send nothing."""
    items = iter(source.items)
    for first in items:
        return Source(source.name, itertools.chain([first], items), source.total)
    return None
