"""Model migration behind an alias: backfill while writes arrive, promote, rollback, drop the
old collection; workers refuse a collection fingerprinted for another model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode, ModelMismatch
from embedq.model.encoder import Encoder
from embedq.ops.migrate import Migration, catch_up, shadow_name, source_sink
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink, open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble

from .support.servers import MilvusLiteServer
from .test_cli import embedq
from .test_dead_letters import RAISES


def _rows(prefix: str, n: int, version: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "text": f"{prefix} document {i} {version} about queues", "meta": {}}
        for i in range(n)
    ]


def _drain(settings: Settings, client: redis.Redis, encoder: Encoder) -> None:
    sink = open_sink(settings)
    try:
        assemble(settings, Stream(client, settings.stream, "g", "c1"), encoder, sink).run()
    finally:
        sink.close()


def _stored(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every row readers see through the alias: id -> text and vector."""
    sink = open_sink(settings, create=False)
    try:
        sink.ensure_collection(None, "", create=False)
        ids = [str(r["id"]) for r in sink.rows()]
        return {str(r["id"]): r for r in sink.get(ids)} if ids else {}
    finally:
        sink.close()


def _same_model(rows: dict[str, dict[str, Any]], encoder: Encoder) -> None:
    ids = sorted(rows)
    want = encoder.encode([rows[i]["text"] for i in ids])
    got = np.array([rows[i]["vector"] for i in ids], dtype=np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def served(settings: Settings, milvus_lite_server: MilvusLiteServer) -> Settings:
    return settings.replace(milvus_uri=milvus_lite_server.uri, milvus_timeout_s=20)


def _migrate(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    where = ("--milvus-uri", settings.milvus_uri, "--collection", settings.collection)
    return embedq("migrate", *args, *where)


def test_migration_while_writes_arrive_then_promote_rollback_and_drop(
    served: Settings, redis_client: redis.Redis, encoder: Encoder, tiny_model: Path
) -> None:
    settings = served
    producer = Producer(redis_client, settings.stream, group="g")
    producer.enqueue(_rows("old", 120))
    _drain(settings, redis_client, encoder)  # model A: the packaged MiniLM, 384-d

    # Model B backfills in another process and keeps following the live collection...
    where = ("--milvus-uri", settings.milvus_uri, "--collection", settings.collection)
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedq.cli",
            "migrate",
            "--model",
            str(tiny_model),
            "--follow",
            "--adopt",
            "--interval",
            "0.2",
            *where,
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stderr is not None
        for line in follow.stderr:  # the collection is behind the alias once pass 1 is done
            if "pass 1:" in line:
                assert "120 rows in the live collection, 120 embedded" in line
                break
        # ...while model A's workers keep writing: new ids, new versions, deletes.
        producer.enqueue(_rows("new", 40))
        producer.enqueue(_rows("old", 10, version="v2"))
        producer.delete([f"old{i}" for i in range(110, 120)])
        _drain(settings, redis_client, encoder)
        time.sleep(2.0)  # a few follow passes
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=60)
    assert follow.returncode == 0

    live = _stored(settings)
    assert len(live) == 150 and "old115" not in live and "v2" in live["old3"]["text"]
    _same_model(live, encoder)  # still model A for every reader

    # A worker with model B is refused A's collection (exit 2, ModelMismatch).
    refused = embedq(
        "worker",
        "--model",
        str(tiny_model),
        "--drain",
        "--stream",
        settings.stream,
        "--group",
        "g",
        "--milvus-uri",
        settings.milvus_uri,
        "--collection",
        settings.collection,
    )
    assert refused.returncode == ExitCode.USAGE
    assert "fingerprint" in refused.stderr and "embedq migrate" in refused.stderr

    promoted = _migrate(settings, "--promote", "--model", str(tiny_model))
    assert promoted.returncode == 0, promoted.stderr
    after = _stored(settings)
    assert sorted(after) == sorted(live)  # every id, old and new writes, no deleted one
    assert all(after[i]["text"] == live[i]["text"] for i in live)
    _same_model(after, Encoder(str(tiny_model), device="cpu"))  # B's vectors, 32-d

    # Now model A is the one refused, by the alias's new collection.
    sink = open_sink(settings, create=False)
    try:
        with pytest.raises(ModelMismatch, match="fingerprint"):
            sink.ensure_collection(384, encoder.name, fingerprint=model_fingerprint(encoder))
    finally:
        sink.close()

    back = _migrate(settings, "--rollback")
    assert back.returncode == 0, back.stderr
    _same_model(_stored(settings), encoder)  # A's vectors again, for every id
    nothing = _migrate(settings, "--drop-old")  # A replaced nothing: nothing to drop
    assert (
        nothing.returncode == ExitCode.USAGE and "nothing to roll back to or drop" in nothing.stderr
    )

    again = _migrate(settings, "--promote", "--model", str(tiny_model))
    assert again.returncode == 0, again.stderr
    dropped = _migrate(settings, "--drop-old")
    assert dropped.returncode == 0, dropped.stderr
    _same_model(_stored(settings), Encoder(str(tiny_model), device="cpu"))
    sink = open_sink(settings, create=False)
    try:
        names = sink.client.list_collections()
        assert names == [
            shadow_name(settings.collection, model_fingerprint(Encoder(str(tiny_model))))
        ]
    finally:
        sink.close()


def test_catch_up_follows_updates_and_deletes(
    settings: Settings, redis_client: redis.Redis, encoder: Encoder, tiny_encoder: Encoder
) -> None:
    """In one process (a Milvus Lite file): passes converge on the live collection; a text
    the new model fails on is reported, not copied, and does not keep passes going."""
    producer = Producer(redis_client, settings.stream, group="g")
    producer.enqueue([*_rows("d", 30), {"id": "poison", "text": RAISES}])
    _drain(settings, redis_client, encoder)
    sink = open_sink(settings, create=False)
    try:
        migration = Migration(sink)
        live = migration.adopt()
        assert migration.target() == live != settings.collection
        source = source_sink(migration, live)
        shadow = migration.shadow(source, tiny_encoder)
        first = catch_up(source, shadow, tiny_encoder)
        assert (first.total, first.copied, first.deleted) == (31, 30, 0)
        assert first.failed == ["poison"]  # the tiny model's table ends before its token
        second = catch_up(source, shadow, tiny_encoder)
        assert second.idle and second.failed == ["poison"]  # nothing else to do
        source.upsert([_moved(source, "d1", "1900000000000-0")])
        source.delete(["d2"])
        shadow.delete(["d3"])  # a row the shadow lost is copied again
        again = catch_up(source, shadow, tiny_encoder)
        assert (again.copied, again.deleted) == (2, 1)
        got = {r["id"]: r for r in shadow.get(["d1", "d2", "d3"])}
        assert set(got) == {"d1", "d3"} and got["d1"]["version"] == "1900000000000-0"
        # After the switch, an older version in the live collection never overwrites a newer one.
        source.upsert([_moved(source, "d1", "1800000000000-0")])
        assert catch_up(source, shadow, tiny_encoder, newer_only=True).copied == 0
    finally:
        sink.close()


def _moved(source: Sink, doc: str, version: str) -> Any:
    from embedq.sink.milvus import Row

    row = source.get([doc])[0]
    return Row(
        id=doc,
        vector=np.array(row["vector"], dtype=np.float32),
        text=row["text"] + " changed",
        meta={},
        content_hash="x",
        version=version,
    )


def test_a_collection_without_text_cannot_be_backfilled(
    settings: Settings, redis_client: redis.Redis, encoder: Encoder
) -> None:
    settings = settings.replace(store_text=False)
    Producer(redis_client, settings.stream, group="g").enqueue(_rows("t", 3))
    _drain(settings, redis_client, encoder)
    sink = open_sink(settings, create=False)
    try:
        migration = Migration(sink)
        with pytest.raises(ConfigError, match="stores no text"):
            source_sink(migration, migration.adopt())
    finally:
        sink.close()


def test_migrate_flags(settings: Settings) -> None:
    both = _migrate(settings, "--promote", "--rollback")
    assert both.returncode == ExitCode.USAGE and "give one of" in both.stderr
    twice = _migrate(settings, "--follow", "--backfill")
    assert twice.returncode == ExitCode.USAGE and "give one of" in twice.stderr
