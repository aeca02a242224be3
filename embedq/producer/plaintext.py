"""Plain text as records: a file is one document per line, a directory one per file.

Both bound what they read by ``max_text_bytes`` (a longer line is skipped a piece at a
time, a longer file is never opened), and drop a UTF-8 byte order mark (issue 25).
``embedq.producer.sources.open_source`` reads a directory's other files in their own formats.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from embedq.core.errors import ConfigError
from embedq.core.records import Item, Record, Rejected
from embedq.producer.lines import bounded_lines


def open_binary(path: str) -> tuple[BinaryIO, str]:
    if path == "-":
        return sys.stdin.buffer, "<stdin>"
    try:
        return Path(path).open("rb"), path
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_text(
    path: str, id_prefix: str | None = None, max_text_bytes: int | None = None
) -> Iterator[Item]:
    """Plain text: a file is one document per line, id ``<prefix>:<line>`` (the prefix
    defaults to the file name, ``stdin`` for ``-``), a blank line ``Rejected`` so that it is
    counted; a directory is one document per file, whatever its extension (``open_source``
    reads each file of a directory in its own format). A line or file longer than
    ``max_text_bytes`` is rejected without being read whole."""
    root = Path(path)
    if root.is_dir():
        for file in walk(root):
            yield text_document(root, file, id_prefix, max_text_bytes)
        return
    prefix = id_prefix if id_prefix is not None else ("stdin" if path == "-" else root.name)
    handle, name = open_binary(path)
    limit = None if max_text_bytes is None else max_text_bytes + 2  # and its \r\n
    try:
        for number, raw, size in bounded_lines(handle, limit):
            where = f"{name}:{number}"
            if size > len(raw):
                yield Rejected(where, f"line is {size} bytes, the limit is {max_text_bytes}")
            elif not raw.strip():
                yield Rejected(where, "blank line")
            else:
                try:
                    yield Record(id=f"{prefix}:{number}", text=raw.decode().rstrip("\r\n"))
                except UnicodeDecodeError as exc:
                    yield Rejected(where, f"not UTF-8 ({exc.reason})")
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def walk(root: Path) -> list[Path]:
    """Regular files under ``root`` in a stable order, skipping hidden ones."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def text_document(root: Path, file: Path, id_prefix: str | None, limit: int | None) -> Item:
    """One file of a directory as one document, id its path relative to the directory
    (with ``id_prefix`` before it, if given: two directories holding the same file names
    need different prefixes, or their rows overwrite each other's)."""
    relative = file.relative_to(root).as_posix()
    try:
        size = file.stat().st_size
        if limit is not None and size > limit + 3:  # (a byte order mark is not text)
            return Rejected(str(file), f"file is {size} bytes, the limit is {limit}")
        text = file.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        return Rejected(str(file), f"not UTF-8 ({exc.reason})")
    except OSError as exc:
        return Rejected(str(file), f"cannot read ({exc.strerror or exc})")
    if not text.strip():
        return Rejected(str(file), "empty file")
    return Record(id=f"{id_prefix}:{relative}" if id_prefix else relative, text=text)
