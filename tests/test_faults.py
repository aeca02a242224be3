"""At-least-once under faults, with real processes: workers killed with SIGKILL at each
stage, Redis killed and restarted, Milvus frozen past the reclaim threshold, SIGTERM in
the middle of a batch. After each, every good entry is in Milvus exactly once with the
right vector, nothing is left pending, and the dead-letter stream holds exactly the
planted poison entries."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.model.encoder import Encoder
from embedq.sink.milvus import Sink
from embedq.worker.shutdown import TOGETHER_S

from .conftest import corpus_rows
from .support.fault_fixtures import WorkerProcess
from .support.servers import MilvusLiteServer, MilvusStandalone, RedisServer, wait_until

GROUP = "g"
COLLECTION = "faults"

# Entries no worker can ever process, planted among the good ones: (fields, reason).
POISON: list[tuple[dict[str, Any], str]] = [
    ({"id": "poison-no-text"}, "missing_text"),
    ({"id": "poison-blank", "text": " \n\t "}, "empty_text"),
    ({"id": "poison-meta", "text": "fine text", "meta": "[1, 2]"}, "meta_not_object"),
]


def plant(client: redis.Redis, stream: str, good: Sequence[dict[str, Any]], resend: int) -> None:
    """XADD the good rows with the poison spread among them, then ``resend`` rows again
    (a producer retrying its XADDs): ids repeat, rows must not."""
    pipe = client.pipeline(transaction=False)
    every = max(1, len(good) // len(POISON))
    for i, row in enumerate(good):
        pipe.xadd(stream, {"id": row["id"], "text": row["text"]})
        if i % every == every - 1 and i // every < len(POISON):
            pipe.xadd(stream, POISON[i // every][0])
    for row in good[:resend]:
        pipe.xadd(stream, {"id": row["id"], "text": row["text"]})
    pipe.execute()


def reader(milvus_uri: str) -> Sink:
    """The test's view of the workers' collection (loaded: a reopened Lite file starts
    with its collections released)."""
    sink = Sink(milvus_uri, "", COLLECTION, timeout_s=10)
    sink.client.load_collection(COLLECTION, timeout=10)
    return sink


def worker_args(
    redis_url: str, stream: str, milvus_uri: str, consumer: str, *extra: str
) -> list[str]:
    return [
        "--redis-url",
        redis_url,
        "--stream",
        stream,
        "--group",
        GROUP,
        "--consumer",
        consumer,
        "--milvus-uri",
        milvus_uri,
        "--collection",
        COLLECTION,
        "--block-ms",
        "200",
        "--min-idle",
        "3",
        "--milvus-timeout",
        "2",
        "--reclaim-interval",
        "0.5",
        "--read-count",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


def group_state(client: redis.Redis, stream: str) -> dict[str, Any]:
    groups = client.xinfo_groups(stream)
    group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
    return {"pending": int(group["pending"]), "lag": group.get("lag")}


def drained(client: redis.Redis, stream: str) -> bool:
    state = group_state(client, stream)
    return state["pending"] == 0 and state["lag"] == 0


def wait_ready(worker: WorkerProcess, timeout_s: float = 120) -> None:
    wait_until(
        lambda: '"worker_started"' in worker.log_text() or worker.proc.poll() is not None,
        timeout_s,
        "the worker to start",
    )
    assert worker.proc.poll() is None, worker.log_tail()


def dlq_reasons(client: redis.Redis, stream: str) -> list[tuple[str, str]]:
    return sorted(
        (f.get(b"id", b"").decode(), f[b"_dlq_reason"].decode())
        for _, f in client.xrange(f"{stream}:dlq")
    )


def assert_landed_exactly_once(
    client: redis.Redis,
    stream: str,
    sink: Sink,
    good: Sequence[dict[str, Any]],
    encoder: Encoder,
) -> None:
    """Every good id once, with the vector the model gives its text; nothing pending; the
    dead-letter stream holds the planted poison and nothing else."""
    ids = [r["id"] for r in good]
    assert sink.count() == len(set(ids))
    stored = {r["id"]: r for r in sink.get(ids)}
    assert set(stored) == set(ids)
    reference = encoder.encode([r["text"] for r in good])
    for row, ref in zip(good, reference, strict=True):
        vec = np.asarray(stored[row["id"]]["vector"], dtype=np.float32)
        assert float(vec @ ref / np.linalg.norm(vec)) >= 0.9999, row["id"]
    assert client.xpending(stream, GROUP)["pending"] == 0
    assert dlq_reasons(client, stream) == sorted(
        (str(fields["id"]), reason) for fields, reason in POISON
    )


@pytest.fixture
def private_client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis.url)
    yield client
    client.close()


@dataclass
class Rig:
    """What a fault test drives: a Redis (client and URL), a stream, worker processes."""

    client: redis.Redis
    redis_url: str
    stream: str
    spawn: Callable[..., WorkerProcess]
    encoder: Encoder

    def worker(self, milvus_uri: str, consumer: str, *extra: str) -> WorkerProcess:
        args = worker_args(self.redis_url, self.stream, milvus_uri, consumer, *extra)
        return self.spawn(*args, name=consumer)


@pytest.fixture
def rig(
    redis_client: redis.Redis,
    stream_name: str,
    spawn_worker: Callable[..., WorkerProcess],
    encoder: Encoder,
) -> Rig:
    from .conftest import REDIS_URL

    return Rig(redis_client, REDIS_URL, stream_name, spawn_worker, encoder)


def consumers(client: redis.Redis, stream: str) -> set[str]:
    return {c["name"].decode() for c in client.xinfo_consumers(stream, GROUP)}


def run_kill_test(rig: Rig, fault_point: str, milvus_uri: str) -> None:
    good = corpus_rows("short.jsonl", 120)
    # Both workers block on the stream before anything is sent, so both get a window of the
    # first entries and B runs while A dies.
    survivor = rig.worker(milvus_uri, "B")
    victim = rig.worker(milvus_uri, "A", "--fault-point", fault_point)
    wait_ready(survivor)
    wait_ready(victim)
    # Both are in their read loops (XREADGROUP made each a consumer of the group).
    wait_until(lambda: consumers(rig.client, rig.stream) >= {"A", "B"}, 60, "both to read")
    plant(rig.client, rig.stream, good, resend=6)

    assert victim.wait(120) == -signal.SIGKILL, victim.log_tail()
    assert f'"point": "{fault_point}"' in victim.log_text()
    wait_until(lambda: drained(rig.client, rig.stream), 120, "the survivor to drain the stream")
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(60) == 0, survivor.log_tail()
    assert '"reclaimed"' in survivor.log_text(), "B never took over A's entries"

    sink = reader(milvus_uri)
    try:
        assert_landed_exactly_once(rig.client, rig.stream, sink, good, rig.encoder)
    finally:
        sink.close()


@pytest.mark.parametrize("fault_point", ["after_read", "after_inference", "after_write"])
def test_worker_killed_at_each_stage_loses_and_duplicates_nothing(
    fault_point: str, rig: Rig, milvus_lite_server: MilvusLiteServer
) -> None:
    run_kill_test(rig, fault_point, milvus_lite_server.uri)


@pytest.mark.parametrize("fault_point", ["after_write"])
def test_worker_killed_against_a_real_milvus_server_leaves_no_duplicate_rows(
    fault_point: str, rig: Rig, milvus_standalone: MilvusStandalone
) -> None:
    # Unlike Milvus Lite, the server keeps both rows when an insert repeats a primary key,
    # so count(*) == distinct ids here proves the rewrite after the kill was an upsert.
    sink = Sink(milvus_standalone.uri, "", COLLECTION, timeout_s=10)
    if sink.client.has_collection(COLLECTION):
        sink.client.drop_collection(COLLECTION)
    sink.close()
    run_kill_test(rig, fault_point, milvus_standalone.uri)


def acked_count(client: redis.Redis, stream: str) -> int:
    """Entries the group has read and settled (acked or dead-lettered)."""
    group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode())
    return int(group["entries-read"] or 0) - int(group["pending"])


def test_redis_killed_and_restarted_mid_run_loses_and_duplicates_nothing(
    private_redis: RedisServer,
    milvus_lite_server: MilvusLiteServer,
    spawn_worker: Callable[..., WorkerProcess],
    encoder: Encoder,
    stream_name: str,
) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_connect_timeout=2)
    rig = Rig(client, private_redis.url, stream_name, spawn_worker, encoder)
    good = corpus_rows("long.jsonl", 60) + corpus_rows("short.jsonl", 140)
    workers = [rig.worker(milvus_lite_server.uri, name) for name in ("A", "B")]
    for worker in workers:
        wait_ready(worker)
    plant(client, stream_name, good, resend=5)
    wait_until(lambda: acked_count(client, stream_name) > 0, 120, "a first ack")
    assert not drained(client, stream_name)
    run_id = client.info("server")["run_id"]

    private_redis.kill()  # appendfsync always: every ack Redis confirmed is on disk
    wait_until(  # both workers met the outage
        lambda: all("redis unavailable" in w.log_text() for w in workers), 30, "both to notice"
    )
    private_redis.start()

    assert client.info("server")["run_id"] != run_id  # a new server, from the AOF
    wait_until(lambda: drained(client, stream_name), 180, "the workers to drain after restart")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(60) == 0, worker.log_tail()
    sink = reader(milvus_lite_server.uri)
    try:
        assert_landed_exactly_once(client, stream_name, sink, good, encoder)
    finally:
        sink.close()
        client.close()


def test_milvus_down_longer_than_min_idle_acks_and_dead_letters_nothing_until_it_returns(
    rig: Rig, milvus_lite_server: MilvusLiteServer
) -> None:
    client, stream = rig.client, rig.stream
    before = corpus_rows("short.jsonl", 150)
    during = before[100:]
    workers = [rig.worker(milvus_lite_server.uri, name) for name in ("A", "B")]
    for worker in workers:
        wait_ready(worker)
    plant(client, stream, before[:100], resend=0)  # poison included: dead-lettered now
    wait_until(lambda: drained(client, stream), 120, "the first rows to land")
    settled = acked_count(client, stream)
    dead = client.xlen(f"{stream}:dlq")

    milvus_lite_server.pause()  # a hung Milvus: every call times out (--milvus-timeout 2)
    try:
        for row in during:
            client.xadd(stream, {"id": row["id"], "text": row["text"]})
        wait_until(lambda: client.xpending(stream, GROUP)["pending"] > 0, 30, "a read")
        down_until = time.monotonic() + 3 * 3 + 2  # three times --min-idle, and some
        while time.monotonic() < down_until:
            assert acked_count(client, stream) == settled
            assert client.xlen(f"{stream}:dlq") == dead
            pending = client.xpending_range(stream, GROUP, "-", "+", 1000)
            assert max(p["times_delivered"] for p in pending) <= 5  # --max-deliveries
            time.sleep(0.5)
        # Why they are late is on record, for a max_deliveries dead letter should it come.
        recorded = client.hvals(f"{stream}:errors")
        assert recorded and all(b"upsert: milvus unavailable" in v for v in recorded)
    finally:
        milvus_lite_server.resume()

    wait_until(lambda: drained(client, stream), 120, "everything to land after Milvus returns")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(60) == 0, worker.log_tail()
    assert any("milvus unavailable" in w.log_text() for w in workers)
    assert not client.exists(f"{stream}:errors")  # acked entries leave no record behind
    sink = reader(milvus_lite_server.uri)
    try:
        assert_landed_exactly_once(client, stream, sink, before, rig.encoder)
    finally:
        sink.close()


def consumer_pending(client: redis.Redis, stream: str, name: str) -> int:
    consumers = client.xinfo_consumers(stream, GROUP)
    return next((int(c["pending"]) for c in consumers if c["name"] == name.encode()), 0)


def start_busy_worker(
    rig: Rig, milvus_uri: str, window: int = 32
) -> tuple[WorkerProcess, list[dict[str, Any]]]:
    """A worker with a long backlog of long texts, caught in the middle of a window of
    ``window`` entries."""
    rows = corpus_rows("long.jsonl", 300)
    plant_rows = [{"id": r["id"], "text": r["text"]} for r in rows]
    rig.client.xadd(rig.stream, plant_rows[0])  # the group exists before the worker reads
    worker = rig.worker(milvus_uri, "T", "--read-count", str(window), "--max-batch-rows", "8")
    pipe = rig.client.pipeline(transaction=False)
    for row in plant_rows[1:]:
        pipe.xadd(rig.stream, row)
    pipe.execute()
    wait_until(
        lambda: consumer_pending(rig.client, rig.stream, "T") > 0, 120, "a window in hand", 0.02
    )
    return worker, rows


def min_idle_ms(client: redis.Redis, stream: str) -> int:
    """How long the most recently delivered pending entry has been idle."""
    pending = client.xpending_range(stream, GROUP, "-", "+", 10_000)
    return min(int(p["time_since_delivered"]) for p in pending)


def acked_ids(client: redis.Redis, stream: str) -> list[str]:
    """Producer ids of the entries the group has settled (read and no longer pending)."""
    group = next(g for g in client.xinfo_groups(stream) if g["name"] == GROUP.encode())
    read = client.xrange(stream, "-", group["last-delivered-id"])
    pending = {p["message_id"] for p in client.xpending_range(stream, GROUP, "-", "+", 10_000)}
    return [f[b"id"].decode() for eid, f in read if eid not in pending]


def test_sigterm_mid_batch_finishes_writes_and_acks_the_batch_then_exits_0(
    rig: Rig, tmp_path: Path
) -> None:
    milvus_uri = str(tmp_path / "milvus.db")
    worker, rows = start_busy_worker(rig, milvus_uri)

    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 0, worker.log_tail()  # --grace defaults to 30 s
    assert '"stop_requested"' in worker.log_text()
    assert consumer_pending(rig.client, rig.stream, "T") == 0
    done = acked_ids(rig.client, rig.stream)
    assert len(done) >= 32  # at least the window it held when the signal came
    assert len(done) < len(rows)  # and it stopped reading: the backlog is still there
    sink = reader(milvus_uri)
    try:
        assert sink.count() == len(done)
        assert {r["id"] for r in sink.get(done, with_vectors=False)} == set(done)
    finally:
        sink.close()


def test_second_signal_exits_at_once_and_embedq_reclaim_finishes_the_entries(
    rig: Rig, tmp_path: Path
) -> None:
    milvus_uri = str(tmp_path / "milvus.db")
    # A window that outlasts TOGETHER_S: on a quiet machine 32 long texts took 0.44 s, done
    # before the second signal came (which then found the default handler: exit -15).
    worker, _ = start_busy_worker(rig, milvus_uri, window=128)

    worker.signal(signal.SIGTERM)
    # Two signals sent back to back arrive as one; the second must come after the first,
    # and signals within TOGETHER_S of it are that same request (a process group's Ctrl-C).
    wait_until(lambda: '"stop_requested"' in worker.log_text(), 30, "the first signal", 0.01)
    time.sleep(TOGETHER_S)
    worker.signal(signal.SIGTERM)

    assert worker.wait(30) == 1, worker.log_tail()
    assert '"forced_exit"' in worker.log_text()
    left = consumer_pending(rig.client, rig.stream, "T")
    assert left > 0  # left for the reclaimer
    wait_until(
        lambda: min_idle_ms(rig.client, rig.stream) >= 1000, 30, "the entries past --min-idle 1"
    )
    reclaim = rig.spawn(
        *("--redis-url", rig.redis_url, "--stream", rig.stream, "--group", GROUP),
        *("--milvus-uri", milvus_uri, "--collection", COLLECTION, "--device", "cpu"),
        *("--once", "--min-idle", "1", "--milvus-timeout", "0.5"),
        name="reclaim",
        command="reclaim",
    )
    assert reclaim.wait(120) == 0, reclaim.log_tail()
    assert f"reclaimed {left} entries" in reclaim.log_text()
    assert rig.client.xpending(rig.stream, GROUP)["pending"] == 0
    done = acked_ids(rig.client, rig.stream)
    sink = reader(milvus_uri)
    try:
        assert sink.count() == len(done)
        assert {r["id"] for r in sink.get(done, with_vectors=False)} == set(done)
    finally:
        sink.close()
