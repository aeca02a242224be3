"""Partitioned streams: key naming against Redis Cluster's slot rule (checked by a real
cluster-enabled redis-server), stable partitioning, and 4-partition runs that drain fully
with one worker and with two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from embedq.core.config import Settings, SettingsError
from embedq.core.keys import Keys, hash_tag, key_slot, partition_for, partition_streams
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.jobs import JobLedger
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .conftest import REDIS_URL, corpus_rows
from .support.servers import RedisServer
from .test_cli import embedq


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A redis-server in cluster mode: even alone, with no slots assigned, it answers
    CLUSTER KEYSLOT with the slot rule every cluster node applies."""
    data = tmp_path_factory.mktemp("cluster")
    # cluster=True gives the bus port a free port of its own: the default, port + 10000,
    # overflows for free ports above 55535 (redis-server then refuses to start).
    server = RedisServer(data, cluster=True).start()
    client = server.client()
    try:
        yield client
    finally:
        client.close()
        server.stop()


def test_key_slot_matches_the_redis_cluster_spec() -> None:
    # The spec's CRC16 check value, and its hash-tag examples.
    assert key_slot("123456789") == 0x31C3
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert hash_tag("foo{}{bar}") == "foo{}{bar}"  # an empty first tag: the whole key
    assert hash_tag("foo{{bar}}zap") == "{bar"
    assert hash_tag("foo{bar}{zap}") == "bar"


def test_key_slot_agrees_with_a_real_cluster_node(cluster_node: redis.Redis) -> None:
    keys = ["123456789", "embedq:tasks", "{user1000}.following", "foo{}{bar}", "foo{{bar}}z"]
    for n in (2, 4, 16):
        for stream in partition_streams("embedq:tasks", n):
            k = Keys(stream)
            keys += [stream, k.dlq, k.sent("job-1"), k.job("job-1"), k.index("c"), k.docs("c")]
    keys += [f"doc-{i}:é" for i in range(50)]
    for key in keys:
        assert cluster_node.execute_command("CLUSTER KEYSLOT", key) == key_slot(key), key


def test_each_partition_keeps_its_dlq_and_resume_position_on_its_own_slot(
    cluster_node: redis.Redis,
) -> None:
    streams = partition_streams("embedq:tasks", 8)
    assert streams[3] == "embedq:tasks:{p3}"
    slots = []
    for stream in streams:
        k = Keys(stream)
        slot = cluster_node.execute_command("CLUSTER KEYSLOT", stream)
        # The dead-letter script and the enqueue script each touch two keys atomically.
        assert cluster_node.execute_command("CLUSTER KEYSLOT", k.dlq) == slot
        assert cluster_node.execute_command("CLUSTER KEYSLOT", k.sent("j")) == slot
        # The fence and settle scripts touch the stream, its index and its leases.
        assert cluster_node.execute_command("CLUSTER KEYSLOT", k.index("c")) == slot
        assert cluster_node.execute_command("CLUSTER KEYSLOT", k.leases("c")) == slot
        assert k.base == "embedq:tasks"
        slots.append(slot)
    assert len(set(slots)) == 8  # spread over the cluster, not stacked on one slot
    assert partition_streams("embedq:tasks", 1) == ["embedq:tasks"]


def test_a_stream_name_with_its_own_hash_tag_is_refused_with_partitions() -> None:
    with pytest.raises(SettingsError, match="hash tag"):
        Settings(stream="embedq:{t}:tasks", partitions=4)
    assert Settings(stream="embedq:{t}:tasks", partitions=1).partitions == 1
    with pytest.raises(ValueError, match="hash tag"):
        Producer(redis.Redis(), "embedq:{t}:tasks", partitions=4)


def test_partition_of_an_id_is_the_same_in_every_process_and_spread_evenly() -> None:
    ids = [f"doc-{i}#{i % 7}" for i in range(8000)]
    here = [partition_for(i, 4) for i in ids]
    code = (
        "import json,sys; from embedq.core.keys import partition_for; "
        "print(json.dumps([partition_for(f'doc-{i}#{i % 7}', 4) for i in range(8000)]))"
    )
    # Python's hash() would differ under another PYTHONHASHSEED; the partition must not.
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(other.stdout) == here
    counts = [here.count(p) for p in range(4)]
    assert min(counts) > 1700 and max(counts) < 2300, counts


@pytest.fixture(scope="module")
def second_encoder() -> Encoder:
    # Each worker thread gets its own model: a fast tokenizer is not safe to share between
    # threads ("Already borrowed"), and two worker processes would not share one either.
    return Encoder(device="cpu")


def enqueue_partitioned(settings: Settings, redis_client: redis.Redis, n: int) -> list[str]:
    rows = corpus_rows("short.jsonl", n)
    with_ids = [{"id": f"p-{i}", "text": r["text"]} for i, r in enumerate(rows)]
    producer = Producer(redis_client, settings.stream, partitions=4, chunk=50)
    assert producer.enqueue(with_ids, job="part") == n
    lengths = [redis_client.xlen(s) for s in partition_streams(settings.stream, 4)]
    assert sum(lengths) == n and min(lengths) > 0
    assert redis_client.exists(settings.stream) == 0  # nothing lands on the base stream
    return [r["id"] for r in with_ids]


def assert_drained(settings: Settings, sink: Sink, ids: list[str]) -> None:
    assert sink.count() == len(ids)  # every id once: none lost, none twice
    assert {r["id"] for r in sink.get(ids, with_vectors=False)} == set(ids)
    lag = embedq(
        "lag",
        "--json",
        "--partitions",
        "4",
        env={"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": settings.stream, "EMBEDQ_GROUP": "g"},
    )
    info = json.loads(lag.stdout)
    assert (info["lag"], info["pending"], info["length"]) == (0, 0, len(ids))
    assert [p["lag"] for p in info["partitions"]] == [0, 0, 0, 0]
    assert sum(p["length"] for p in info["partitions"]) == len(ids)


def test_four_partitions_drain_with_one_worker(
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    ids = enqueue_partitioned(settings, redis_client, 300)
    stats = make_worker(partitions=4).run()
    assert stats.texts == 300
    assert_drained(settings, sink, ids)
    job = JobLedger(redis_client, settings.stream).state("part")
    assert job is not None and (job["enqueued"], job["embedded"]) == ("300", "300")


def test_four_partitions_drain_with_two_workers(
    settings: Settings,
    redis_client: redis.Redis,
    encoder: Encoder,
    second_encoder: Encoder,
    sink: Sink,
) -> None:
    ids = enqueue_partitioned(settings, redis_client, 400)
    # Small windows: one XREADGROUP covers every partition, so a 512-entry window would let
    # the first worker take all 400 entries in one read.
    s = settings.replace(partitions=4, read_count=16)
    workers = [
        assemble(s.replace(consumer=name), Stream(redis_client, s.stream, "g", name), enc, sink)
        for name, enc in (("w1", encoder), ("w2", second_encoder))
    ]
    # Open the shared Lite client before the threads do (it is created on first use).
    sink.ensure_collection(encoder.width, encoder.name)
    failures: list[BaseException] = []

    def run(worker: Worker) -> None:
        try:
            worker.run()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not failures and not any(t.is_alive() for t in threads)
    assert sum(w.stats.texts for w in workers) == 400
    assert all(w.stats.texts > 0 for w in workers)  # both took part
    assert_drained(settings, sink, ids)
