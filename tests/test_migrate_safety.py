"""Issue 26: a migration plans before it changes anything, adopts a collection only when asked,
keeps one Redis index per physical collection, and never lets a worker write its model's
vectors into a collection of another model when the alias moves under it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ExitCode, StageCrashed
from embedq.model.encoder import Encoder
from embedq.ops import migrate as migrate_ops
from embedq.ops import migrate_guard
from embedq.ops.migrate import Migration, backfill, begin, shadow_name
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.queue.versions import Versions
from embedq.sink import milvus as milvus_sink
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .support.servers import MilvusLiteServer
from .support.tiny_models import tiny_bert


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT's architecture with other random weights: a second model ("new")."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-other"), seed=1)


def _rows(prefix: str, n: int, version: str = "") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "text": f"{prefix} text {i} {version}", "meta": {}} for i in range(n)
    ]


def _drain(
    settings: Settings,
    client: redis.Redis,
    encoder: Encoder,
    group: str = "g",
    consumer: str = "c1",
) -> None:
    sink = open_sink(settings)
    try:
        assemble(settings, Stream(client, settings.stream, group, consumer), encoder, sink).run()
    finally:
        sink.close()


def _collections(settings: Settings) -> tuple[list[str], list[str]]:
    sink = open_sink(settings, create=False)
    try:
        names = sorted(sink.client.list_collections())
        return names, sorted(sink.client.list_aliases().get("aliases", []))
    finally:
        sink.close()


def _cli(settings: Settings, *args: str) -> Any:
    where = ("--milvus-uri", settings.milvus_uri, "--collection", settings.collection)
    queue = ("--stream", settings.stream, "--group", settings.group)
    return CliRunner().invoke(main, ["migrate", *args, *where, *queue])


def _migrated(migration: Migration, client: redis.Redis, settings: Settings, new: Encoder) -> Any:
    """The new model's collection, started (its group) and backfilled; the alias not moved."""
    streams = [Stream(client, settings.stream, "g", "migrate")]
    source, shadow, _rollout, _record = begin(migration, streams, new, group="g", adopt=True)
    backfill(source, shadow, new, streams, lease_ms=30_000)
    return shadow


def test_migrate_without_an_action_prints_the_plan_and_changes_nothing(
    settings: Settings,
    redis_client: redis.Redis,
    tiny_encoder: Encoder,
    other_tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(migrate_ops, "RECHECK_S", 0.0)
    monkeypatch.setattr(migrate_guard, "ACTIVE_S", 1.0)  # --adopt waits for a quiet stream
    Producer(redis_client, settings.stream, group="g").enqueue(_rows("p", 12))
    _drain(settings, redis_client, tiny_encoder)
    before = _collections(settings)
    assert before == ([settings.collection], [])

    planned = _cli(settings, "--model", str(other_tiny_model))
    assert planned.exit_code == 0, planned.output
    new = shadow_name(settings.collection, model_fingerprint(Encoder(str(other_tiny_model))))
    assert "not behind an alias" in planned.output and "12 rows" in planned.output
    assert "--adopt" in planned.output and new in planned.output
    assert "nothing was changed" in planned.output
    assert _collections(settings) == before  # not adopted, no shadow created

    # An action on a collection that is not yet an alias needs --adopt: refused, unchanged.
    refused = _cli(settings, "--model", str(other_tiny_model), "--backfill")
    assert refused.exit_code == ExitCode.USAGE
    assert "add --adopt" in refused.output
    assert _collections(settings) == before

    done = _cli(settings, "--model", str(other_tiny_model), "--backfill", "--adopt")
    assert done.exit_code == 0, done.output
    old = shadow_name(settings.collection, model_fingerprint(tiny_encoder))
    assert _collections(settings) == (sorted([old, new]), [settings.collection])
    again = _cli(settings, "--model", str(other_tiny_model))
    assert f"an alias of {old}" in again.output and "12 rows" in again.output
    assert "--adopt" not in again.output


def test_each_physical_collection_keeps_its_own_index(
    settings: Settings,
    redis_client: redis.Redis,
    tiny_encoder: Encoder,
    other_tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After adoption the renamed collection keeps the index it had (keyed by NAME); the new
    model's collection gets one of its own, never the alias's (issue 26 item 3)."""
    monkeypatch.setattr(migrate_ops, "RECHECK_S", 0.0)
    producer = Producer(redis_client, settings.stream, group="g")
    producer.enqueue(_rows("k", 5))
    _drain(settings, redis_client, tiny_encoder)
    new_encoder = Encoder(str(other_tiny_model), device="cpu")
    sink = open_sink(settings, create=False)
    try:
        migration = Migration(sink)
        shadow = _migrated(migration, redis_client, settings, new_encoder)
        migration.move_alias(shadow.collection)
    finally:
        sink.close()
    keys = Stream(redis_client, settings.stream, "g2", "c1").keys

    # A worker of the new model, through the alias: its index is the new collection's.
    producer.enqueue(_rows("n", 3))
    _drain(settings, redis_client, new_encoder, group="g2")
    assert Versions(redis_client, keys, shadow.collection).held(["n0"])[0] is not None
    old_index = Versions(redis_client, keys, settings.collection).held(["n0", "k0"])
    assert old_index[0] is None and old_index[1] is not None  # untouched by the new writes
    redis_client.delete(keys.index(shadow.collection), keys.leases(shadow.collection))


@pytest.fixture
def served(settings: Settings, milvus_lite_server: MilvusLiteServer) -> Settings:
    """Settings on a Milvus Lite server: the test's worker and migration share it."""
    return settings.replace(milvus_uri=milvus_lite_server.uri, milvus_timeout_s=20)


class _Running:
    """A worker run on a thread (not drained): started before the migration, kept running."""

    def __init__(self, settings: Settings, client: redis.Redis, encoder: Encoder) -> None:
        self.sink = open_sink(settings)
        stream = Stream(client, settings.stream, "g", "old")
        self.worker: Worker = assemble(settings.replace(drain=False), stream, encoder, self.sink)
        self.stream = stream
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def settled(self, client: redis.Redis) -> None:
        """Until every entry of the stream was delivered to the group and acked, or the
        worker stopped."""
        while self.thread.is_alive():
            groups = client.xinfo_groups(self.stream.keys.stream)
            group = next((g for g in groups if g["name"] == b"g"), None)  # None: not joined yet
            if group is not None and group["lag"] == 0 and group["pending"] == 0:
                return
            self.thread.join(0.05)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.worker.stop_requested.set()
        self.thread.join(60)
        self.sink.close()


class _Fleet(NamedTuple):
    """An old-model worker running on a Milvus Lite server before any migration, a
    producer of its stream, and the new model."""

    settings: Settings
    producer: Producer
    running: _Running
    new_encoder: Encoder


@pytest.fixture
def fleet(
    served: Settings,
    redis_client: redis.Redis,
    tiny_encoder: Encoder,
    other_tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[_Fleet]:
    monkeypatch.setattr(migrate_ops, "RECHECK_S", 0.0)
    running = _Running(served, redis_client, tiny_encoder)
    try:
        yield _Fleet(
            served,
            Producer(redis_client, served.stream, group="g"),
            running,
            Encoder(str(other_tiny_model), device="cpu"),
        )
    finally:
        running.stop()


def _adopted(
    fleet: _Fleet, client: redis.Redis, rows: list[dict[str, Any]]
) -> tuple[Migration, str]:
    """The running worker wrote ``rows``, then its collection was adopted: the migration
    (its sink for the caller to close) and the adopted collection's new name."""
    fleet.producer.enqueue(rows)
    fleet.running.settled(client)
    migration = Migration(open_sink(fleet.settings, create=False))
    return migration, migration.adopt()


def _vectors(settings: Settings, collection: str, ids: list[str]) -> dict[str, Any]:
    sink = open_sink(settings.replace(collection=collection), create=False)
    try:
        sink.ensure_collection(None, "", create=False)
        return {str(r["id"]): r for r in sink.get(ids)}
    finally:
        sink.close()


def _model_of(rows: dict[str, Any], encoder: Encoder) -> None:
    ids = sorted(rows)
    want = encoder.encode([rows[i]["text"] for i in ids])
    got = np.array([rows[i]["vector"] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_running_worker_follows_the_adoption_and_never_writes_into_the_new_collection(
    fleet: _Fleet, redis_client: redis.Redis, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of the old model started before the first migration: after ``--adopt`` it
    writes to the renamed collection, and after the promote its writes still go there; the
    new model's collection holds the new model's vectors only (issue 26 item 5)."""
    monkeypatch.setattr(milvus_sink, "RECHECK_S", 0.0)  # every write re-checks
    settings, producer, running, new_encoder = fleet
    migration, old = _adopted(fleet, redis_client, _rows("a", 20))
    try:
        producer.enqueue(_rows("b", 20))  # between adoption and promote
        running.settled(redis_client)
        shadow = _migrated(migration, redis_client, settings, new_encoder)
        migration.move_alias(shadow.collection)
    finally:
        migration.sink.close()
    producer.enqueue(_rows("c", 20))  # after the promote
    running.settled(redis_client)
    assert running.error is None and running.thread.is_alive()
    running.stop()
    ids = [f"{p}{i}" for p in "abc" for i in range(20)]
    in_new = _vectors(settings, shadow.collection, ids)
    assert not any(i.startswith("c") for i in in_new)  # no old-model write landed there
    _model_of(in_new, new_encoder)
    in_old = _vectors(settings, old, ids)
    assert sorted(in_old) == sorted(ids)
    _model_of(in_old, tiny_encoder)


def test_a_worker_whose_name_now_reaches_another_models_collection_stops_and_leaves_its_entries(
    fleet: _Fleet, redis_client: redis.Redis, tiny_encoder: Encoder
) -> None:
    """The adversary's order: adoption and promote both happen while an old-model worker is
    idle, so the name it writes to now is an alias of the new model's collection. Its next
    write is refused (one line), its entries stay pending, and a new-model worker takes
    them over: every vector there is the new model's (the issue's 82 mixed ids)."""
    settings, producer, running, new_encoder = fleet
    migration, old = _adopted(fleet, redis_client, _rows("a", 10))
    try:
        shadow = _migrated(migration, redis_client, settings, new_encoder)
        migration.move_alias(shadow.collection)
    finally:
        migration.sink.close()
    running.sink._checked_until = 0.0  # its cached check expires (RECHECK_S later)
    producer.enqueue(_rows("z", 10))
    running.thread.join(60)
    assert isinstance(running.error, StageCrashed)
    assert "fingerprint" in str(running.error)
    running.stop()
    assert not _vectors(settings, shadow.collection, [f"z{i}" for i in range(10)])
    pending = redis_client.xpending(settings.stream, "g")
    assert pending["pending"] == 10  # left for a worker of the right model
    # The new collection's own group delivers them to the new model's workers...
    _drain(settings, redis_client, new_encoder, consumer="new")
    in_new = _vectors(settings, shadow.collection, [f"{p}{i}" for p in "az" for i in range(10)])
    assert len(in_new) == 20
    _model_of(in_new, new_encoder)
    # ...and the old model's worker, restarted, writes its pending ones into its own
    # collection (found by its fingerprint behind the alias), which stays complete.
    _drain(settings, redis_client, tiny_encoder, consumer="old")
    assert redis_client.xpending(settings.stream, "g")["pending"] == 0
    in_old = _vectors(settings, old, [f"{p}{i}" for p in "az" for i in range(10)])
    assert len(in_old) == 20
    _model_of(in_old, tiny_encoder)
