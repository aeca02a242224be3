"""Where producer records come from: JSONL, CSV, Parquet, plain text, a SQL query.

Each reader is an iterator of ``Record | Rejected`` in a stable order (the order of the
file, of a sorted directory walk, or of the query), usable without the CLI::

    for item in read_csv("docs.csv", Fields(id="doc_id", text="body", meta_fields=("lang",))):
        ...

A row that cannot become a record is a ``Rejected`` naming where it is and why; a source
that cannot be read at all (missing file, missing column, SQL error) raises ``ConfigError``.
``open_source`` picks the reader from the file extension (in a directory, for each file)
and knows the total where the source allows (for a progress bar). Nothing a file holds
misleads a reader (issue 25): a byte order mark is dropped, a CSV quote that never closes
rejects one row, a line longer than any record can be is rejected without being held
(``embedq.producer.lines``).
"""

from __future__ import annotations

import csv
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import orjson

from embedq.core.config import dsn_secrets
from embedq.core.errors import ConfigError
from embedq.core.records import Item, Rejected, to_item
from embedq.producer.lines import CsvLines, bounded_lines, count_lines, line_limit
from embedq.producer.plaintext import open_binary, read_text, text_document, walk

__all__ = [  # Rejected and to_item live with Record (embedq.core.records); readers use them here
    "FORMATS",
    "Fields",
    "Item",
    "Rejected",
    "Source",
    "detect_format",
    "first_or_none",
    "open_source",
    "read_csv",
    "read_jsonl",
    "read_parquet",
    "read_sql",
    "read_text",
    "to_item",
]

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
    ".markdown": "text",
    ".rst": "text",
}
# CSV's default field limit (128 KiB) is below the stream's 1 MB text limit.
_CSV_FIELD_LIMIT = 16 * 1024 * 1024


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


def read_jsonl(
    path: str, fields: Fields = Fields(), max_line_bytes: int | None = None
) -> Iterator[Item]:
    """One record per JSON line; ``path`` ``-`` reads standard input. A line longer than
    ``max_line_bytes`` (see ``line_limit``) is rejected without being held in memory."""
    handle, name = open_binary(path)
    try:
        for number, line, size in bounded_lines(handle, max_line_bytes):
            if size > len(line):
                yield Rejected(
                    f"{name}:{number}",
                    f"line is {size} bytes, longer than any record within --max-text-bytes "
                    f"can be ({max_line_bytes} bytes)",
                )
                continue
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
    """One record per CSV row, columns named by the header (``.tsv``: tab-separated).

    A malformed row is rejected with its first line. An opening quote that is never closed
    would make the rest of the file one field, silently merging every row after it (issue
    25): it is rejected instead, and reading goes on from the line after it."""
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:  # utf-8-sig: a byte order mark is not part of the first column's name
        handle = sys.stdin if path == "-" else Path(path).open(encoding="utf-8-sig", newline="")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    name = "<stdin>" if path == "-" else path
    lines = CsvLines(handle)
    try:
        # strict: a stray quote or a quote open at the end of the file is an error
        reader = csv.DictReader(lines, delimiter=delimiter, strict=True)
        try:
            header = list(reader.fieldnames or [])
        except csv.Error as exc:
            raise ConfigError(f"{name}: malformed CSV header: {exc}") from None
        if header:  # (a file is read as utf-8-sig; standard input keeps its BOM)
            header[0] = header[0].removeprefix("\ufeff")
            reader.fieldnames = header
        _require_columns(name, header, fields)
        while True:
            lines.next_record()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                where = f"{name}:{lines.first}"  # (before why() moves on)
                yield Rejected(where, lines.why(exc))
                continue
            yield to_item(row, f"{name}:{lines.first}", fields)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text: {exc.reason}") from None
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
    """A file's format by its extension (standard input: JSONL)."""
    if path == "-":
        return "jsonl"
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise ConfigError(
            f"cannot tell the format of {path} from its extension; pass --format "
            f"({', '.join(FORMATS)})"
        )
    return found


def open_source(
    path: str = "-",
    *,
    fmt: str = "auto",
    fields: Fields = Fields(),
    id_prefix: str | None = None,
    sql: str | None = None,
    dsn: str = "",
    max_text_bytes: int | None = None,
) -> Source:
    """The source a CLI invocation names: a SQL query when ``sql`` is given, else a file,
    a directory or ``-`` (standard input), in ``fmt`` or by extension. In a directory each
    file goes by its own extension (a ``.jsonl`` file gives its records, a ``.md`` file is
    one document); one whose format cannot be told is refused before anything is read.
    ``max_text_bytes`` bounds the memory a line may take (``line_limit``)."""
    if sql:
        if not dsn:
            raise ConfigError("--sql needs --dsn (or EMBEDQ_DSN), e.g. postgresql://host/db")
        return Source("sql", read_sql(dsn, sql, fields))
    if path != "-" and not Path(path).exists():
        raise ConfigError(f"cannot read {path}: no such file or directory")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    forced = None if fmt == "auto" else cast(Format, fmt)
    if Path(path).is_dir():
        plan = _directory_plan(Path(path), forced, fields)
        totals = [1 if chosen == "text" else _total(str(f), chosen) for f, chosen in plan]
        items = (
            item
            for file, chosen in plan
            for item in _reader(str(file), chosen, fields, id_prefix, max_text_bytes, path)
        )
        return Source(path, items, None if None in totals else sum(t or 0 for t in totals))
    chosen = forced or detect_format(path)
    reader = _reader(path, chosen, fields, id_prefix, max_text_bytes)
    return Source(path, reader, _total(path, chosen))


def _reader(  # noqa: PLR0917 (private, called twice)
    path: str,
    chosen: Format,
    fields: Fields,
    id_prefix: str | None,
    max_text_bytes: int | None,
    directory: str | None = None,
) -> Iterator[Item]:
    """The items of one file (of ``directory``, where a text file is one document)."""
    if chosen == "jsonl":
        limit = None if max_text_bytes is None else line_limit(max_text_bytes)
        return read_jsonl(path, fields, limit)
    if chosen == "csv":
        return read_csv(path, fields)
    if chosen == "parquet":
        return read_parquet(path, fields)
    if directory is not None:
        return iter([text_document(Path(directory), Path(path), id_prefix, max_text_bytes)])
    return read_text(path, id_prefix, max_text_bytes)


def _total(path: str, chosen: Format) -> int | None:
    if chosen == "jsonl":
        return count_lines(path)
    if chosen == "parquet":
        return int(_parquet_file(path).metadata.num_rows)
    if chosen == "text":
        return count_lines(path, blank=True)
    return None  # CSV: a quoted field may span lines


def _directory_plan(root: Path, forced: Format | None, fields: Fields) -> list[tuple[Path, Format]]:
    """Each file of ``root`` with its format, its columns checked before anything is sent.
    A file whose extension says no format is refused (issue 25: embedding a ``.jsonl``
    file, or a binary, as one text document misleads more than it helps)."""
    files = walk(root)
    if forced is not None:
        return [(file, forced) for file in files]
    unknown = [f.relative_to(root).as_posix() for f in files if f.suffix.lower() not in _EXTENSIONS]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ConfigError(
            f"{root}: cannot tell the format of {', '.join(unknown[:3])}{more} from the "
            f"extension; pass --format text to read every file as one document, or "
            f"--format jsonl|csv|parquet to read every file so"
        )
    plan = [(file, _EXTENSIONS[file.suffix.lower()]) for file in files]
    for file, chosen in plan:
        if chosen == "parquet":
            _require_columns(str(file), _parquet_file(str(file)).schema_arrow.names, fields)
        elif chosen == "csv":
            _require_columns(str(file), _csv_header(str(file)), fields)
    return plan


def _csv_header(path: str) -> list[str]:
    delimiter = "\t" if path.endswith(".tsv") else ","
    try:
        with Path(path).open(encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle, delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read the header of {path}: {exc}") from None


def first_or_none(source: Source) -> Source | None:
    """``source`` with its first item read ahead, or None when it has none (an empty file,
    empty standard input, a query without rows): a job that would send nothing."""
    items = iter(source.items)
    for first in items:
        return Source(source.name, itertools.chain([first], items), source.total)
    return None
