"""Redis data loss is reported, and destructive repairs are guarded (issue 25).

After Redis lost its data (a restart without AOF, FLUSHALL) or with a wrong ``--stream`` or
``--partitions``, every row of the collection is unknown to the index: ``verify --repair``
must refuse to delete them (exit 4, one line, nothing deleted), ``--max-delete`` bounds a
legitimate repair, ``verify --adopt`` rebuilds the index from the collection, and the
worker, ``lag``, ``top``, ``jobs`` and ``job`` say what happened. The deployment's epoch
(``embedq.sink.epoch``) is what tells a lost Redis from a new one.

Each test has a private ``redis-server`` without persistence (it flushes and restarts it),
a Milvus Lite file of its own (one test: the real 2.3.5 server) and the tiny model.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.keys import Keys, partition_streams
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.stream import Stream, open_streams
from embedq.sink import epoch
from embedq.sink.milvus import Row, Sink, open_sink
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .support.servers import MilvusStandalone, RedisServer


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server without persistence: a restart or a FLUSHALL loses everything."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(lossy: RedisServer) -> Iterator[redis.Redis]:
    client = lossy.client()
    yield client
    client.close()


@pytest.fixture
def settings(settings: Settings, lossy: RedisServer) -> Settings:
    return settings.replace(redis_url=lossy.url, online=False)


def records(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "text": f"record number {i} of the {prefix} kind"} for i in range(n)
    ]


def drain(
    settings: Settings, client: redis.Redis, sink: Sink, encoder: Encoder, **changes: Any
) -> Worker:
    """One worker with the tiny model, run until nothing is left."""
    s = settings.replace(**changes)
    worker = assemble(s, Stream(client, s.stream, s.group, s.consumer), encoder, sink)
    worker.run()
    return worker


def deploy(
    settings: Settings,
    client: redis.Redis,
    sink: Sink,
    encoder: Encoder,
    n: int,
    *,
    job: str | None = None,
) -> None:
    """``n`` records sent (to ``settings.partitions`` streams) and embedded."""
    producer = Producer(
        client, settings.stream, partitions=settings.partitions, collection=settings.collection
    )
    producer.enqueue(records(n), job=job)
    drain(settings, client, sink, encoder)
    assert sink.count() == n


def embedq(settings: Settings, *args: str, milvus: bool = True, **flags: str) -> Result:
    """``embedq ARGS`` in this process, on the test's Redis, stream and collection."""
    given = {
        "redis-url": settings.redis_url,
        "stream": settings.stream,
        "partitions": str(settings.partitions),
        "group": settings.group,
        "log-level": "warning",
    }
    if milvus:
        given |= {"milvus-uri": settings.milvus_uri, "collection": settings.collection}
    given |= {k.replace("_", "-"): v for k, v in flags.items()}
    argv = [*args] + [part for k, v in given.items() for part in (f"--{k}", v)]
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def refused(result: Result) -> str:
    """The one line a refused repair prints (exit 4)."""
    assert result.exit_code == 4, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("embedq: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def stray(sink: Sink, ids: Sequence[str]) -> None:
    """Rows written behind embedq's back: the index does not know them."""
    dim = sink.dimension or 32
    sink.upsert([Row(id=i, vector=np.ones(dim, np.float32), text="not ours", meta={}) for i in ids])


def stream_lengths(client: redis.Redis, settings: Settings) -> int:
    return sum(int(client.xlen(s)) for s in partition_streams(settings.stream, settings.partitions))


# -- repair refuses when the index is not this collection's -------------------------------


def test_repair_after_flushall_refuses_says_why_and_deletes_nothing(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 20)
    redis_client.flushall()

    checked = embedq(settings, "verify")
    assert checked.exit_code == 1
    lost = [line for line in checked.output.splitlines() if "Redis lost its data" in line]
    assert len(lost) == 1 and "20 rows in Milvus are unknown" in lost[0], checked.output
    assert "embedq verify --adopt" in lost[0]

    for bound in ("10%", "all"):  # --max-delete all does not lift it
        line = refused(embedq(settings, "verify", "--repair", max_delete=bound))
        assert "refused to delete 20 of 20 rows" in line and "Redis lost its data" in line
        assert "--accept-redis-loss" in line
    assert sink.count() == 20
    assert stream_lengths(redis_client, settings) == 0  # nothing sent: no delete, no resend


def test_accept_redis_loss_repairs_once_everything_was_sent_again(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 20)
    redis_client.flushall()
    stray(sink, ["gone-at-the-source"])  # deleted at the source while Redis was empty
    Producer(redis_client, settings.stream, collection=settings.collection).enqueue(records(20))
    drain(settings, redis_client, sink, tiny_encoder)
    refused(embedq(settings, "verify", "--repair"))  # the loss is still on record

    fixed = embedq(settings, "verify", "--repair", "--accept-redis-loss")
    assert fixed.exit_code == 0 and "repair: sent 0 again, 1 deletes" in fixed.output
    drain(settings, redis_client, sink, tiny_encoder)
    after = embedq(settings, "verify")
    assert after.exit_code == 0 and "Redis lost its data" not in after.output, after.output
    assert sink.count() == 20


def test_repair_after_a_restart_without_persistence_refuses(
    settings: Settings,
    lossy: RedisServer,
    redis_client: redis.Redis,
    sink: Sink,
    tiny_encoder: Encoder,
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 12)
    lossy.restart()  # no AOF: it comes back empty

    line = refused(embedq(settings, "verify", "--repair", max_delete="all"))
    assert "Redis lost its data" in line
    assert sink.count() == 12


def test_repair_with_a_wrong_stream_refuses(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 12)

    line = refused(embedq(settings, "verify", "--repair", stream=settings.stream + "-typo"))
    assert "or --redis-url/--stream name another deployment" in line
    assert sink.count() == 12
    assert redis_client.xlen(settings.stream + "-typo") == 0


def test_repair_with_wrong_partitions_refuses_even_unbounded(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    settings = settings.replace(partitions=3)
    deploy(settings, redis_client, sink, tiny_encoder, 30)
    before = stream_lengths(redis_client, settings)

    one = refused(embedq(settings, "verify", "--repair", partitions="1", max_delete="all"))
    assert "holds no row of this collection" in one and "--partitions 1" in one
    two = refused(embedq(settings, "verify", "--repair", partitions="2", max_delete="all"))
    assert "--partitions is not the producers'" in two
    assert sink.count() == 30
    assert stream_lengths(redis_client, settings) == before
    assert redis_client.xlen(settings.stream) == 0  # --partitions 1's stream got nothing


# -- --max-delete bounds a legitimate repair ------------------------------------------------


def test_max_delete_bounds_a_repair_and_a_legit_one_still_works(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 20)
    sink.delete(["r1", "r2"])  # behind embedq's back: resent by a repair
    stray(sink, [f"x{i}" for i in range(5)])  # 5 unknown of 23 rows
    drained = redis_client.xlen(settings.stream)

    line = refused(embedq(settings, "verify", "--repair"))  # 10% of 23: 2
    assert line == (
        "embedq: refused to delete 5 of 23 rows unknown to the index: more than --max-delete "
        "allows (2, 10% of 23); nothing was deleted. Check the evidence, then rerun with "
        "--max-delete 5 (or all)"
    )
    refused(embedq(settings, "verify", "--repair", max_delete="4"))
    assert redis_client.xlen(settings.stream) == drained  # refused: nothing sent at all

    typo = embedq(settings, "verify", "--repair", max_delete="10x")
    assert typo.exit_code == 2 and "give a number of rows (100), a share (10%) or all" in (
        typo.stderr
    )

    for bound in ("5", "25%", "all"):
        fixed = embedq(settings, "verify", "--repair", max_delete=bound)
        assert fixed.exit_code == 0, (bound, fixed.output, fixed.stderr)
        assert "repair: sent 2 again, 5 deletes" in fixed.output
    assert redis_client.xlen(settings.stream) == drained + 3 * 7

    drain(settings, redis_client, sink, tiny_encoder)
    clean = embedq(settings, "verify")
    assert clean.exit_code == 0 and "clean" in clean.output, clean.output
    assert sink.count() == 20


# -- verify --adopt -----------------------------------------------------------------------


def test_adopt_after_flushall_makes_verify_clean_and_dedup_send_nothing(
    settings: Settings,
    redis_client: redis.Redis,
    sink: Sink,
    tiny_encoder: Encoder,
    tmp_path: Path,
) -> None:
    settings = settings.replace(partitions=2)
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records(30)))
    sent = embedq(settings, "enqueue", str(source), milvus=False, collection=settings.collection)
    assert sent.exit_code == 0, sent.stderr
    drain(settings, redis_client, sink, tiny_encoder)
    assert sink.count() == 30
    redis_client.flushall()
    stray(sink, ["x0"])  # written behind embedq's back: no version, not adopted
    # A worker meanwhile recorded a newer version of r3 than its row: adopt keeps it.
    streams = open_streams(settings.replace(block_ms=0))
    newer = streams[[s.keys.stream for s in streams].index(_owner(settings, "r3"))]
    redis_client.hset(newer.keys.index(settings.collection), "r3", "99999999999999-0 newer")

    adopted = embedq(settings, "verify", "--adopt")
    assert adopted.exit_code == 1, adopted.output  # r3 changed (the newer entry), x0 unknown
    assert "adopted  31 rows into the index (29 entries written, 1 kept" in adopted.output
    assert "1 without a version" in adopted.output
    assert "Redis lost its data" not in adopted.output
    redis_client.hdel(newer.keys.index(settings.collection), "r3")
    adopted_entries = {
        k: v
        for s in streams
        for k, v in redis_client.hgetall(s.keys.index(settings.collection)).items()
    }
    # Each adopted entry carries the digest of the vector Milvus holds, so a vector changed
    # behind embedq's back after the adoption is still found.
    assert len(adopted_entries) == 29 and all(len(v.split()) == 3 for v in adopted_entries.values())
    report = json.loads(embedq(settings, "verify", "--adopt", "--json").output)
    assert (report["changed"], report["unknown"], report["redis_data_lost"]) == ([], ["x0"], False)

    fixed = embedq(settings, "verify", "--repair")  # a legit repair: 1 of 31 within 10%
    assert fixed.exit_code == 0 and "0 again, 1 deletes" in fixed.output, fixed.output
    drain(settings, redis_client, sink, tiny_encoder)
    checked = embedq(settings, "verify", "--json")
    assert checked.exit_code == 0 and json.loads(checked.output)["clean"], checked.output
    assert json.loads(embedq(settings, "lag", "--json").output)["redis_data_lost"] is False
    before = stream_lengths(redis_client, settings)

    again = embedq(
        settings, "enqueue", str(source), "--dedup", milvus=False, collection=settings.collection
    )
    assert again.exit_code in (0, 5), again.stderr
    assert stream_lengths(redis_client, settings) == before  # all unchanged: none sent


def _owner(settings: Settings, doc_id: str) -> str:
    from embedq.core.keys import partition_for

    return partition_streams(settings.stream, settings.partitions)[
        partition_for(doc_id, settings.partitions)
    ]


# -- every command says it ------------------------------------------------------------------


def test_worker_lag_top_jobs_and_job_report_the_loss(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> None:
    deploy(settings, redis_client, sink, tiny_encoder, 10, job="j1")
    assert json.loads(embedq(settings, "lag", "--json").output)["redis_data_lost"] is False
    redis_client.flushall()
    # Entries of the job still in flight when Redis lost its data: a worker embeds them and
    # counts them on a job whose keys are gone (today: a "zombie", started 1970-01-01).
    for i in range(3):
        redis_client.xadd(settings.stream, {"id": f"late{i}", "text": "late text", "job": "j1"})

    with capture_logs() as logs:
        worker = drain(settings, redis_client, sink, tiny_encoder)
    lost = [e for e in logs if e["event"] == "redis_data_lost"]
    assert len(lost) == 1 and lost[0]["log_level"] == "warning"
    assert "10 rows in Milvus are unknown to the index" in lost[0]["message"]
    labels = {"stream": settings.stream, "group": settings.group}
    assert worker.metrics.registry.get_sample_value("embedq_redis_data_lost", labels) == 1

    watch = epoch.EpochWatch(settings, open_streams(settings.replace(block_ms=0)), 30.0)
    watch.refresh()  # what `embedq exporter` serves
    assert [(m.name, m.samples[0].value) for m in watch.collect()] == [
        ("embedq_redis_data_lost", 1)
    ]

    lag = embedq(settings, "lag")
    assert [line for line in lag.output.splitlines() if "Redis lost its data" in line] == [
        lag.output.splitlines()[0]
    ]
    as_json = json.loads(embedq(settings, "lag", "--json").output)
    assert as_json["redis_data_lost"] is True
    assert "Redis lost its data" in as_json["redis_data_lost_message"]
    top = embedq(settings, "top", "--iterations", "1")
    assert sum("Redis lost its data" in line for line in top.output.splitlines()) == 1
    assert json.loads(embedq(settings, "top", "--iterations", "1", "--json").output)[
        "redis_data_lost"
    ]

    jobs = embedq(settings, "jobs")
    assert [line.split()[:2] for line in jobs.stdout.splitlines()[1:]] == [["j1", "lost"]]
    assert sum("Redis lost its data" in line for line in jobs.stderr.splitlines()) == 1
    job = embedq(settings, "job", "j1")
    assert job.exit_code == 0 and "1970" not in job.output
    assert "Redis lost this job's keys" in job.stdout
    assert sum("Redis lost its data" in line for line in job.stderr.splitlines()) == 1
    shown = json.loads(embedq(settings, "job", "j1", "--json").stdout)
    assert (shown["state"], shown["started_ms"], shown["embedded"]) == ("lost", None, 3)
    assert "pruned 1 jobs: j1" in embedq(settings, "jobs", "--prune", milvus=False).output


# -- the epoch itself -----------------------------------------------------------------------


def test_an_older_collection_takes_redis_epoch_and_racing_workers_agree(
    settings: Settings, redis_client: redis.Redis, sink: Sink
) -> None:
    sink.ensure_collection(8, "m")  # a collection from before epochs: none recorded
    streams = open_streams(settings.replace(block_ms=0))
    assert epoch.in_collection(sink) is None and not epoch.check(streams, sink).lost
    first = epoch.claim_in_redis(streams[0], settings.collection)
    assert epoch.claim_in_redis(streams[0], settings.collection) == first  # HSETNX: one wins
    standing = epoch.establish(streams, sink)
    assert (standing.redis, standing.collection, standing.lost) == (first, first, False)
    assert epoch.in_collection(sink) == first
    assert (
        redis_client.hget(Keys(settings.stream).epoch, settings.collection) == str(first).encode()
    )


def test_the_epoch_lives_in_the_collection_properties_on_the_real_server(
    settings: Settings,
    redis_client: redis.Redis,
    milvus_standalone: MilvusStandalone,
    tiny_encoder: Encoder,
) -> None:
    settings = settings.replace(
        milvus_uri=milvus_standalone.uri, collection=f"t_{uuid.uuid4().hex[:12]}"
    )
    sink = open_sink(settings)
    try:
        deploy(settings, redis_client, sink, tiny_encoder, 6)
        streams = open_streams(settings.replace(block_ms=0))
        recorded = epoch.in_collection(sink)
        assert recorded is not None and recorded == epoch.in_redis(streams[0], sink.collection)
        properties = sink.client.describe_collection(settings.collection)["properties"]
        assert properties.get("embedq.fingerprint")  # recording the epoch kept the others
        redis_client.flushall()
        standing = epoch.check(streams, sink)
        assert standing.lost and standing.unknown == 6
        refused(embedq(settings, "verify", "--repair", max_delete="all"))
        assert embedq(settings, "verify", "--adopt").exit_code == 0
        after = epoch.check(streams, sink)
        assert not after.lost and after.collection == epoch.in_redis(streams[0], sink.collection)
        assert after.collection != recorded  # Redis's fresh epoch replaced the old one
        assert sink.count() == 6
    finally:
        sink.client.drop_collection(settings.collection)
        sink.close()
