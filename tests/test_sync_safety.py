"""Issue 25: document sync deletes only what the source really dropped, and inputs that could
mislead it (a typo in a field name, a byte order mark, an unclosed CSV quote, a 500 MB line,
a directory of mixed files) are rejected or read as what they are. Real Redis, real Milvus
Lite, the tiny model; `embedq enqueue` in-process through click's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ExitCode
from embedq.core.keys import Keys
from embedq.core.records import Record
from embedq.model.encoder import Encoder
from embedq.producer.sources import Rejected, open_source, read_csv, read_jsonl
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble

BOM = "\ufeff"


@pytest.fixture
def drain(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> Callable[[], int]:
    """Run a worker (the tiny model) until the stream is done; the collection's rows."""

    def run() -> int:
        s = settings
        assemble(s, Stream(redis_client, s.stream, s.group, s.consumer), tiny_encoder, sink).run()
        return sink.count()

    return run


def enqueue(settings: Settings, *args: str) -> Result:
    env = {
        "EMBEDQ_REDIS_URL": settings.redis_url,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_COLLECTION": settings.collection,
        "EMBEDQ_LOG_JSON": "1",
    }
    return CliRunner().invoke(main, ["enqueue", *args], env=env, catch_exceptions=False)


def chunks(doc: str, n: int, version: str = "v1") -> list[dict[str, Any]]:
    return [
        {"id": f"{doc}#{i}", "text": f"{doc} chunk {i} {version}", "meta": {"doc": doc}}
        for i in range(n)
    ]


def jsonl(path: Path, rows: list[dict[str, Any]], prefix: str = "") -> str:
    path.write_text(prefix + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def rows(sink: Sink, ids: list[str]) -> dict[str, str]:
    return {r["id"]: r["text"] for r in sink.get(ids, with_vectors=False)}


def ledger(client: redis.Redis, settings: Settings) -> dict[str, list[str]]:
    held = client.hgetall(Keys(settings.stream).docs(settings.collection))
    return {k.decode(): json.loads(v) for k, v in held.items()}


def deletes(client: redis.Redis, stream: str) -> list[str]:
    return [f[b"id"].decode() for _, f in client.xrange(stream) if f.get(b"op") == b"delete"]


FULL = ("--doc-field", "doc", "--cleanup", "full")


@pytest.mark.parametrize("typo", [("--text-field", "body"), ("--doc-field", "dco")])
def test_every_record_rejected_deletes_nothing_and_exits_nothing_sent(
    typo: tuple[str, str],
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    drain: Callable[[], int],
) -> None:
    source = jsonl(tmp_path / "docs.jsonl", [r for d in "abcde" for r in chunks(d, 4)])
    assert enqueue(settings, source, *FULL).exit_code == 0
    assert drain() == 20
    before = ledger(redis_client, settings)

    # `--text-field body` or `--doc-field dco`: the same 20 rows, every one rejected.
    flags = [*FULL, *typo] if typo[0] == "--text-field" else ["--cleanup", "full", *typo]
    done = enqueue(settings, source, *flags)
    assert done.exit_code == ExitCode.NOTHING_SENT, done.output
    assert "enqueued 0 records" in done.stdout and "(20 rejected)" in done.stdout
    assert "0 deleted" in done.stdout and "nothing was sent" in done.stderr
    first = f"{source}:1: no string 'body'" if typo[1] == "body" else "a#0: no meta field 'dco'"
    assert first in done.stderr
    assert drain() == 20
    assert deletes(redis_client, settings.stream) == []
    assert ledger(redis_client, settings) == before


def test_a_rejected_chunk_keeps_its_documents_rows(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    drain: Callable[[], int],
    sink: Sink,
) -> None:
    first = chunks("a", 3) + chunks("b", 2)
    limit = ("--max-text-bytes", "300")
    assert enqueue(settings, jsonl(tmp_path / "1.jsonl", first), *FULL, *limit).exit_code == 0
    drain()
    # a#1 grew past --max-text-bytes and a lost its last chunk: a keeps all it had
    # (the re-chunk is not proven while one of its records is rejected); b syncs as usual.
    second = [chunks("a", 1)[0], {**chunks("a", 2)[1], "text": "x" * 400}, *chunks("b", 1)]
    everything = ("--max-delete", "all")  # b#1 is 1 of 5 ids: past the default 10%
    done = enqueue(settings, jsonl(tmp_path / "2.jsonl", second), *FULL, *limit, *everything)
    assert done.exit_code == 0, done.output
    assert "(1 rejected)" in done.stdout and "1 deleted" in done.stdout
    drain()
    assert sorted(rows(sink, [r["id"] for r in first])) == ["a#0", "a#1", "a#2", "b#0"]
    assert deletes(redis_client, settings.stream) == ["b#1"]
    assert ledger(redis_client, settings) == {"a": ["a#0", "a#1", "a#2"], "b": ["b#0"]}

    # A rejected line that names no document (not JSON) could be any document's: no cleanup.
    third = jsonl(tmp_path / "3.jsonl", [*chunks("a", 1), *chunks("b", 1)], prefix="{oops\n")
    done = enqueue(settings, third, *FULL, *everything)
    assert done.exit_code == 0 and "0 deleted" in done.stdout, done.output
    assert "no cleanup in this run: 1 rejected record names no document" in done.stderr
    assert ledger(redis_client, settings) == {"a": ["a#0", "a#1", "a#2"], "b": ["b#0"]}


def test_an_id_moved_to_another_document_is_not_deleted(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    drain: Callable[[], int],
    sink: Sink,
) -> None:
    moving = {"id": "shared", "text": "a paragraph", "meta": {"doc": "a"}}
    first = [*chunks("a", 2), moving, *chunks("b", 1)]
    sync = ("--doc-field", "doc", "--cleanup", "incremental")
    assert enqueue(settings, jsonl(tmp_path / "1.jsonl", first), *sync).exit_code == 0
    drain()
    # The paragraph moved from a to b (b is read after a): it is written, never deleted.
    second = [*chunks("a", 2), *chunks("b", 1), {**moving, "meta": {"doc": "b"}}]
    done = enqueue(settings, jsonl(tmp_path / "2.jsonl", second), *sync)
    assert done.exit_code == 0 and "0 deleted" in done.stdout, done.output
    drain()
    assert rows(sink, ["shared"]) == {"shared": "a paragraph"}
    assert deletes(redis_client, settings.stream) == []
    assert ledger(redis_client, settings) == {"a": ["a#0", "a#1"], "b": ["b#0", "shared"]}
    # Back again with a full snapshot that no longer has b: b's ids go, the moved one stays.
    third = [*chunks("a", 2), {**moving, "meta": {"doc": "a"}}]
    done = enqueue(settings, jsonl(tmp_path / "3.jsonl", third), *FULL, "--max-delete", "all")
    assert done.exit_code == 0 and "1 deleted" in done.stdout, done.output
    assert deletes(redis_client, settings.stream) == ["b#0"]
    assert ledger(redis_client, settings) == {"a": ["a#0", "a#1", "shared"]}


def test_a_partial_snapshot_is_refused_past_max_delete_then_all_deletes(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    drain: Callable[[], int],
) -> None:
    every = [r for d in range(20) for r in chunks(f"d{d:02}", 1)]
    assert enqueue(settings, jsonl(tmp_path / "all.jsonl", every), *FULL).exit_code == 0
    assert drain() == 20
    before = ledger(redis_client, settings)
    half = jsonl(tmp_path / "half.jsonl", every[:10])  # a partial export, say

    refused = enqueue(settings, half, *FULL)
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    assert "enqueued 10 records" in refused.stderr
    assert "refused to delete 10 of 20 ids in the document ledger" in refused.stderr
    assert deletes(redis_client, settings.stream) == []
    assert ledger(redis_client, settings) == before
    assert drain() == 20

    typo = enqueue(settings, half, *FULL, "--max-delete", "10 %s")
    assert typo.exit_code == ExitCode.USAGE and "--max-delete" in typo.stderr

    done = enqueue(settings, half, *FULL, "--max-delete", "all")
    assert done.exit_code == 0 and "10 deleted" in done.stdout, done.output
    assert drain() == 10
    assert sorted(ledger(redis_client, settings)) == [f"d{d:02}" for d in range(10)]


def test_a_byte_order_mark_is_not_part_of_the_first_record(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    rows_ = chunks("a", 2)
    source = jsonl(tmp_path / "bom.jsonl", rows_, prefix=BOM)
    items = list(read_jsonl(source))
    assert [i.id for i in items if isinstance(i, Record)] == ["a#0", "a#1"]
    table = tmp_path / "bom.csv"
    table.write_text(f"{BOM}id,text\nc1,one\nc2,two\n", encoding="utf-8")
    assert [i.id for i in read_csv(str(table)) if isinstance(i, Record)] == ["c1", "c2"]
    text = tmp_path / "bom.txt"
    text.write_text(f"{BOM}first line\n", encoding="utf-8")
    assert [i.text for i in open_source(str(text)) if isinstance(i, Record)] == ["first line"]
    for path, sent in ((source, 2), (str(table), 2)):
        done = enqueue(settings, path)
        assert done.exit_code == 0 and f"enqueued {sent} records" in done.stdout, done.output
        assert "(0 rejected)" in done.stdout


def test_an_unclosed_csv_quote_is_one_rejected_row_not_a_merge(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    table = tmp_path / "rows.csv"
    table.write_text('id,text\n1,first\n2,"never closed\n3,third\n', encoding="utf-8")
    items = list(read_csv(str(table)))
    assert [i.id for i in items if isinstance(i, Record)] == ["1", "3"]
    (bad,) = [i for i in items if isinstance(i, Rejected)]
    assert bad.where == f"{table}:3" and "never closes" in bad.reason
    done = enqueue(settings, str(table))
    assert done.exit_code == 0 and "enqueued 2 records" in done.stdout, done.output
    assert "(1 rejected)" in done.stdout
    assert [f[b"id"] for _, f in redis_client.xrange(settings.stream)] == [b"1", b"3"]


def test_a_500_mb_jsonl_line_is_rejected_in_bounded_memory(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:  # a sparse file: the long line costs no disk
        handle.write(b'{"id": "0", "text": "before"}\n{"id": "big", "text": "')
        handle.seek(500 * 2**20)
        handle.write(b'"}\n{"id": "2", "text": "after"}\n')
    env = {
        **os.environ,
        "EMBEDQ_REDIS_URL": settings.redis_url,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_LOG_JSON": "1",
    }
    # The peak of the enqueue alone: a child's maxrss starts from what its parent held when
    # it forked (here a test process with a model loaded), so a small Python starts it.
    probe = (
        "import pathlib, resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "pathlib.Path(sys.argv[1]).write_text(str(peak)); sys.exit(code)"
    )
    command = [sys.executable, "-m", "embedq.cli", "enqueue", str(big)]
    with (tmp_path / "out").open("w") as stdout, (tmp_path / "err").open("w") as stderr:
        run = [sys.executable, "-c", probe, str(tmp_path / "peak"), *command]
        proc = subprocess.run(run, env=env, stdout=stdout, stderr=stderr, check=False)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, err[-2000:]
    assert "enqueued 2 records" in out and "(1 rejected)" in out
    assert f"{big}:2" in err and "longer than any record" in err
    peak_mb = int((tmp_path / "peak").read_text()) / 1024  # kB on Linux
    assert peak_mb < 300, f"enqueue peaked at {peak_mb:.0f} MB for a 500 MB line"


def test_a_directory_is_read_file_by_file_in_each_files_format(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    root = tmp_path / "mixed"
    (root / "notes").mkdir(parents=True)
    jsonl(root / "a.jsonl", [{"id": "j1", "text": "from jsonl"}])
    (root / "b.csv").write_text("id,text\nc1,from csv\n", encoding="utf-8")
    (root / "c.txt").write_text("a whole document", encoding="utf-8")
    (root / "notes" / "d.md").write_text("# another", encoding="utf-8")
    source = open_source(str(root))
    assert source.total is None  # CSV rows cannot be counted without parsing
    assert [i.id for i in source if isinstance(i, Record)] == ["j1", "c1", "c.txt", "notes/d.md"]
    done = enqueue(settings, str(root))
    assert done.exit_code == 0 and "enqueued 4 records" in done.stdout, done.output
    sent = {f[b"id"]: f[b"text"] for _, f in redis_client.xrange(settings.stream)}
    assert sent[b"j1"] == b"from jsonl" and sent[b"c.txt"] == b"a whole document"

    (root / "e.bin").write_bytes(b"\xff\xfe")
    refused = enqueue(settings, str(root))
    assert refused.exit_code == ExitCode.USAGE
    assert "cannot tell the format of e.bin" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) <= 2  # one line (and its log event)
    as_text = enqueue(settings, str(root), "--format", "text")  # every file one document
    assert as_text.exit_code == 0 and "enqueued 4 records" in as_text.stdout
    assert "(1 rejected)" in as_text.stdout  # e.bin is not UTF-8
