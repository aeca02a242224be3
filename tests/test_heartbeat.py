"""Ownership: the heartbeat keeps a worker's entries without stealing reclaimed ones, and a
crashed stage stops the worker loudly."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from structlog.testing import capture_logs

from embedq.core.errors import StageCrashed
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.columns import Columns
from embedq.sink.milvus import Sink
from embedq.worker.heartbeat import Heartbeat, InFlight
from embedq.worker.loop import Worker

from .conftest import corpus_rows


def idle_ms(client: redis.Redis, stream: str, entry_id: str) -> tuple[str, int]:
    row = client.xpending_range(stream, "g", min=entry_id, max=entry_id, count=1)[0]
    return row["consumer"].decode(), int(row["time_since_delivered"])


def test_heartbeat_resets_idle_only_for_entries_still_owned(
    redis_client: redis.Redis, stream_name: str
) -> None:
    Producer(redis_client, stream_name).enqueue(
        [{"id": str(i), "text": f"text {i}"} for i in range(6)]
    )
    a = Stream(redis_client, stream_name, "g", "worker-a")
    b = Stream(redis_client, stream_name, "g", "worker-b")
    a.ensure_group()
    ids = [e.entry_id for e in a.read_new(6, 0)]
    time.sleep(0.3)
    # worker-b reclaims the first two, as if worker-a had looked dead.
    claimed = b.autoclaim(min_idle_ms=200, count=2)
    assert [e.entry_id for e in claimed.entries] == ids[:2]

    in_flight = InFlight()
    in_flight.add((stream_name, i) for i in ids)
    before = time.monotonic()
    with capture_logs() as logs:
        lost = Heartbeat([a], in_flight, interval_s=60).beat()

    assert lost == 2
    assert set(in_flight.snapshot()[stream_name]) == set(ids[2:])
    assert any(e["event"] == "ownership_lost" and e["count"] == 2 for e in logs)
    for entry_id in ids[:2]:
        assert idle_ms(redis_client, stream_name, entry_id)[0] == "worker-b"
    for entry_id in ids[2:]:
        owner, idle = idle_ms(redis_client, stream_name, entry_id)
        # Idle restarted at the heartbeat (it was >= 300 ms before), whatever the load.
        assert owner == "worker-a" and idle <= (time.monotonic() - before) * 1000 + 5
    # JUSTID claims do not count as deliveries: no drift toward max-deliveries.
    assert set(a.delivery_counts(ids[2:]).values()) == {1}


class BrokenSink(Sink):
    """A sink with a bug (not an outage): a real component can't be made to raise a plain
    RuntimeError on demand, so this one stands in for a programming error in a stage."""

    def upsert_columns(self, columns: Columns) -> int:
        raise RuntimeError("bug in the sink")


def test_a_crashed_stage_stops_the_worker_and_acks_nothing(
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    stream_name: str,
) -> None:
    Producer(redis_client, stream_name).enqueue(corpus_rows("short.jsonl", 20))
    worker = make_worker()
    broken = BrokenSink(sink.uri, "", sink.collection, timeout_s=5)
    broken._client = sink.client  # same Milvus Lite handle: one process per file
    worker.sink = worker.settler.sink = broken
    with capture_logs() as logs, pytest.raises(StageCrashed, match="bug in the sink"):
        worker.run()
    assert any(e["event"] == "stage_crashed" and e["stage"] == "writer" for e in logs)
    assert worker.stream.group_pending() == 20  # nothing acked, all left for a reclaim
