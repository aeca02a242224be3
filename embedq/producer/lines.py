"""Reading the lines of an untrusted file without being misled by it (issue 25).

* ``bounded_lines``: a line longer than a limit is measured and skipped a piece at a time,
  never held whole: a 500 MB JSONL line costs the limit, not 500 MB.
* A UTF-8 byte order mark before the first line is dropped: it is not part of a JSON object
  or of the first column's name.
* ``CsvLines``: the lines the csv module reads, numbered; when a record fails to parse
  (a quote that never closes would make the rest of the file one field), all but its first
  line are read again, so one bad row costs one row.
"""

from __future__ import annotations

import codecs
import csv
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

_PIECE = 1 << 20  # bytes read at a time while skipping an over-long line


def line_limit(max_text_bytes: int) -> int:
    """The longest JSONL line that can hold a text of ``max_text_bytes``: JSON spells a
    character in at most 6 bytes (``\\u0001``), plus 1 MiB for the id, meta and other
    fields."""
    return 6 * max_text_bytes + (1 << 20)


def bounded_lines(handle: BinaryIO, limit: int | None) -> Iterator[tuple[int, bytes, int]]:
    """(number, line, size) for each line of ``handle``. A line over ``limit`` bytes comes
    back empty with its full size (``size > len(line)`` says so), after being skipped a piece
    at a time: memory stays bounded by the limit however long the line is."""
    number = 0
    while line := handle.readline(-1 if limit is None else limit + 1):
        number += 1
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        if limit is None or len(line) <= limit or line.endswith(b"\n"):
            yield number, line, len(line)
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := handle.readline(_PIECE)):
            size += len(line)
        yield number, b"", size


def count_lines(path: str, *, blank: bool = False) -> int | None:
    """Lines of a file (one pass, a piece at a time; blank ones only if ``blank``: the text
    reader counts them, the JSONL reader skips them), or None for standard input."""
    if path == "-":
        return None
    count = 0
    try:
        with Path(path).open("rb") as handle:
            filled = False  # the line being counted has something besides whitespace
            while piece := handle.readline(_PIECE):
                filled = filled or bool(piece.strip())
                if piece.endswith(b"\n"):
                    count += blank or filled
                    filled = False
            return count + (filled or False)
    except OSError:
        return None  # the reader reports the error itself


class CsvLines:
    """The lines a csv reader reads, numbered, remembering those of the record in hand so
    that all but its first can be read again when its quote turns out never to close."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle
        self._again: deque[tuple[int, str]] = deque()
        self.record: list[tuple[int, str]] = []  # (number, line) of the record being read
        self._read = 0
        self._at_end = False

    def __iter__(self) -> CsvLines:
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.popleft()
        else:
            try:
                line = next(self._handle)
            except StopIteration:
                self._at_end = True
                raise
            self._read += 1
            number = self._read
        self.record.append((number, line))
        return line

    def next_record(self) -> None:
        self.record = []

    @property
    def first(self) -> int:
        """The number of the record's first line."""
        return self.record[0][0] if self.record else self._read

    def why(self, exc: csv.Error) -> str:
        """Why the record in hand failed to parse. Its lines after the first are read again:
        a quote opened by mistake swallows the lines after it until the next quote, or to
        the end of the file (the parser reached the end, or the field limit, inside it)."""
        held = sum(len(line) for _, line in self.record)
        spanned = self.record[-1][0] if len(self.record) > 1 else None
        self._again.extendleft(reversed(self.record[1:]))
        self.record = []
        if self._at_end or held > csv.field_size_limit():
            return 'a quoted field never closes (a missing "); the lines after it are read on'
        if spanned is not None:
            return f"malformed CSV row: {exc} on line {spanned}; the lines after it are read on"
        return f"malformed CSV row: {exc}"
