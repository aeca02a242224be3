"""Every source on real files and a real PostgreSQL table: JSONL, CSV, Parquet, plain text
(a file and a directory), and a SQL query; through the Python API and `embedq enqueue`."""

from __future__ import annotations

import datetime
import decimal
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.core.errors import ConfigError
from embedq.core.records import Record
from embedq.producer.sources import (
    Fields,
    Rejected,
    open_source,
    read_csv,
    read_jsonl,
    read_parquet,
    read_sql,
    read_text,
)

from .conftest import REDIS_URL, corpus_rows
from .test_cli import embedq

PG_DSN = os.environ.get("EMBEDQ_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def records(items: Iterator[Record | Rejected]) -> tuple[list[Record], list[Rejected]]:
    got = list(items)
    return [r for r in got if isinstance(r, Record)], [r for r in got if isinstance(r, Rejected)]


def stream_rows(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(stream)
    ]


def test_jsonl_maps_fields_carries_meta_and_rejects_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        b'{"key": 1, "body": "first", "meta": {"a": 1}, "lang": "en"}\n'
        b"\n"
        b"{broken\n"
        b'{"key": "2", "body": "second", "lang": "de"}\n'
        b'{"key": "3", "body": 7}\n'
        b'{"body": "no id"}\n'
        b'{"key": "4", "body": "bad meta", "meta": [1]}\n'
        b'{"key": "5", "body": "caf\xff"}\n'
        b"[1, 2]\n"
    )
    fields = Fields(id="key", text="body", meta="meta", meta_fields=("lang",))
    good, bad = records(read_jsonl(str(path), fields))
    assert good == [
        Record(id="1", text="first", meta={"a": 1, "lang": "en"}),
        Record(id="2", text="second", meta={"lang": "de"}),
    ]
    where = {r.where.rsplit(":", 1)[1]: r.reason for r in bad}
    assert set(where) == {"3", "5", "6", "7", "8", "9"}  # blank line 2 is skipped silently
    assert "not valid JSON" in where["3"] and "'body'" in where["5"] and "'key'" in where["6"]
    assert "not a JSON object" in where["7"] and "not valid JSON" in where["8"]
    assert open_source(str(path)).total == 8


def test_csv_reads_quoted_multiline_text_and_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text(
        'doc_id,body,lang,score\n1,"two\nlines, with a comma",en,0.5\n2,plain,fr,1\n3,,de,2\n',
        encoding="utf-8",
    )
    good, bad = records(
        read_csv(str(path), Fields(id="doc_id", text="body", meta_fields=("lang",)))
    )
    assert good[0] == Record(id="1", text="two\nlines, with a comma", meta={"lang": "en"})
    assert [r.id for r in good] == ["1", "2", "3"] and good[2].text == ""
    assert bad == []
    tsv = tmp_path / "docs.tsv"
    tsv.write_text("id\ttext\nA\thello there\n", encoding="utf-8")
    assert records(read_csv(str(tsv)))[0] == [Record(id="A", text="hello there")]
    with pytest.raises(ConfigError, match=r"no column 'text'.*columns: body, doc_id, lang"):
        list(read_csv(str(path), Fields(id="doc_id", meta_fields=())))


def test_parquet_streams_row_groups_with_typed_meta(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = corpus_rows("long.jsonl", 250)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] if i != 7 else None for i, r in enumerate(rows)],
            "day": [datetime.date(2024, 1, 1 + i % 28) for i in range(len(rows))],
            "price": [decimal.Decimal(f"{i}.25") for i in range(len(rows))],
            "unused": list(range(len(rows))),
        }
    )
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path, row_group_size=64)  # four row groups
    assert pq.ParquetFile(path).num_row_groups == 4
    good, bad = records(read_parquet(str(path), Fields(meta_fields=("day", "price")), 50))
    assert [r.id for r in good] == [r["id"] for i, r in enumerate(rows) if i != 7]
    assert good[0].text == rows[0]["text"]
    assert good[1].meta == {"day": "2024-01-02", "price": "1.25"}
    assert [b.where for b in bad] == [f"{path}:row 8"]
    assert open_source(str(path)).total == 250


def test_text_file_is_one_document_per_line_and_a_directory_one_per_file(
    tmp_path: Path,
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"alpha line\n\nbeta line\r\nbad \xff byte\n")
    good, bad = records(read_text(str(notes)))
    assert good == [Record("notes.txt:1", "alpha line"), Record("notes.txt:3", "beta line")]
    # A blank line is counted (rejected) rather than dropped without a word (issue 18).
    assert (bad[0].where, bad[0].reason) == (f"{notes}:2", "blank line")
    assert [b.where for b in bad][1:] == [f"{notes}:4"]
    assert open_source(str(notes)).total == 4
    assert records(read_text(str(notes), id_prefix="n"))[0][0].id == "n:1"

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.md").write_text("# B\n\nsecond file", encoding="utf-8")
    (root / "a.txt").write_text("first file\nstill first", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    (root / "sub" / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / ".hidden").write_text("skipped", encoding="utf-8")
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    good, bad = records(read_text(str(root)))
    assert good == [
        Record("a.txt", "first file\nstill first"),
        Record("b.md", "# B\n\nsecond file"),
        Record("sub/c.txt", "nested"),
    ]
    assert sorted(Path(b.where).name for b in bad) == ["empty.txt", "latin1.txt"]
    assert open_source(str(root)).total == 5


@pytest.fixture
def pg_table() -> Iterator[str]:
    import psycopg

    name = f"embedq_docs_{uuid.uuid4().hex[:10]}"
    rows = corpus_rows("long.jsonl", 120)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {name} (id bigint PRIMARY KEY, body text, lang text, "
            "added timestamptz, score numeric)"
        )
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {name} VALUES (%s, %s, %s, %s, %s)",
                [
                    (
                        i,
                        None if i == 13 else r["text"],
                        "en" if i % 2 else "de",
                        datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
                        decimal.Decimal("0.5"),
                    )
                    for i, r in enumerate(rows)
                ],
            )
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}")


def test_sql_rows_come_through_a_server_side_cursor(pg_table: str) -> None:
    query = f"SELECT id, body, lang, added, score FROM {pg_table} ORDER BY id"
    good, bad = records(
        read_sql(PG_DSN, query, Fields(text="body", meta_fields=("lang", "added")), itersize=25)
    )
    assert len(good) == 119 and [b.where for b in bad] == ["row 14"]  # id 13 has NULL body
    assert good[0].id == "0" and good[0].meta == {
        "lang": "de",
        "added": "2024-05-01 00:00:00+00:00",
    }
    with pytest.raises(ConfigError, match="SQL query failed"):
        list(read_sql(PG_DSN, f"SELECT nope FROM {pg_table}"))
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(read_sql(PG_DSN, f"SELECT id, body FROM {pg_table}"))


def test_sql_connection_errors_never_show_the_password() -> None:
    dsn = "postgresql://postgres:s3cret-pw@127.0.0.1:1/test"
    with pytest.raises(ConfigError, match="cannot connect to PostgreSQL") as caught:
        list(read_sql(dsn, "SELECT 1"))
    assert "s3cret-pw" not in str(caught.value)


def test_enqueue_cli_reads_sql_parquet_csv_and_text(
    tmp_path: Path, pg_table: str, stream_name: str, redis_client: redis.Redis
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_LOG_JSON": "true"}
    query = f"SELECT id, body AS text, lang FROM {pg_table} ORDER BY id"
    sql = embedq(
        "enqueue",
        "--sql",
        query,
        "--meta-fields",
        "lang",
        "--job",
        "from-sql",
        "--stream",
        f"{stream_name}:sql",
        env={**env, "EMBEDQ_DSN": PG_DSN},
    )
    assert sql.returncode == 0, sql.stderr
    assert "enqueued 119 records" in sql.stdout and "1 rejected" in sql.stdout
    sent = stream_rows(redis_client, f"{stream_name}:sql")
    assert len(sent) == 119 and {r["job"] for r in sent} == {"from-sql"}
    assert json.loads(sent[0]["meta"]) == {"lang": "de"}

    pq.write_table(pa.table({"doc": ["x1", "x2"], "text": ["one", "two"]}), tmp_path / "a.pq")
    (tmp_path / "b.data").write_text("id,text\ny1,three\n", encoding="utf-8")
    (tmp_path / "d.csv").write_text("id;text\nz1;semicolons\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("four\nfive\n", encoding="utf-8")
    runs: list[tuple[str, ...]] = [
        ("enqueue", str(tmp_path / "a.pq"), "--id-field", "doc"),
        ("enqueue", str(tmp_path / "b.data"), "--format", "csv"),
        ("enqueue", str(tmp_path / "c.txt"), "--id-prefix", "c"),
    ]
    for args in runs:
        result = embedq(*args, "--stream", f"{stream_name}:files", env=env)
        assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in stream_rows(redis_client, f"{stream_name}:files")]
    assert ids == ["x1", "x2", "y1", "c:1", "c:2"]
    failed = embedq("enqueue", str(tmp_path / "d.csv"), env=env)  # "id;text" is one column
    assert failed.returncode == 2 and "no column 'id', 'text'" in failed.stderr
    unknown = embedq("enqueue", str(tmp_path / "b.data"), env=env)
    assert unknown.returncode == 2 and "--format" in unknown.stderr


def test_sources_are_usable_without_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in corpus_rows("short.jsonl", 30)))
    source = open_source(str(path))
    items: list[Any] = list(source)
    assert source.total == 30 and len(items) == 30 and all(isinstance(i, Record) for i in items)


def test_dsn_passwords_count_as_secrets() -> None:
    from embedq.core.config import Settings

    assert "pw1" in Settings(dsn="postgresql://etl:pw1@db:5432/app").secrets
    assert "pw2" in Settings(dsn="host=db user=etl password=pw2 dbname=app").secrets
    assert Settings(dsn="postgresql://etl@db/app").secrets == ()
