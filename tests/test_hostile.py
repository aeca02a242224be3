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

from embedq.bench.servers import RedisServer
from embedq.config import Settings
from embedq.encoder import Encoder
from embedq.errors import QueueFull
from embedq.launch import assemble
from embedq.producer import Producer
from embedq.sink import open_sink
from embedq.stream import Stream

from .conftest import corpus_rows
from .test_cli import embedq


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

    # A worker started on the full Redis drains it: reads, the fenced write, acks and the
    # dead letter all go through; only job counters and error hints are refused (skipped).
    settings = Settings(
        redis_url=full_redis.url,
        stream=stream,
        group="g",
        consumer="c1",
        milvus_uri=str(tmp_path / "milvus.db"),
        collection="full",
        block_ms=100,
        drain=True,
        min_idle_s=30,
    )
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
    settings = Settings(
        redis_url="redis://unused",
        stream=stream_name,
        group="g",
        consumer="crashy",
        milvus_uri=str(tmp_path / "milvus.db"),
        collection="pending",
        block_ms=100,
        drain=True,
        max_deliveries=3,
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
