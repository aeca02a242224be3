"""Model migration behind an alias (issue 26): each model's collection is fed by its own
consumer group from the migration's start, the backfill copies what came before under the
new collection's version fence, and either collection is complete after a drain, so the
alias can move forth and back without losing a write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode, MigrationRefused
from embedq.core.keys import collection_group
from embedq.model.encoder import Encoder
from embedq.ops.migrate import Migration, backfill, begin, shadow_name, source_sink
from embedq.ops.rollout import Record, Rollout
from embedq.producer.client import Producer
from embedq.queue.entries import text
from embedq.queue.stream import Stream
from embedq.queue.versions import Versions
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble

from .support.servers import MilvusLiteServer
from .support.tiny_models import tiny_bert
from .test_cli import embedq
from .test_dead_letters import RAISES


@pytest.fixture(scope="session")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT's shape with other weights: the model migrated to."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-new"), seed=1)


@pytest.fixture
def served(settings: Settings, milvus_lite_server: MilvusLiteServer) -> Settings:
    return settings.replace(milvus_uri=milvus_lite_server.uri, milvus_timeout_s=20)


def _rows(prefix: str, n: int, version: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "text": f"{prefix} document {i} {version} about queues", "meta": {}}
        for i in range(n)
    ]


def _drain(settings: Settings, client: redis.Redis, encoder: Encoder, consumer: str = "c1") -> None:
    """A worker of ``encoder``'s model, drained: it writes that model's collection, from
    the group that collection names."""
    sink = open_sink(settings)
    try:
        stream = Stream(client, settings.stream, settings.group, consumer)
        assemble(settings, stream, encoder, sink).run()
    finally:
        sink.close()


def _held(settings: Settings, collection: str) -> dict[str, dict[str, Any]]:
    sink = open_sink(settings.replace(collection=collection), create=False)
    try:
        sink.ensure_collection(None, "", create=False)
        ids = [str(r["id"]) for r in sink.rows()]
        return {str(r["id"]): r for r in sink.get(ids)} if ids else {}
    finally:
        sink.close()


def _of_model(rows: dict[str, dict[str, Any]], encoder: Encoder) -> None:
    ids = sorted(rows)
    want = encoder.encode([rows[i]["text"] for i in ids])
    got = np.array([rows[i]["vector"] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_both_collections_receive_every_write_from_the_start_whichever_workers_run(
    served: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, new_model: Path
) -> None:
    settings = served
    producer = Producer(redis_client, settings.stream)
    producer.enqueue(_rows("a", 40))
    _drain(settings, redis_client, tiny_encoder)
    new_encoder = Encoder(str(new_model), device="cpu")
    streams = [Stream(redis_client, settings.stream, "g", "migrate")]
    migration = Migration(open_sink(settings, create=False))
    source, shadow, rollout, record = begin(migration, streams, new_encoder, group="g", adopt=True)
    target = shadow_name(settings.collection, model_fingerprint(new_encoder))
    assert (record.source_group, record.group) == ("g", collection_group("g", target))
    assert shadow.collection == target and shadow.group == record.group

    # Writes after the start: updates, deletes, new ids. The new model's workers take them
    # first (their group starts at the start position), the old model's later.
    producer.enqueue(_rows("a", 10, version="v2"))
    producer.delete([f"a{i}" for i in range(30, 35)])
    producer.enqueue(_rows("b", 8))
    _drain(settings, redis_client, new_encoder, consumer="new")
    assert rollout.behind("g", record.starts) == 0  # the old group had read up to the start
    assert len(_held(settings, target)) == 18  # only what its group delivered, so far

    lease_ms = 30_000
    result = backfill(source, shadow, new_encoder, streams, lease_ms=lease_ms)
    # a0..a9 (written at v2) and a30..a34 (deleted) by the new group: the older copies
    # from the old collection, which has not caught up yet, are stale and not written.
    assert (result.total, result.copied, result.stale, result.missing) == (40, 25, 15, 0)
    _drain(settings, redis_client, tiny_encoder)  # the old model's workers catch up

    old, new = _held(settings, record.source), _held(settings, target)
    assert sorted(old) == sorted(new) and len(new) == 43
    assert all(old[i]["text"] == new[i]["text"] for i in new)
    assert "v2" in new["a3"]["text"] and "a31" not in new
    _of_model(new, new_encoder)
    _of_model(old, tiny_encoder)
    keys = streams[0].keys
    assert Versions(redis_client, keys, target).held(["a31"])[0].deleted  # type: ignore[union-attr]
    migration.sink.close()


def test_the_backfill_waits_for_the_old_group_and_a_newer_stream_write_wins(
    served: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, new_model: Path
) -> None:
    """Entries from before the start that the old group has not finished hold the backfill
    back (it would copy a row they are about to change); once they are written, the copy
    of a row the new group wrote newer is stale."""
    settings = served
    producer = Producer(redis_client, settings.stream)
    producer.enqueue(_rows("d", 20))
    _drain(settings, redis_client, tiny_encoder)
    producer.enqueue(_rows("d", 5, version="v2"))  # before the start, not yet written
    new_encoder = Encoder(str(new_model), device="cpu")
    streams = [Stream(redis_client, settings.stream, "g", "migrate")]
    migration = Migration(open_sink(settings, create=False))
    source, shadow, rollout, record = begin(migration, streams, new_encoder, group="g", adopt=True)
    assert rollout.behind("g", record.starts) == 5
    with pytest.raises(ConfigError, match="5 entries from before the migration's start"):
        rollout.wait_drained("g", record.starts, wait_s=0.0, said=lambda _: None)
    _drain(settings, redis_client, tiny_encoder)
    rollout.wait_drained("g", record.starts, wait_s=5.0, said=lambda _: None)

    producer.enqueue(_rows("d", 2, version="v3"))  # after the start: the new group's
    _drain(settings, redis_client, new_encoder, consumer="new")
    result = backfill(source, shadow, new_encoder, streams, lease_ms=30_000)
    assert (result.copied, result.stale) == (18, 2)
    new = _held(settings, shadow.collection)
    assert len(new) == 20 and "v3" in new["d1"]["text"] and "v2" in new["d4"]["text"]
    _of_model(new, new_encoder)
    migration.sink.close()


def test_a_text_the_new_model_fails_on_is_reported_not_copied(
    served: Settings, redis_client: redis.Redis, encoder: Encoder, tiny_encoder: Encoder
) -> None:
    settings = served
    Producer(redis_client, settings.stream).enqueue(
        [*_rows("p", 6), {"id": "poison", "text": RAISES}]
    )
    _drain(settings, redis_client, encoder)
    streams = [Stream(redis_client, settings.stream, "g", "migrate")]
    migration = Migration(open_sink(settings, create=False))
    source, shadow, _rollout, _record = begin(
        migration, streams, tiny_encoder, group="g", adopt=True
    )
    result = backfill(source, shadow, tiny_encoder, streams, lease_ms=30_000)
    assert result.copied == 6 and result.failed == ["poison"]
    migration.sink.close()


def test_a_shadow_without_a_recorded_migration_is_refused(
    settings: Settings, redis_client: redis.Redis, encoder: Encoder, tiny_encoder: Encoder
) -> None:
    """A collection of the new model that no recorded migration made (an older embedq, a
    Redis that lost its data) may hold rows its group never fenced: refused, not reused."""
    Producer(redis_client, settings.stream).enqueue(_rows("s", 3))
    _drain(settings, redis_client, encoder)
    sink = open_sink(settings, create=False)
    try:
        migration = Migration(sink)
        live = migration.adopt()
        migration.shadow(source_sink(migration, live), tiny_encoder)  # made outside begin
        streams = [Stream(redis_client, settings.stream, "g", "migrate")]
        with pytest.raises(MigrationRefused, match="no migration toward it is recorded"):
            begin(migration, streams, tiny_encoder, group="g", adopt=False)
        assert Rollout(streams, "x").load() is None
    finally:
        sink.close()


def test_a_collection_without_text_cannot_be_backfilled(
    settings: Settings, redis_client: redis.Redis, encoder: Encoder
) -> None:
    settings = settings.replace(store_text=False)
    Producer(redis_client, settings.stream).enqueue(_rows("t", 3))
    _drain(settings, redis_client, encoder)
    sink = open_sink(settings, create=False)
    try:
        migration = Migration(sink)
        with pytest.raises(ConfigError, match="stores no text"):
            source_sink(migration, migration.adopt())
    finally:
        sink.close()


def test_migrate_flags(settings: Settings) -> None:
    where = ("--milvus-uri", settings.milvus_uri, "--collection", settings.collection)
    both = embedq("migrate", "--promote", "--rollback", *where)
    assert both.returncode == ExitCode.USAGE and "give one of" in both.stderr
    twice = embedq("migrate", "--status", "--backfill", *where)
    assert twice.returncode == ExitCode.USAGE and "give one of" in twice.stderr


def test_lag_shows_every_group_of_the_stream(stream_name: str, redis_client: redis.Redis) -> None:
    """During a migration each physical collection has its own group: ``embedq lag`` shows
    the backlog of each, not only ``--group``'s."""
    Producer(redis_client, stream_name).enqueue(_rows("l", 5))
    redis_client.xgroup_create(stream_name, "g", id="0")
    redis_client.xgroup_create(stream_name, collection_group("g", "docs__x"), id="$")
    shown = embedq(
        "lag", "--stream", stream_name, "--group", "g", "--milvus-uri", "/nonexistent/x.db"
    )
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines() if line}
    assert rows["g"][:2] == ["5", "0"] and rows["g:docs__x"][:2] == ["0", "0"]
    as_json = embedq("lag", "--json", "--stream", stream_name, "--group", "g")
    groups = {g["group"]: g["lag"] for g in json.loads(as_json.stdout)["groups"]}
    assert groups == {"g": 5, "g:docs__x": 0}


def test_a_migration_group_reports_its_exact_lag_from_the_start(
    stream_name: str, redis_client: redis.Redis
) -> None:
    """The new collection's group starts at the stream's tail with its entries-read known:
    producers' ``--max-lag`` and KEDA read its lag at once, not nil (Redis cannot count a
    group created at ``$`` alone until it reaches the tail again)."""
    producer = Producer(redis_client, stream_name)
    producer.enqueue(_rows("e", 7))
    redis_client.xdel(stream_name, redis_client.xrange(stream_name, count=1)[0][0])  # a gap
    streams = [Stream(redis_client, stream_name, "g", "migrate")]
    rollout = Rollout(streams, "docs__y")
    group = collection_group("g", "docs__y")
    record = rollout.start(Record("docs", "docs__x", "docs__y", "g", group))
    last = redis_client.xinfo_stream(stream_name)["last-generated-id"]
    assert record.starts[stream_name] == text(last)
    assert rollout.start(record).starts == record.starts  # again: the group is kept
    producer.enqueue(_rows("f", 3))
    (info,) = [g for g in redis_client.xinfo_groups(stream_name) if text(g["name"]) == group]
    assert info["lag"] == 3 and info["entries-read"] == 7
