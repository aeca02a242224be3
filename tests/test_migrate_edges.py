"""Issue 26's edges of a migration: Redis losing its data midway (every step that changes
something refuses until the runbook's recovery), the group that feeds the collection once
``--drop-old`` destroyed the deployment's (producers' backpressure, ``lag``, the scaler's
group), and ``--adopt`` only while the writers are paused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis
from click.testing import CliRunner

from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ExitCode
from embedq.core.keys import collection_group
from embedq.core.records import Record
from embedq.model.encoder import Encoder
from embedq.ops import migrate as migrate_ops
from embedq.ops import migrate_guard, rollout
from embedq.ops.migrate import shadow_name
from embedq.producer.client import Producer
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_fingerprint

from .support.tiny_models import tiny_bert
from .test_migrate import _drain


@pytest.fixture(scope="session")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT's architecture with other weights: the model migrated to."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-edges"), seed=1)


class _Deployment(NamedTuple):
    settings: Settings
    client: redis.Redis
    old: Encoder  # the live collection's model
    new_model: Path
    active_s: float  # a worker counts as running this long after its last read


@pytest.fixture
def deployment(
    settings: Settings,
    redis_client: redis.Redis,
    tiny_encoder: Encoder,
    new_model: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> _Deployment:
    """Adoption does not wait out running workers' re-check; a worker counts as running
    for 1 s after its last read (the tests wait that out rather than 10 s)."""
    active_s = 1.0
    monkeypatch.setattr(migrate_ops, "RECHECK_S", 0.0)
    monkeypatch.setattr(migrate_guard, "ACTIVE_S", active_s)
    return _Deployment(settings, redis_client, tiny_encoder, new_model, active_s)


def _rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "text": f"{prefix} text {i}", "meta": {}} for i in range(n)]


def _cli(settings: Settings, command: str, *args: str) -> Any:
    where = ("--milvus-uri", settings.milvus_uri, "--collection", settings.collection)
    queue = ("--stream", settings.stream, "--group", settings.group)
    return CliRunner().invoke(main, [command, *args, *where, *queue])


def _milvus(settings: Settings) -> dict[str, Any]:
    """Every collection with its row count, and where each alias points."""
    sink = open_sink(settings, create=False)
    try:
        client = sink.client
        counts = {}
        for name in sorted(client.list_collections()):
            client.load_collection(name)
            got = client.query(
                name, filter="", output_fields=["count(*)"], consistency_level="Strong"
            )
            counts[name] = got[0]["count(*)"]
        aliases = {
            a: client.describe_alias(a)["collection_name"]
            for a in client.list_aliases().get("aliases", [])
        }
        return {"rows": counts, "aliases": aliases}
    finally:
        sink.close()


def _lose_redis(client: redis.Redis, settings: Settings) -> None:
    """What a Redis restart without persistence does to the deployment: every key gone."""
    keys = list(client.scan_iter(match=f"{settings.stream}*", count=1000))
    assert keys
    client.delete(*keys)


def _refused(result: Any, *words: str) -> None:
    assert result.exit_code == ExitCode.REFUSED, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("embedq: ")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def _started(deployment: _Deployment) -> str:
    """12 rows written by the old model, then the migration started and backfilled; the new
    model's collection (--adopt waits until the old worker's last writes are ACTIVE_S old)."""
    settings, client, old, new, _active_s = deployment
    Producer(client, settings.stream, group=settings.group).enqueue(_rows("p", 12))
    _drain(settings, client, old, "old")
    started = _cli(settings, "migrate", "--model", str(new), "--backfill", "--adopt")
    assert started.exit_code == 0, started.output
    return shadow_name(settings.collection, model_fingerprint(Encoder(str(new))))


def test_after_redis_lost_its_data_a_started_migration_refuses_until_recovered(
    deployment: _Deployment,
) -> None:
    settings, redis_client, tiny_encoder, new_model, _quick = deployment
    new = ("--model", str(new_model))
    target = _started(deployment)
    _lose_redis(redis_client, settings)
    _drain(settings, redis_client, tiny_encoder, "old")  # the workers restart
    before = _milvus(settings)
    assert before["rows"][target] == 12

    status = _cli(settings, "migrate", "--status")
    assert status.exit_code == 0, status.output
    assert "Redis lost its data" in status.output and "runbook" in status.output
    for step in (("--backfill",), ("--promote",), ("--follow",)):
        _refused(_cli(settings, "migrate", *new, *step), "Redis lost its data", "nothing")
    for step in ("--rollback", "--drop-old"):
        _refused(_cli(settings, "migrate", step), "Redis lost its data", "nothing")
    # The recovery flag alone does not do: the live collection's index must come back first.
    _refused(_cli(settings, "migrate", *new, "--backfill", "--accept-redis-loss"), "verify --adopt")
    assert _milvus(settings) == before

    adopted = _cli(settings, "verify", "--adopt")
    assert adopted.exit_code == 0, adopted.output
    # The new collection still cannot be proven complete: refused without the flag...
    _refused(_cli(settings, "migrate", *new, "--backfill"), "--accept-redis-loss")
    assert _milvus(settings) == before
    # ...and started again with it: dropped, a new group, backfilled from the live rows.
    again = _cli(settings, "migrate", *new, "--backfill", "--accept-redis-loss")
    assert again.exit_code == 0, again.output
    assert f"dropped {target}" in again.output
    assert _milvus(settings)["rows"][target] == 12
    group = collection_group(settings.group, target)
    assert group.encode() in {g["name"] for g in redis_client.xinfo_groups(settings.stream)}
    status = _cli(settings, "migrate", "--status")
    assert "Redis lost" not in status.output and "backfilled" in status.output


def _promoted(deployment: _Deployment) -> str:
    settings, client, _old, new, _active_s = deployment
    target = _started(deployment)
    updates = [{**row, "text": row["text"] + " v2"} for row in _rows("p", 3)]
    Producer(client, settings.stream, group=settings.group).enqueue(updates)
    _drain(settings, client, Encoder(str(new), device="cpu"), "new")
    promoted = _cli(settings, "migrate", "--model", str(new), "--promote")
    assert promoted.exit_code == 0, promoted.output
    return target


def test_after_redis_lost_its_data_a_promoted_migration_keeps_the_old_collection(
    deployment: _Deployment,
) -> None:
    """The dangerous step: --drop-old would drop the only collection that may hold the
    writes the new one lost with Redis's data."""
    settings, redis_client = deployment.settings, deployment.client
    target = _promoted(deployment)
    _lose_redis(redis_client, settings)
    before = _milvus(settings)
    assert before["aliases"] == {settings.collection: target} and len(before["rows"]) == 2
    _refused(_cli(settings, "migrate", "--drop-old"), "Redis lost its data")
    _refused(_cli(settings, "migrate", "--rollback"), "Redis lost its data")
    assert _milvus(settings) == before

    assert _cli(settings, "verify", "--adopt").exit_code == 0
    _refused(_cli(settings, "migrate", "--drop-old"), "Redis lost its data")
    dropped = _cli(settings, "migrate", "--drop-old", "--accept-redis-loss")
    assert dropped.exit_code == 0, dropped.output
    assert _milvus(settings)["rows"] == {target: 12}


def test_after_drop_old_producers_and_lag_follow_the_group_of_the_live_collection(
    deployment: _Deployment,
) -> None:
    settings, redis_client, _tiny_encoder, new_model, quick = deployment
    target = _promoted(deployment)
    live = collection_group(settings.group, target)
    time.sleep(quick)  # the old-model worker stopped
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout, "ACTIVE_S", quick)
        dropped = _cli(settings, "migrate", "--drop-old")
    assert dropped.exit_code == 0, dropped.output
    assert f"destroyed group {settings.group}" in dropped.output
    assert f"stream.group (KEDA's consumerGroup, the workers' --group) to {live}" in (
        dropped.output
    )
    status = _cli(settings, "migrate", "--status")
    assert f"fed by group {live}" in status.output
    groups = [g["name"].decode() for g in redis_client.xinfo_groups(settings.stream)]
    assert groups == [live]

    shown = _cli(settings, "lag", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["group"] == live

    # --group names the deployment's group, which is gone; the stream still holds the
    # 15 entries, which the live group has finished: room for the producer.
    producer = Producer(redis_client, settings.stream, group=settings.group, chunk=4)
    records = [Record(id=f"m{i}", text=f"more {i}") for i in range(10)]
    sending = threading.Thread(
        target=producer.run, args=(records,), kwargs={"max_lag": 5, "poll_s": 0.05}
    )
    sending.start()
    # 4 sent, then 8 > 5 undelivered to the live group: paused until a worker reads it.
    deadline = time.monotonic() + 30
    while redis_client.xlen(settings.stream) < 23 and time.monotonic() < deadline:
        time.sleep(0.05)
    sending.join(1.0)
    assert sending.is_alive() and redis_client.xlen(settings.stream) == 23
    _drain(settings, redis_client, Encoder(str(new_model), device="cpu"), "new")
    sending.join(30)
    assert not sending.is_alive() and producer.counts.sent == 10


def test_adopt_refuses_while_the_group_is_not_quiet(
    deployment: _Deployment,
) -> None:
    settings, redis_client, tiny_encoder, new_model, _quick = deployment
    producer = Producer(redis_client, settings.stream, group=settings.group)
    producer.enqueue(_rows("q", 6))
    _drain(settings, redis_client, tiny_encoder, "old")
    before = _milvus(settings)
    adopt = ("--model", str(new_model), "--backfill", "--adopt")

    # Entries not yet delivered (producers writing, no worker caught up): refused.
    producer.enqueue(_rows("q", 2))
    _refused(_cli(settings, "migrate", *adopt), "not quiet", "2 undelivered", "Pause the")
    # Delivered to a worker that has not written them yet: refused.
    taken: Any = redis_client.xreadgroup(settings.group, "busy", {settings.stream: ">"}, count=1)
    _refused(_cli(settings, "migrate", *adopt), "1 undelivered, 1 pending")
    assert _milvus(settings) == before

    # A worker that wrote the last entries a moment ago: adopted once it is quiet.
    redis_client.xack(settings.stream, settings.group, taken[0][1][0][0])  # "busy" wrote it
    _drain(settings, redis_client, tiny_encoder, "old")
    done = _cli(settings, "migrate", *adopt)
    assert done.exit_code == 0, done.output
    assert _milvus(settings)["aliases"] == {
        settings.collection: shadow_name(settings.collection, model_fingerprint(tiny_encoder))
    }
