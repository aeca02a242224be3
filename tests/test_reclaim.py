"""The reclaimer, heartbeat, last errors, consumer hygiene and the DLQ scripts against real
Redis, one behaviour at a time (the process-level proofs are in test_faults.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import redis
from structlog.testing import capture_logs

from embedq.queue.dlq import iter_dead_letters, purge, retry, show
from embedq.queue.entries import Entry
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker
from embedq.worker.reclaimer import ConsumerTidy, Reclaimer, run_reclaim

from .conftest import corpus_rows


def stream_for(client: redis.Redis, name: str, consumer: str) -> Stream:
    stream = Stream(client, name, "g", consumer)
    stream.ensure_group()
    return stream


def reclaimer(
    stream: Stream, max_deliveries: int = 5, idle_delete_s: float = 600, min_idle_s: float = 0
) -> Reclaimer:
    def dead_letter(entry: Entry, reason: str, error: str, deliveries: int) -> None:
        stream.dlq.move(entry, reason, error, deliveries)

    return Reclaimer(
        stream,
        min_idle_s=min_idle_s,
        max_deliveries=max_deliveries,
        count=100,
        dead_letter=dead_letter,
        consumer_idle_delete_s=idle_delete_s,
    )


def add(client: redis.Redis, name: str, n: int) -> list[str]:
    return [
        client.xadd(name, {"id": f"doc-{i}", "text": f"text number {i}"}).decode() for i in range(n)
    ]


def test_reclaim_counts_entries_whose_payload_was_deleted_and_takes_the_rest(
    redis_client: redis.Redis, stream_name: str
) -> None:
    dead = stream_for(redis_client, stream_name, "dead")
    ids = add(redis_client, stream_name, 6)
    assert len(dead.read_new(10, 0)) == 6
    redis_client.xdel(stream_name, ids[1], ids[4])  # trimmed or deleted while pending

    alive = stream_for(redis_client, stream_name, "alive")
    with capture_logs() as logs:
        taken = reclaimer(alive).step()

    assert [e.entry_id for e in taken] == [ids[0], ids[2], ids[3], ids[5]]
    assert all(e.fields[b"id"] for e in taken)
    found = [e for e in logs if e["event"] == "reclaim_found_deleted"]
    assert found and found[0]["count"] == 2
    # Redis dropped the deleted ones from the pending list; the rest are the reclaimer's.
    pending = redis_client.xpending_range(stream_name, "g", "-", "+", 10)
    assert {p["message_id"].decode() for p in pending} == {e.entry_id for e in taken}
    assert {p["consumer"].decode() for p in pending} == {"alive"}


def test_history_read_of_a_deleted_entry_is_dead_lettered_not_a_crash(
    redis_client: redis.Redis, make_worker: Callable[..., Worker], sink: Sink, stream_name: str
) -> None:
    rows = corpus_rows("short.jsonl", 5)
    ids = [
        redis_client.xadd(stream_name, {"id": r["id"], "text": r["text"]}).decode() for r in rows
    ]
    worker = make_worker()
    worker.prepare()
    assert len(worker.stream.read_new(10, 0)) == 5  # then the worker dies
    redis_client.xdel(stream_name, ids[2])

    make_worker().run()  # same consumer: re-reads its own pending list first

    assert sink.count() == 4
    dead = list(iter_dead_letters([worker.stream.dlq]))
    assert [(d.reason, d.source_id) for d in dead] == [("payload_deleted", ids[2])]
    assert worker.stream.group_pending() == 0


def test_past_max_deliveries_an_entry_is_dead_lettered_with_the_last_recorded_error(
    redis_client: redis.Redis, stream_name: str
) -> None:
    first = stream_for(redis_client, stream_name, "w1")
    ids = add(redis_client, stream_name, 2)
    first.read_new(10, 0)
    first.record_error([ids[0]], "upsert: milvus unavailable during upsert: deadline exceeded")
    second = stream_for(redis_client, stream_name, "w2")
    assert len(reclaimer(second, max_deliveries=2).step()) == 2  # delivery 2: still processed

    with capture_logs():
        third = stream_for(redis_client, stream_name, "w3")
        kept = reclaimer(third, max_deliveries=2).step()  # delivery 3: past the limit

    assert kept == []
    letters = {d.source_id: d for d in iter_dead_letters([third.dlq])}
    assert set(letters) == set(ids)
    assert letters[ids[0]].reason == "max_deliveries"
    assert letters[ids[0]].deliveries == 3
    assert letters[ids[0]].error == (
        "w1: upsert: milvus unavailable during upsert: deadline exceeded"
    )
    assert "never acked in 3 deliveries" in letters[ids[1]].error
    assert letters[ids[1]].original == {b"id": b"doc-1", b"text": b"text number 1"}
    assert third.group_pending() == 0
    assert not redis_client.exists(f"{stream_name}:errors")  # settled entries leave no trace


def test_ack_forgets_the_recorded_error(redis_client: redis.Redis, stream_name: str) -> None:
    stream = stream_for(redis_client, stream_name, "w1")
    ids = add(redis_client, stream_name, 3)
    stream.read_new(10, 0)
    stream.record_error(ids, "upsert: timeout")
    assert stream.ack(ids[:2]) == 2
    assert stream.last_errors(ids) == {ids[2]: "w1: upsert: timeout"}


def test_heartbeat_never_takes_back_an_entry_another_worker_reclaimed(
    redis_client: redis.Redis, stream_name: str
) -> None:
    slow = stream_for(redis_client, stream_name, "slow")
    ids = add(redis_client, stream_name, 4)
    slow.read_new(10, 0)
    other = stream_for(redis_client, stream_name, "other")
    other.autoclaim(0, count=2)  # takes the first two

    assert slow.heartbeat(ids) == ids[2:]
    owners = {
        p["message_id"].decode(): p["consumer"].decode()
        for p in redis_client.xpending_range(stream_name, "g", "-", "+", 10)
    }
    assert owners == {ids[0]: "other", ids[1]: "other", ids[2]: "slow", ids[3]: "slow"}
    # The heartbeat reset idle time without counting a delivery.
    counts = slow.delivery_counts(ids)
    assert counts == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1}


def test_idle_consumers_are_removed_only_when_nothing_is_pending(
    redis_client: redis.Redis, stream_name: str
) -> None:
    ids = add(redis_client, stream_name, 4)
    holder = stream_for(redis_client, stream_name, "holder")
    holder.read_new(1, 0)  # keeps one entry pending
    finished = stream_for(redis_client, stream_name, "finished")
    finished.ack([e.entry_id for e in finished.read_new(2, 0)])
    recent = stream_for(redis_client, stream_name, "recent")
    time.sleep(1.0)
    recent.ack([e.entry_id for e in recent.read_new(1, 0)])  # idle, but only just

    tidy = stream_for(redis_client, stream_name, "tidy")
    with capture_logs() as logs:
        taken = reclaimer(tidy, idle_delete_s=0.8, min_idle_s=60).step()

    assert taken == []
    names = {c["name"].decode() for c in redis_client.xinfo_consumers(stream_name, "g")}
    assert names == {"holder", "recent"}  # only "finished" went
    removed = [e for e in logs if e["event"] == "consumers_removed"]
    assert removed[0]["names"] == ["finished"]
    assert holder.delivery_counts([ids[0]]) == {ids[0]: 1}  # its entry is still claimable


def test_a_dead_workers_name_goes_from_every_stream_it_read_in_one_line(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """Issue 28: a worker joins the group of its partition and of the online lane; tidied
    stream by stream, its removal was logged twice and counted as two consumers."""
    names = [stream_name, f"{stream_name}:{{online}}"]
    for name in names:
        add(redis_client, name, 1)
        gone = stream_for(redis_client, name, "gone")
        gone.ack([e.entry_id for e in gone.read_new(1, 0)])
    time.sleep(0.3)
    survivor = [stream_for(redis_client, name, "survivor") for name in names]
    tidy = ConsumerTidy(survivor, idle_delete_s=0.2)
    reclaimers = [
        Reclaimer(s, min_idle_s=60, max_deliveries=5, count=100, dead_letter=print, tidy=tidy)
        for s in survivor
    ]

    with capture_logs() as logs:
        for each in reclaimers:
            each.step()

    removed = [e for e in logs if e["event"] == "consumers_removed"]
    assert len(removed) == 1, removed
    assert removed[0]["names"] == ["gone"] and removed[0]["streams"] == sorted(names)
    assert sum(r.consumers_removed_total for r in reclaimers) == 1
    for name in names:
        assert redis_client.xinfo_consumers(name, "g") == []


def test_a_consumer_holding_entries_is_never_removed(
    redis_client: redis.Redis, stream_name: str
) -> None:
    add(redis_client, stream_name, 2)
    holder = stream_for(redis_client, stream_name, "holder")
    holder.read_new(2, 0)
    time.sleep(0.3)
    assert stream_for(redis_client, stream_name, "tidy").delete_idle_consumers(100) == []
    assert holder.group_pending() == 2


def test_group_deleted_under_a_worker_is_recreated_loudly(
    redis_client: redis.Redis, stream_name: str
) -> None:
    stream = stream_for(redis_client, stream_name, "w1")
    add(redis_client, stream_name, 2)
    redis_client.xgroup_destroy(stream_name, "g")  # as after a restart without persistence

    with capture_logs() as logs:
        read = stream.read_new(10, 0)

    assert len(read) == 2  # recreated at 0: nothing already in the stream is skipped
    assert any(e["event"] == "group_recreated" and e["log_level"] == "error" for e in logs)


def test_dlq_retry_sends_original_fields_back_and_removes_the_dead_letter(
    redis_client: redis.Redis, stream_name: str
) -> None:
    stream = stream_for(redis_client, stream_name, "w1")
    redis_client.xadd(stream_name, {"id": "a", "text": b"caf\xe9", "meta": "{}"})
    redis_client.xadd(stream_name, {"id": "b", "text": "  "})
    first, second = stream.read_new(10, 0)
    stream.dlq.move(first, "invalid_utf8", "text is not valid UTF-8")
    stream.dlq.move(second, "empty_text", "blank")
    lanes = [stream.dlq]
    letters = list(iter_dead_letters(lanes))
    assert [d.reason for d in letters] == ["invalid_utf8", "empty_text"]
    assert show(lanes, letters[0].dlq_id) == letters[0]

    sent = retry(lanes, [letters[0].dlq_id, "1-1"])  # an unknown id is skipped

    assert list(sent) == [letters[0].dlq_id]
    where, new_id = sent[letters[0].dlq_id]
    assert where == stream_name
    back = redis_client.xrange(stream_name, new_id, new_id)
    assert back[0][1] == {b"id": b"a", b"text": b"caf\xe9", b"meta": b"{}"}  # bytes kept
    assert [d.dlq_id for d in iter_dead_letters(lanes)] == [letters[1].dlq_id]
    assert purge(lanes) == 1
    assert stream.dlq.length() == 0


def test_reclaim_once_makes_one_full_pass_and_processes_what_it_claims(
    redis_client: redis.Redis, stream_name: str
) -> None:
    dead = stream_for(redis_client, stream_name, "dead")
    add(redis_client, stream_name, 250)
    dead.read_new(250, 0)
    alive = stream_for(redis_client, stream_name, "alive")
    processed: list[str] = []

    def process(entries: Sequence[Entry]) -> None:
        processed.extend(e.entry_id for e in entries)
        alive.ack([e.entry_id for e in entries])

    summary = run_reclaim(
        reclaimer(alive), process, once=True, interval_s=0.1, stop=threading.Event()
    )

    assert summary.claimed == 250 and len(set(processed)) == 250
    assert alive.group_pending() == 0
