"""The index guarantee: after a drain every id's row is the effect of the last entry for
it, whatever the interleaving of workers, kills and reclaims; deletes, document sync, dedup
that never drops a row, and ``embedq verify``.

Every test here runs on a private ``redis-server`` with AOF and on the real Milvus 2.3.5
server, where a double write would show as a second row (Milvus Lite overwrites), with the
packaged model; the fixtures below replace conftest's shared Redis and Lite file.
"""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import Keys
from embedq.core.records import Record
from embedq.model.encoder import Encoder
from embedq.ops.verify import repair, verify
from embedq.producer.client import Producer, as_record
from embedq.queue.stream import Stream
from embedq.queue.versions import BUSY, GO, STALE, Versions, Written
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker

from .conftest import corpus_rows
from .support.fault_fixtures import WorkerProcess
from .support.servers import MilvusStandalone, RedisServer, wait_until
from .test_cli import embedq


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("aof-redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(aof_redis: RedisServer) -> Iterator[redis.Redis]:
    client = aof_redis.client()
    yield client
    client.close()


@pytest.fixture
def settings(
    settings: Settings, aof_redis: RedisServer, milvus_standalone: MilvusStandalone
) -> Settings:
    """conftest's settings, on the private AOF Redis and a collection of its own on the
    real Milvus server (tests share the server)."""
    return settings.replace(
        redis_url=aof_redis.url,
        milvus_uri=milvus_standalone.uri,
        collection=f"t_{uuid.uuid4().hex[:12]}",
    )


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "EMBEDQ_REDIS_URL": settings.redis_url,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_COLLECTION": settings.collection,
    }


# -- the Lua behind it, on a real Redis -------------------------------------------------


def versions(client: redis.Redis, stream: str) -> Versions:
    return Versions(client, Keys(stream), "c")


def entry(client: redis.Redis, stream: str, doc_id: str, text: str) -> str:
    return client.xadd(stream, {"id": doc_id, "text": text}).decode()


def test_a_write_is_fenced_by_newer_versions_and_live_leases(
    redis_client: redis.Redis, stream_name: str
) -> None:
    v = versions(redis_client, stream_name)
    old = entry(redis_client, stream_name, "x", "v1")
    new = entry(redis_client, stream_name, "x", "v2")
    assert v.acquire("B", 60_000, [("x", new)]) == [GO]
    assert v.acquire("A", 60_000, [("x", old)]) == [BUSY]  # B is writing x
    assert v.acquire("B", 60_000, [("x", new)]) == [GO]  # its own lease: renewed
    assert v.settle("g", "B", [Written("x", new, "h2")], []) == []
    assert v.acquire("A", 60_000, [("x", old)]) == [STALE]  # an older version never lands
    assert v.acquire("A", 60_000, [("x", new)]) == [STALE]  # nor the same one twice
    held = v.held(["x", "y"])
    assert held[0] is not None and (held[0].version, held[0].content_hash) == (new, "h2")
    assert held[1] is None


def test_an_expired_lease_frees_the_id_and_a_late_writer_resends_the_newer_entry(
    redis_client: redis.Redis, stream_name: str
) -> None:
    v = versions(redis_client, stream_name)
    old = entry(redis_client, stream_name, "x", "v1")
    new = entry(redis_client, stream_name, "x", "v2")
    assert v.acquire("A", 50, [("x", old)]) == [GO]  # A takes x, then pauses
    time.sleep(0.1)  # ... past its lease
    assert v.acquire("B", 60_000, [("x", new)]) == [GO]
    assert v.settle("g", "B", [Written("x", new, "h2")], []) == []
    # A wakes up and settles its old write, which may have landed over B's: the newer
    # entry goes back on the stream, so the row ends as it says.
    conflicts = v.settle("g", "A", [Written("x", old, "h1")], [])
    assert [(c.id, c.newer_version) for c in conflicts] == [("x", new)]
    resent = redis_client.xrange(stream_name, conflicts[0].resent_as, conflicts[0].resent_as)
    assert resent[0][1] == {b"id": b"x", b"text": b"v2"}
    assert v.held(["x"])[0].version == new  # type: ignore[union-attr]


def test_a_refused_write_releases_its_lease_and_leaves_the_index_alone(
    redis_client: redis.Redis, stream_name: str
) -> None:
    v = versions(redis_client, stream_name)
    first = entry(redis_client, stream_name, "x", "v1")
    assert v.acquire("A", 60_000, [("x", first)]) == [GO]
    v.settle("g", "A", [Written("x", first, "")], [])  # Milvus refused the row
    assert v.held(["x"]) == [None]
    assert v.acquire("B", 60_000, [("x", first)]) == [GO]  # not busy: the lease went


def test_a_window_wider_than_the_scripts_slices_gets_every_id_its_own_answer(
    redis_client: redis.Redis, stream_name: str
) -> None:
    # fence.lua and settle.lua read and write the hashes in slices of 2,000 ids: 5,000 ids,
    # with ids another writer holds, ids the index already has newer, and an id sent
    # twice, must each come out as one call per id would have left them.
    v = versions(redis_client, stream_name)
    redis_client.xgroup_create(stream_name, "g", id="0", mkstream=True)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(5000):
        pipe.xadd(stream_name, {"id": f"d{i}", "text": "t"})
    entry_ids = [e.decode() for e in pipe.execute()]
    redis_client.xreadgroup("g", "A", {stream_name: ">"}, count=6000)
    ms = int(entry_ids[-1].split("-")[0])
    busy = {f"d{i}" for i in range(0, 5000, 7)}
    stale = {f"d{i}" for i in range(3, 5000, 11)} - busy
    assert v.acquire("B", 60_000, [(d, f"{ms + 1}-0") for d in sorted(busy)]) == [GO] * len(busy)
    newer = [Written(d, f"{ms + 2}-0", "hb") for d in sorted(stale)]
    assert v.acquire("C", 60_000, [(w.id, w.version) for w in newer]) == [GO] * len(newer)
    assert v.settle("g", "C", newer, []) == []
    wanted = [(f"d{i}", entry_ids[i]) for i in range(5000)] + [("d1", entry_ids[1])]
    got = v.acquire("A", 60_000, wanted)
    expected = [BUSY if d in busy else STALE if d in stale else GO for d, _ in wanted]
    assert got == expected
    written = [Written(d, ver, f"h{d}") for (d, ver), s in zip(wanted, got, strict=True) if s == GO]
    assert v.settle("g", "A", written, entry_ids) == []
    assert redis_client.xpending(stream_name, "g")["pending"] == 0
    held = v.held([d for d, _ in wanted[:5000]])
    for (d, ver), h in zip(wanted[:5000], held, strict=True):
        assert h is not None if d not in busy else h is None, d
        if h is not None:
            want = (f"{ms + 2}-0", "hb") if d in stale else (ver, f"h{d}")
            assert (h.version, h.content_hash) == want, d
    leases = {k.decode(): val.decode() for k, val in redis_client.hgetall(v.leases_key).items()}
    assert set(leases) == busy  # A released all of its own, B's stay
    assert all(val.endswith(" B") for val in leases.values())


# -- the guarantee end to end ------------------------------------------------------------


def plant_versions(
    client: redis.Redis, stream: str, ids: int, rounds: range, last: dict[str, Any]
) -> None:
    """Several versions of each id, interleaved, with deletes and re-upserts after deletes;
    ``last`` gets what each id must end as (its last entry: a text, or None for deleted)."""
    rng = random.Random(rounds.start)
    texts = [r["text"] for r in corpus_rows("short.jsonl", ids * rounds.stop)]
    pipe = client.pipeline(transaction=False)
    for r in rounds:
        order = list(range(ids))
        rng.shuffle(order)
        for i in order:
            doc = f"doc-{i}"
            if r > 0 and rng.random() < 0.25:
                pipe.xadd(stream, {"id": doc, "op": "delete"})
                last[doc] = None
            else:
                text = texts[r * ids + i]
                pipe.xadd(stream, {"id": doc, "text": text})
                last[doc] = text
    pipe.execute()


def assert_index_equals(sink: Sink, last: dict[str, Any], encoder: Encoder) -> None:
    present = {doc: text for doc, text in last.items() if text is not None}
    assert sink.count() == len(present)  # a real server shows a double write here
    rows = {r["id"]: r for r in sink.get(list(last))}
    assert set(rows) == set(present)
    reference = dict(zip(present, encoder.encode(list(present.values())), strict=True))
    for doc, text in present.items():
        assert rows[doc]["text"] == text, doc
        vector = np.asarray(rows[doc]["vector"], dtype=np.float32)
        assert float(vector @ reference[doc] / np.linalg.norm(vector)) >= 0.9999, doc


def worker_args(redis_url: str, stream: str, milvus: str, consumer: str, *extra: str) -> list[str]:
    return [
        "--redis-url",
        redis_url,
        "--stream",
        stream,
        "--group",
        "g",
        "--consumer",
        consumer,
        "--milvus-uri",
        milvus,
        "--collection",
        "ordered",
        "--block-ms",
        "100",
        "--min-idle",
        "3",
        "--milvus-timeout",
        "2",
        "--reclaim-interval",
        "0.5",
        "--read-count",
        "5",
        "--max-batch-rows",
        "3",
        "--device",
        "cpu",
        "--replicas",
        "1",
        *extra,
    ]


def test_three_workers_with_kills_leave_every_id_as_its_last_entry_says(
    tmp_path: Path,
    spawn_worker: Callable[..., WorkerProcess],
    milvus_standalone: MilvusStandalone,
    encoder: Encoder,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    client = server.client()
    stream = "ordered:tasks"
    try:
        client.xgroup_create(stream, "g", id="0", mkstream=True)
        last: dict[str, Any] = {}

        def spawn(name: str, *extra: str) -> WorkerProcess:
            args = worker_args(server.url, stream, milvus_standalone.uri, name, *extra)
            worker = spawn_worker(*args, name=name)
            # Started (signal handlers in place, blocked on the stream) before it matters.
            wait_until(
                lambda: '"worker_started"' in worker.log_text() or worker.proc.poll() is not None,
                180,
                f"{name} to start",
            )
            return worker

        steady = [spawn("w1"), spawn("w2")]
        # The victim dies twice between taking its leases and writing, holding entries
        # and leases that must both expire before anyone may write those ids again; each
        # time, versions arrive while it is waiting for them.
        for rounds in (range(0, 3), range(3, 6)):
            victim = spawn("w3", "--fault-point", "after_fence")
            plant_versions(client, stream, 40, rounds, last)
            assert victim.wait(180) == -signal.SIGKILL, victim.log_tail()
        last_one = spawn("w3")  # restarted under the same name: re-reads its own pending
        plant_versions(client, stream, 40, range(6, 8), last)
        wait_until(
            lambda: (
                client.xpending(stream, "g")["pending"] == 0
                and client.xinfo_groups(stream)[0]["lag"] == 0
            ),
            240,
            "the fleet to drain the stream",
        )
        for w in [*steady, last_one]:
            w.signal(signal.SIGTERM)
            assert w.wait(60) == 0, w.log_tail()
        logs = "".join(w.log_text() for w in [*steady, last_one])
        assert '"reclaimed"' in logs  # the victim's entries were taken over
        sink = Sink(milvus_standalone.uri, "", "ordered", timeout_s=10)
        try:
            assert_index_equals(sink, last, encoder)
        finally:
            sink.close()
        assert client.xlen(f"{stream}:dlq") == 0
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("ordered", [True, False])
def test_a_reclaimed_old_version_never_overwrites_a_newer_one(
    ordered: bool,
    redis_client: redis.Redis,
    settings: Settings,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    """Worker A reads x:v1 and dies; B writes x:v2; a reclaim hands v1 to B later. Without
    the fence (``ordered_writes`` off, as `embedq bench` measures it) the stale v1 wins:
    the scenario is real, and only the fence stops it."""
    stream = Stream(redis_client, settings.stream, settings.group, "dead")
    stream.ensure_group()
    first = entry(redis_client, settings.stream, "x", "first version")
    assert len(stream.read_new(10, 0)) == 1  # "dead" holds v1 and never acks it
    entry(redis_client, settings.stream, "x", "second version")
    worker = make_worker(
        min_idle_s=4.0, reclaim_interval_s=0.2, milvus_timeout_s=2.0, ordered_writes=ordered
    )
    worker.prepare()  # the collection exists before the clock below starts
    # v1 looks busy for 4 s more: the worker writes v2 first, then reclaims v1.
    redis_client.xclaim(settings.stream, settings.group, "dead", 0, [first], justid=True)
    stats = worker.run()
    assert stats.reclaimed == 1
    if not ordered:
        assert [r["text"] for r in sink.get(["x"])] == ["first version"]
        return
    assert stats.stale == 1 and stats.texts == 1
    assert [r["text"] for r in sink.get(["x"])] == ["second version"]
    assert redis_client.xpending(settings.stream, settings.group)["pending"] == 0


# -- deletes, dedup, sync ----------------------------------------------------------------


def test_deletes_through_the_cli_remove_rows_in_order_with_writes(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    producer = Producer(redis_client, settings.stream)
    producer.enqueue([{"id": f"d{i}", "text": f"text {i} about goats"} for i in range(6)])
    make_worker().run()
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("d1\nd2\n\nnever-existed\n", encoding="utf-8")
    env = cli_env(settings)
    done = embedq("delete", "d0", "--from", str(ids_file), env=env)
    assert done.returncode == 0, done.stderr
    assert "sent 4 deletes" in done.stdout
    producer.enqueue([{"id": "d2", "text": "d2 is back"}])  # after its delete: it stays
    stats = make_worker().run()
    assert stats.deleted == 3
    assert sorted(r["id"] for r in sink.get([f"d{i}" for i in range(6)], with_vectors=False)) == [
        "d2",
        "d3",
        "d4",
        "d5",
    ]
    nothing = embedq("delete", env=env)
    assert nothing.returncode == 2 and "give ids" in nothing.stderr


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chunks(doc: str, n: int, version: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{doc}#{i}", "text": f"{doc} chunk {i} {version}", "meta": {"doc": doc}}
        for i in range(n)
    ]


@pytest.mark.parametrize("cleanup", ["incremental", "full"])
def test_document_sync_leaves_exactly_the_new_chunk_set(
    cleanup: str,
    tmp_path: Path,
    settings: Settings,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    env = cli_env(settings)
    # a shrinks by 3 of the ledger's 10 ids (full: 5): past --max-delete's default 10%
    sync = ["--doc-field", "doc", "--cleanup", cleanup, "--max-delete", "all"]
    first = chunks("a", 5, "v1") + chunks("b", 3, "v1") + chunks("c", 2, "v1")
    sent = embedq("enqueue", str(write_jsonl(tmp_path / "1.jsonl", first)), *sync, env=env)
    assert sent.returncode == 0, sent.stderr
    make_worker().run()
    # a is re-chunked into fewer chunks, b is unchanged, c is gone from the source.
    second = chunks("a", 2, "v2") + chunks("b", 3, "v1")
    again = embedq("enqueue", str(write_jsonl(tmp_path / "2.jsonl", second)), *sync, env=env)
    assert again.returncode == 0, again.stderr
    make_worker().run()
    rows = {r["id"]: r["text"] for r in sink.get([r["id"] for r in first], with_vectors=False)}
    expected = {r["id"]: r["text"] for r in second}
    if cleanup == "incremental":  # c was not in this run: incremental leaves it alone
        expected |= {r["id"]: r["text"] for r in chunks("c", 2, "v1")}
        assert "3 deleted" in again.stdout
    else:
        assert "5 deleted" in again.stdout
    assert rows == expected
    # A record naming no document is rejected with why, and the run still syncs the rest.
    bad = embedq(
        "enqueue",
        str(write_jsonl(tmp_path / "3.jsonl", [{"id": "x", "text": "no doc"}, *second])),
        *sync,
        env=env,
    )
    assert bad.returncode == 0 and "(1 rejected)" in bad.stdout, bad.stdout + bad.stderr


def test_sync_needs_both_options(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings)
    src = write_jsonl(tmp_path / "x.jsonl", [{"id": "a", "text": "t"}])
    done = embedq("enqueue", str(src), "--cleanup", "full", env=env)
    assert done.returncode == 2 and "--doc-field and --cleanup go together" in done.stderr


def test_thirty_ids_sharing_a_text_get_thirty_rows_from_one_forward_pass(
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    rows = [{"id": f"shared-{i}", "text": "Copyright 2026 Example Corp."} for i in range(30)]
    producer = Producer(redis_client, settings.stream, collection=settings.collection)
    assert producer.run(records(rows), dedup=True).sent == 30
    worker = make_worker()
    worker.run()
    assert sink.count() == 30
    assert worker.metrics.encoded_texts._value.get() == 1
    assert worker.metrics.vector_cache_hits._value.get() == 29
    again = producer.run(records(rows), dedup=True)
    assert (again.sent, again.unchanged) == (0, 30)


def records(rows: list[dict[str, Any]]) -> Iterator[Record]:
    return iter([as_record(r) for r in rows])


def test_a_superseded_text_is_never_recorded_as_written(
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    producer = Producer(redis_client, settings.stream, collection=settings.collection)
    producer.enqueue([{"id": "x", "text": "text A"}, {"id": "x", "text": "text B"}])
    make_worker().run()  # one window: B supersedes A, A is never written
    # y never held "text A", and x holds "text B": both are sent.
    assert producer.run(records([{"id": "y", "text": "text A"}]), dedup=True).sent == 1
    assert producer.run(records([{"id": "x", "text": "text A"}]), dedup=True).sent == 1
    make_worker().run()
    assert {r["id"]: r["text"] for r in sink.get(["x", "y"], with_vectors=False)} == {
        "x": "text A",
        "y": "text A",
    }


def test_a_valid_version_survives_a_later_poison_one(
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    long_text = " ".join(["lorem"] * 600)
    redis_client.xadd(settings.stream, {"id": "x", "text": "the valid version"})
    redis_client.xadd(settings.stream, {"id": "x", "text": long_text})
    stats = make_worker(on_overlong="reject").run()
    assert stats.dead_lettered == 1
    assert [r["text"] for r in sink.get(["x"], with_vectors=False)] == ["the valid version"]
    assert redis_client.xpending(settings.stream, settings.group)["pending"] == 0


# -- verify and repair -------------------------------------------------------------------


def test_verify_finds_rows_deleted_or_changed_behind_its_back_and_repair_fixes_them(
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    encoder: Encoder,
) -> None:
    rows = [{"id": f"v{i}", "text": f"verify text number {i}"} for i in range(8)]
    odd = {"id": 'a "quoted\\ id', "text": "ids may hold quotes and backslashes"}
    Producer(redis_client, settings.stream).enqueue([*rows, odd])
    make_worker().run()
    # Page by page (keyset on the id), odd ids included, each row once.
    listed = [r["id"] for r in sink.rows(batch_size=3)]
    assert sorted(listed) == sorted([r["id"] for r in rows] + [odd["id"]])
    streams = [Stream(redis_client, settings.stream, settings.group, "verify")]
    drift, _ = verify(streams, sink)
    assert drift.clean and (drift.rows, drift.indexed) == (9, 9)

    sink.delete(["v1"])  # behind embedq's back
    stray = sink.get(["v2"])[0]
    sink.upsert([_row(stray, "someone else's text"), _row({**stray, "id": "stray"}, "not ours")])
    drift, index = verify(streams, sink)
    assert (drift.missing, drift.changed, drift.unknown) == (["v1"], ["v2"], ["stray"])
    fixed = repair(drift, index, streams)
    assert (fixed.resent, fixed.deleted, fixed.unrepairable) == (2, 1, [])
    make_worker().run()
    drift, _ = verify(streams, sink)
    assert drift.clean, drift
    assert {r["id"]: r["text"] for r in sink.get(["v1", "v2"], with_vectors=False)} == {
        "v1": "verify text number 1",
        "v2": "verify text number 2",
    }


def _row(stored: dict[str, Any], text: str) -> Any:
    from embedq.sink.milvus import Row

    return Row(
        id=stored["id"],
        vector=np.asarray(stored["vector"], dtype=np.float32),
        text=text,
        meta={},
    )


def test_two_workers_each_holding_an_id_the_other_wants_do_not_wait_for_each_other(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """A holds x and wants y; B holds y and wants x. Neither may wait with its leases held
    (they would wait out each other's leases): claim hands back the busy ids at once, the
    caller settles the rest (releasing its leases) and asks again."""
    from embedq.core.backoff import Retrier
    from embedq.core.records import Record
    from embedq.worker.pipeline import Item
    from embedq.worker.write_order import Ordering

    a_stream = Stream(redis_client, stream_name, "g", "A")
    b_stream = Stream(redis_client, stream_name, "g", "B")
    x1, y1 = entry(redis_client, stream_name, "x", "1"), entry(redis_client, stream_name, "y", "1")
    x2, y2 = entry(redis_client, stream_name, "x", "2"), entry(redis_client, stream_name, "y", "2")

    def item(stream: Stream, doc: str, version: str) -> Item:
        from embedq.queue.entries import Entry

        return Item(stream, Entry(version, {}), Record(doc, "t"), content_hash="h")

    versions = {stream_name: Versions(redis_client, Keys(stream_name), "c")}
    ordering = Ordering(versions, 60_000, Retrier())
    go_a, _, busy_a = ordering.claim(a_stream, [item(a_stream, "x", x1)])
    go_b, _, busy_b = ordering.claim(b_stream, [item(b_stream, "y", y2)])
    assert len(go_a) == len(go_b) == 1 and not busy_a and not busy_b
    started = time.monotonic()
    go, stale, busy = ordering.claim(a_stream, [item(a_stream, "x", x1), item(a_stream, "y", y1)])
    assert [i.record.id for i in go] == ["x"] and [i.record.id for i in busy] == ["y"]
    assert not stale
    assert time.monotonic() - started < 1  # handed back, not waited for
    ordering.commit(a_stream, go, [], go)  # A settles x: its lease goes
    go, _, busy = ordering.claim(b_stream, [item(b_stream, "x", x2)])
    assert [i.record.id for i in go] == ["x"] and not busy  # B gets x now
