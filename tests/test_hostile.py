"""Hostile conditions, each produced for real: a Redis out of memory, poison past
max-deliveries hidden behind a live consumer's pending entries. Real redis-server
processes, Milvus Lite, the packaged model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq.core.config import Settings
from embedq.core.errors import QueueFull
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import open_sink
from embedq.worker.launch import assemble

from .conftest import corpus_rows
from .support.servers import MilvusStandalone, RedisServer
from .test_cli import embedq


def local(stream: str, tmp_path: Path, **changes: object) -> Settings:
    """A drained worker's settings on ``stream`` (group g, consumer c1), writing to a Milvus
    Lite file of the test's own; the worker gets its Redis client from the test."""
    base: dict[str, object] = {
        "stream": stream,
        "group": "g",
        "consumer": "c1",
        "milvus_uri": str(tmp_path / "milvus.db"),
        "block_ms": 100,
        "drain": True,
    }
    return Settings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", "--maxmemory-policy", "noeviction").start()
    yield server
    server.stop()


def test_a_full_redis_refuses_producers_clearly_while_workers_keep_draining(
    tmp_path: Path, full_redis: RedisServer, encoder: Encoder
) -> None:
    client = full_redis.client()
    stream = "full:tasks"
    rows = corpus_rows("short.jsonl", 120)
    Producer(client, stream).enqueue(rows)
    client.xadd(stream, {"id": "poison", "text": "  "})  # to be dead-lettered under OOM
    client.config_set("maxmemory", 1)  # Redis is now full: writes that grow it are refused

    with pytest.raises(QueueFull, match="out of memory"):
        Producer(client, stream).enqueue([{"id": "late", "text": "no room"}])
    source = tmp_path / "late.jsonl"
    source.write_text(json.dumps({"id": "late", "text": "no room"}) + "\n", encoding="utf-8")
    refused = embedq(
        "enqueue", str(source), env={"EMBEDQ_REDIS_URL": full_redis.url, "EMBEDQ_STREAM": stream}
    )
    assert refused.returncode == 3, refused.stderr
    assert "Traceback" not in refused.stderr
    said = [line for line in refused.stderr.splitlines() if not line.startswith("{")]
    assert said[-1].startswith("embedq: redis is out of memory"), refused.stderr
    # An operator sees it where they look first.
    env = {"EMBEDQ_REDIS_URL": full_redis.url, "EMBEDQ_STREAM": stream}
    shown = embedq("lag", env=env)
    assert shown.returncode == 0 and "FULL" in shown.stdout, shown.stdout + shown.stderr
    as_json = json.loads(embedq("lag", "--json", env=env).stdout)
    assert as_json["redis_memory"]["full"] is True

    # A worker started on the full Redis drains it: reads, the fenced write, acks and the
    # dead letter all go through; only job counters and error hints are refused (skipped).
    settings = local(stream, tmp_path, redis_url=full_redis.url, collection="full")
    client.config_set("maxmemory", 0)
    Stream(client, stream, "g", "c1").ensure_group()  # the group needs room once
    client.config_set("maxmemory", 1)
    sink = open_sink(settings)
    try:
        stats = assemble(settings, Stream(client, stream, "g", "c1"), encoder, sink).run()
        assert (stats.texts, stats.dead_lettered) == (120, 1)
        assert sink.count() == 120
    finally:
        sink.close()
    assert client.xpending(stream, "g")["pending"] == 0
    assert client.xlen(f"{stream}:dlq") == 1

    client.config_set("maxmemory", 0)  # memory freed: producers go on
    assert Producer(client, stream).enqueue([{"id": "late", "text": "room again"}]) == 1
    client.close()


def test_own_pending_entries_past_max_deliveries_are_dead_lettered_on_restart(
    redis_client: redis.Redis, stream_name: str, tmp_path: Path, encoder: Encoder
) -> None:
    """A worker that crashed on an entry again and again re-reads its own pending entries
    first on each restart: that path counts deliveries too, so the loop ends."""
    good = corpus_rows("short.jsonl", 3)
    for row in good:
        redis_client.xadd(stream_name, {"id": row["id"], "text": row["text"]})
    settings = local(
        stream_name, tmp_path, consumer="crashy", collection="pending", max_deliveries=3
    )
    stream = Stream(redis_client, stream_name, "g", "crashy")
    stream.ensure_group()
    entries = stream.read_new(10, 0)
    poisoned = entries[1].entry_id
    # Delivered 9 times already (crash loops under the same consumer name).
    redis_client.xclaim(stream_name, "g", "crashy", 0, [poisoned], retrycount=9, justid=True)
    sink = open_sink(settings)
    try:
        stats = assemble(settings, stream, encoder, sink).run()
    finally:
        sink.close()
    assert stats.texts == 2 and stats.dead_lettered == 1
    dead = redis_client.xrange(f"{stream_name}:dlq")
    assert [(f[b"_dlq_reason"], f[b"_dlq_source_id"].decode()) for _, f in dead] == [
        (b"max_deliveries", poisoned)
    ]
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_poison_is_counted_exactly_even_behind_a_live_consumers_pending_entries(
    redis_client: redis.Redis, stream_name: str
) -> None:
    from embedq.worker.reclaimer import Reclaimer

    stream = Stream(redis_client, stream_name, "g", "reclaimer")
    stream.ensure_group()
    first = redis_client.xadd(stream_name, {"id": "a", "text": "x"}).decode()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(500):
        pipe.xadd(stream_name, {"id": f"f{i}", "text": "x"})
    fillers = [eid.decode() for eid in pipe.execute()]
    last = redis_client.xadd(stream_name, {"id": "b", "text": "x"}).decode()
    redis_client.xreadgroup("g", "dead", {stream_name: ">"}, count=1000)
    # 500 entries a live consumer holds (fresh), between two delivered 10 times (long idle).
    redis_client.xclaim(stream_name, "g", "live", 0, fillers, justid=True)
    redis_client.xclaim(
        stream_name, "g", "dead", 0, [first, last], idle=600_000, retrycount=10, justid=True
    )
    dead: list[tuple[str, str, int]] = []
    reclaimer = Reclaimer(
        stream,
        min_idle_s=60,
        max_deliveries=5,
        count=100,
        dead_letter=lambda e, reason, _why, n: dead.append((e.entry_id, reason, n)),
    )
    assert reclaimer.step() == []
    assert sorted(dead) == sorted([(first, "max_deliveries", 11), (last, "max_deliveries", 11)])


def test_a_reclaimer_never_dead_letters_what_its_own_worker_holds(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """After a Redis outage longer than min-idle a worker's own entries look abandoned."""
    from embedq.worker.reclaimer import Reclaimer

    stream = Stream(redis_client, stream_name, "g", "me")
    stream.ensure_group()
    for i in range(3):
        redis_client.xadd(stream_name, {"id": str(i), "text": "x"})
    ours = [e.entry_id for e in stream.read_new(10, 0)]
    redis_client.xclaim(stream_name, "g", "me", 0, ours, idle=600_000, retrycount=9, justid=True)
    dead: list[str] = []
    reclaimer = Reclaimer(
        stream,
        min_idle_s=60,
        max_deliveries=5,
        count=100,
        dead_letter=lambda e, *_: dead.append(e.entry_id),
    )
    held = set(ours[:2])  # still in the worker's pipeline
    assert reclaimer.step(held=held.__contains__) == []
    assert dead == [ours[2]]


def test_an_enqueue_retried_after_a_lost_reply_adds_nothing_twice(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """redis-py's cluster client retries a call whose reply it lost; the script must not
    run the batch twice (the lost reply itself is not reproduced here: the retry is)."""
    from embedq.queue.jobs import EnqueueBatch, JobLedger

    ledger = JobLedger(redis_client, stream_name)
    batch = EnqueueBatch(stream_name, 4, ["a", "text a", b"", b"", "b", "text b", b"", b""])
    assert ledger.send("job-1", [batch]) == 2
    assert ledger.send("job-1", [batch]) == 0  # the same (job, position) again
    assert redis_client.xlen(stream_name) == 2
    assert ledger.positions("job-1", [stream_name]) == {stream_name: 4}
    later = EnqueueBatch(stream_name, 6, ["c", "text c", b"", b""])
    assert ledger.send("job-1", [later]) == 1 and redis_client.xlen(stream_name) == 3


def test_a_hung_forward_pass_lets_its_entries_go_and_fails_liveness(
    redis_client: redis.Redis, stream_name: str, tmp_path: Path, encoder: Encoder
) -> None:
    """A forward pass that never returns (a stand-in: a CPU cannot hang a CUDA kernel on
    demand) must not hold its entries forever behind a healthy-looking heartbeat."""
    import threading
    import time

    from .support.servers import wait_until

    release = threading.Event()

    class Hung:
        def __getattr__(self, name: str) -> object:
            return getattr(encoder, name)

        def forward(self, batch: object) -> object:
            release.wait(60)
            return encoder.forward(batch)  # type: ignore[arg-type]

    for row in corpus_rows("short.jsonl", 4):
        redis_client.xadd(stream_name, {"id": row["id"], "text": row["text"]})
    settings = local(
        stream_name,
        tmp_path,
        consumer="hung",
        collection="hung",
        drain=False,
        min_idle_s=1.0,
        milvus_timeout_s=0.5,
        stage_timeout_s=1.0,
    )
    sink = open_sink(settings)
    worker = assemble(settings, Stream(redis_client, stream_name, "g", "hung"), [Hung()], sink)  # type: ignore[list-item]
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        wait_until(lambda: bool(worker.parts.watchdog.stuck()), 30, "the model stage to be stuck")
        time.sleep(2.5)  # past min-idle with no heartbeat
        other = Stream(redis_client, stream_name, "g", "rescuer")
        claimed = other.autoclaim(1000, "0-0", count=10)
        assert len(claimed.entries) == 4  # another worker can take them over
    finally:
        release.set()
        worker.stop_requested.set()
        runner.join(30)
        sink.close()


@pytest.fixture(scope="module")
def quota_milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStandalone]:
    """A real Milvus 2.3.5 server whose quota settings deny every write (what a node over
    its memory or disk quota does), set through its own milvus.yaml."""
    server = MilvusStandalone(
        tmp_path_factory.mktemp("quota-milvus"),
        config=["quotaAndLimits.limitWriting.forceDeny=true"],
    )
    try:
        server.start()
    except TimeoutError:
        server.stop()
        raise
    yield server
    server.stop()


def test_milvus_denying_writes_by_quota_dead_letters_nothing(
    redis_client: redis.Redis, stream_name: str, quota_milvus: MilvusStandalone, encoder: Encoder
) -> None:
    import threading

    from embedq.core.errors import StageCrashed

    from .support.servers import wait_until

    for row in corpus_rows("short.jsonl", 20):
        redis_client.xadd(stream_name, {"id": row["id"], "text": row["text"]})
    settings = local(
        stream_name,
        Path(),
        milvus_uri=quota_milvus.uri,
        collection=f"quota_{stream_name[-12:]}",
    )
    sink = open_sink(settings)
    worker = assemble(settings, Stream(redis_client, stream_name, "g", "c1"), encoder, sink)
    outcome: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run_into(worker, outcome), daemon=True)
    runner.start()
    try:
        wait_until(
            lambda: worker.metrics.errors.labels(kind="milvus")._value.get() >= 1,
            60,
            "the worker to meet the quota",
        )
        # Retrying, holding everything: nothing written, acked or dead-lettered.
        assert redis_client.xlen(f"{stream_name}:dlq") == 0
        assert redis_client.xpending(stream_name, "g")["pending"] == 20
        assert worker.stats.texts == 0
    finally:
        worker.parts.crash.append(RuntimeError("test over"))  # ends the retries
        worker.stop_requested.set()
        runner.join(60)
        sink.close()
    assert outcome and isinstance(outcome[0], StageCrashed)
    assert redis_client.xlen(f"{stream_name}:dlq") == 0


def _run_into(worker: object, outcome: list[BaseException]) -> None:
    try:
        worker.run()  # type: ignore[attr-defined]
    except BaseException as exc:
        outcome.append(exc)


def test_a_collection_dropped_behind_the_workers_back_stops_it_and_a_restart_recovers(
    redis_client: redis.Redis, stream_name: str, tmp_path: Path, encoder: Encoder
) -> None:
    from embedq.core.errors import CollectionMissing
    from embedq.queue.versions import Versions

    rows = corpus_rows("short.jsonl", 10)
    for row in rows:
        redis_client.xadd(stream_name, {"id": row["id"], "text": row["text"]})
    settings = local(stream_name, tmp_path, collection="dropped")
    sink = open_sink(settings)
    stream = Stream(redis_client, stream_name, "g", "c1")
    try:
        first = assemble(settings, stream, encoder, sink)
        first.run()
        index = Versions(redis_client, stream.keys, "dropped")
        assert all(index.held([r["id"] for r in rows]))
        sink.client.drop_collection("dropped")  # behind embedq's back
        redis_client.xadd(stream_name, {"id": "late", "text": "after the drop"})
        with pytest.raises(CollectionMissing):
            first.process(stream.read_new(10, 0))
        assert redis_client.xlen(f"{stream_name}:dlq") == 0  # nothing blamed on the rows
        assert redis_client.xpending(stream_name, "g")["pending"] == 1
        # A restarted worker creates the collection again and forgets the old index, so the
        # producers' re-send is written, not skipped as unchanged.
        assemble(settings, stream, encoder, sink).run()
        assert index.held([r["id"] for r in rows]) == [None] * len(rows)
        assert [r["id"] for r in sink.get(["late"], with_vectors=False)] == ["late"]
    finally:
        sink.close()


def test_oversized_texts_are_refused_at_the_producer_and_cut_in_the_dead_letter_copy(
    redis_client: redis.Redis, stream_name: str, tmp_path: Path, encoder: Encoder
) -> None:
    from embedq.producer.client import as_record
    from embedq.queue.dlq import retry

    producer = Producer(redis_client, stream_name, max_text_bytes=1000)
    rejected: list[str] = []
    counts = producer.run(
        iter([as_record({"id": "big", "text": "é" * 600}), as_record({"id": "ok", "text": "x"})]),
        on_rejected=lambda r: rejected.append(r.reason),
    )
    assert (counts.sent, counts.rejected) == (1, 1)
    assert rejected == ["text is 1200 bytes, the limit is 1000 (--max-text-bytes)"]

    # One that reached the stream anyway (another producer): its dead-letter copy keeps
    # only the head of the text, and it cannot be retried as if it were the original.
    redis_client.xadd(stream_name, {"id": "huge", "text": "y" * 200_000})
    settings = local(stream_name, tmp_path, collection="big", max_text_bytes=100_000)
    sink = open_sink(settings)
    stream = Stream(redis_client, stream_name, "g", "c1")
    try:
        assert assemble(settings, stream, encoder, sink).run().dead_lettered == 1
    finally:
        sink.close()
    [(dlq_id, fields)] = redis_client.xrange(f"{stream_name}:dlq")
    assert fields[b"_dlq_reason"] == b"text_too_large"
    assert len(fields[b"text"]) == 1024 and fields[b"_dlq_truncated"] == b"text:200000"
    assert retry([stream.dlq], [dlq_id.decode()]) == {}  # refused: not the original


def test_wait_replicas_confirms_each_batch_on_a_replica_or_fails_loudly(tmp_path: Path) -> None:
    from embedq.core.errors import QueueUnavailable

    from .support.servers import wait_until

    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    client = primary.client()
    try:
        wait_until(
            lambda: client.info("replication").get("slave0", {}).get("state") == "online",
            30,
            "the replica to be in sync",
        )
        producer = Producer(client, "rep:tasks", wait_replicas=1)
        assert producer.enqueue([{"id": "a", "text": "on two servers"}], job="j1") == 1
        assert replica.client().xlen("rep:tasks") == 1  # there when enqueue returned
        replica.stop()
        with pytest.raises(QueueUnavailable, match="0 of 1 replicas"):
            producer.enqueue([{"id": "b", "text": "only on one"}], job="j2")
    finally:
        client.close()
        replica.stop()
        primary.stop()


def test_a_lost_reply_on_a_cluster_does_not_send_records_twice(tmp_path: Path) -> None:
    """redis-py's cluster client retries a command whose reply it lost. A real cluster node
    (one node holding every slot, announcing a reply-dropping proxy as its address, so the
    client talks through it) runs the enqueue script, the proxy swallows the reply: the
    client's retry must add nothing."""
    from .support.servers import ReplyDroppingProxy, wait_until

    node = RedisServer(tmp_path / "node", cluster=True).start()
    admin = node.client()
    proxy = ReplyDroppingProxy(node.port, b"EVALSHA")
    try:
        admin.config_set("cluster-announce-ip", "127.0.0.1")
        admin.config_set("cluster-announce-port", proxy.port)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_until(lambda: admin.cluster("info")["cluster_state"] == "ok", 30, "the cluster")
        # Clients are sent to the proxy: the slot map names its port, not the node's.
        wait_until(
            lambda: admin.execute_command("CLUSTER", "SLOTS")[0][2][1] == proxy.port,
            30,
            "the slot map to announce the proxy",
        )
        producer = Producer.connect(f"redis://127.0.0.1:{proxy.port}/0", "{t}:tasks", cluster=True)
        producer.enqueue([{"id": "warm", "text": "loads the script"}], job="warm-up")
        proxy.armed.set()
        rows = [{"id": f"r{i}", "text": f"record {i}"} for i in range(5)]
        assert producer.enqueue(rows, job="lost-reply") in (0, 5)  # the retry added nothing
        assert proxy.dropped == 1  # the reply really was lost, and the client retried
        assert admin.xlen("{t}:tasks") == 6  # warm-up + the 5, once each
        producer.close()
    finally:
        proxy.close()
        admin.close()
        node.stop()
