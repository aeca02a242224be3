"""Feeding a fast device (issue 13): the columnar write path, merged writes, several worker
processes per device, and the feed benchmark's measuring parts.

Against real Redis, Milvus Lite, the Milvus 2.3.5 server (with and without authorization)
and real models. The one stand-in: a client without pymilvus's gRPC internals (the
fallback to dict rows), since the installed pymilvus always has them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.bench.feed import (
    FeedResult,
    feed_ratios,
    rate_between,
    run_redis,
    run_tokenizer,
    zero_layer_copy,
)
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, SinkRejected
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.queue.dlq import DeadLetter
from embedq.queue.entries import Entry, as_entries
from embedq.sink.columns import Columns, cut_utf8, meta_json
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker
from embedq.worker.pipeline import merged

from .support.servers import MilvusLiteServer, MilvusStandalone, RedisServer
from .support.stubs import StubSink
from .test_settle import Rig

LONG = "é" * 40_000  # 80,000 UTF-8 bytes: cut at Milvus's 65,535-byte VARCHAR limit


def columns(n: int, dim: int = 8, *, version: str = "1-0") -> Columns:
    rng = np.random.default_rng(n)
    texts = [f"text {i}" for i in range(n)]
    texts[0] = LONG
    return Columns(
        ids=[f"id-{i}" for i in range(n)],
        vectors=rng.standard_normal((n, dim)).astype(np.float32),
        texts=texts,
        metas=[meta_json({"i": i, "nested": {"tags": ["a", "ü"]}}) for i in range(n)],
        content_hashes=[f"{i:032x}" for i in range(n)],
        versions=[version] * n,
    )


class DictRowsOnly:
    """A client without pymilvus's gRPC stub (another pymilvus): only its public calls."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def upsert(self, *args: Any, **kwargs: Any) -> Any:
        return self._client.upsert(*args, **kwargs)


def stored(sink: Sink, n: int) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in sink.get([f"id-{i}" for i in range(n)])}


def check_rows(sink: Sink, cols: Columns) -> None:
    rows = stored(sink, len(cols))
    assert sink.count() == len(cols)  # the 2.3.5 server would show a second copy here
    for i, doc in enumerate(cols.ids):
        row = rows[doc]
        assert np.array_equal(np.asarray(row["vector"], dtype=np.float32), cols.vectors[i])
        assert row["text"] == cut_utf8(cols.texts[i])
        assert row["meta"] == json.loads(cols.metas[i])
        assert (row["content_hash"], row["version"]) == (cols.content_hashes[i], cols.versions[i])
    assert len(rows["id-0"]["text"].encode()) <= 65_535 and rows["id-0"]["text"].startswith("é")


@pytest.mark.parametrize("where", ["lite", "server"])
def test_columnar_upserts_store_exactly_what_dict_rows_store(
    where: str, tmp_path: Path, milvus_standalone: MilvusStandalone
) -> None:
    uri = str(tmp_path / "m.db") if where == "lite" else milvus_standalone.uri
    sink = Sink(uri, "", f"cols_{where}_{tmp_path.name[-8:]}".replace("-", "_"), timeout_s=20)
    try:
        sink.ensure_collection(8, "test")
        first = columns(40)
        assert sink.upsert_columns(first) == 40
        check_rows(sink, first)
        # Again, newer: upserts overwrite (no second row on the server), and the fallback
        # through dict rows writes the same thing.
        again = columns(40, version="2-0")
        real = sink.client
        sink._client = DictRowsOnly(real)
        try:
            assert sink.upsert_columns(again) == 40
        finally:
            sink._client = real
        check_rows(sink, again)
    finally:
        sink.close()


def test_requests_are_cut_under_the_budget_and_keep_row_order() -> None:
    cols = columns(30, dim=1000)
    parts = cols.chunks(budget_bytes=10 * 4100)
    assert len(parts[0]) == 1  # the 160 kB text alone: one row may exceed the budget
    assert len(parts) > 3
    assert [i for p in parts for i in p.ids] == list(cols.ids)
    assert all(sum(p.request_bytes()) <= 10 * 4100 or len(p) == 1 for p in parts)


def test_a_meta_json_cannot_carry_is_refused_as_that_rows_fault() -> None:
    with pytest.raises(SinkRejected, match="meta cannot be stored as JSON"):
        meta_json({"n": 10**30})


def test_columnar_writes_carry_the_token_and_a_wrong_one_is_refused(
    milvus_server_factory: Callable[..., MilvusStandalone], tmp_path: Path
) -> None:
    server = milvus_server_factory(authorization=True)
    sink = Sink(server.uri, server.token, "cols_auth", timeout_s=20)
    try:
        sink.ensure_collection(8, "test")
        cols = columns(5)
        assert sink.upsert_columns(cols) == 5
        check_rows(sink, cols)
    finally:
        sink.close()
    wrong = Sink(server.uri, "root:wrong", "cols_auth", timeout_s=20)
    with pytest.raises(ConfigError) as refused:
        wrong.upsert_columns(columns(5))
    assert "wrong" not in str(refused.value)


# -- merged writes ----------------------------------------------------------------------


def window(rig: Rig, *entries: tuple[str, str, str]) -> list[Any]:
    """One read window of (entry id, doc id, text), batched and encoded as the worker does."""
    raw = [Entry(eid, {b"id": doc.encode(), b"text": text.encode()}) for eid, doc, text in entries]
    batches = rig.batcher.batches(rig.stream, raw)  # type: ignore[arg-type]
    for batch in batches:
        rig.encoding.encode(batch, rig.encoder)
    rig.stream.pending |= {e.entry_id for e in raw}
    return batches


def test_a_merged_write_keeps_each_ids_newest_version_whatever_the_read_order(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink(), max_batch_rows=1)
    first = window(rig, ("5-0", "a", "a as of five"), ("6-0", "b", "b as of six"))
    # A later window brings a newer b and, reclaimed from a dead worker, an older a.
    second = window(rig, ("3-0", "a", "a as of three"), ("9-0", "b", "b as of nine"))
    batch = merged([*first, *second])
    assert batch.parts == 4
    rig.settler.settle(batch)
    assert {k: r.text for k, r in rig.sink.rows.items()} == {
        "a": "a as of five",
        "b": "b as of nine",
    }
    assert sorted(rig.stream.acked) == ["3-0", "5-0", "6-0", "9-0"] and not rig.stream.pending
    reference = tiny_encoder.encode(["a as of five", "b as of nine"])
    assert np.allclose(rig.sink.rows["a"].vector, reference[0], atol=1e-6)
    assert np.allclose(rig.sink.rows["b"].vector, reference[1], atol=1e-6)
    assert rig.stats.texts == 2 and rig.stats.batches == 4


def test_a_merged_write_of_distinct_ids_writes_every_row_with_its_own_vector(
    tiny_encoder: Encoder,
) -> None:
    """The usual case (no id in two batches) skips the supersede sort: every row, its own
    text and vector, every entry acked."""
    rig = Rig(tiny_encoder, StubSink(), max_batch_rows=2)
    texts = {f"d{i}": f"text number {i} " + "word " * i for i in range(7)}
    entries = [(f"{i + 1}-0", doc, text) for i, (doc, text) in enumerate(texts.items())]
    first, second = window(rig, *entries[:4]), window(rig, *entries[4:])
    batch = merged([*first, *second])
    assert batch.parts == len(first) + len(second) > 2
    rig.settler.settle(batch)
    assert {k: r.text for k, r in rig.sink.rows.items()} == texts
    reference = tiny_encoder.encode(list(texts.values()))
    for doc, vector in zip(texts, reference, strict=True):
        assert np.allclose(rig.sink.rows[doc].vector, vector, atol=1e-6), doc
    assert len(rig.stream.acked) == 7 and not rig.stream.pending


def test_a_delete_and_a_newer_write_in_one_merged_write(tiny_encoder: Encoder) -> None:
    rig = Rig(tiny_encoder, StubSink())
    first = window(rig, ("1-0", "a", "first"), ("2-0", "b", "stays"))
    raw = [
        Entry("3-0", {b"id": b"a", b"op": b"delete"}),
        Entry("4-0", {b"id": b"b", b"op": b"delete"}),
    ]
    deletes = rig.batcher.batches(rig.stream, raw)  # type: ignore[arg-type]
    rig.stream.pending |= {"3-0", "4-0"}
    later = window(rig, ("5-0", "b", "back again"))
    rig.settler.settle(merged([*first, *deletes, *later]))
    assert {k: r.text for k, r in rig.sink.rows.items()} == {"b": "back again"}
    assert rig.sink.deleted == ["a"]
    assert not rig.stream.pending


def test_a_hostile_meta_is_dead_lettered_and_the_rest_of_the_write_lands(
    make_worker: Callable[..., Worker], redis_client: redis.Redis, settings: Settings, sink: Sink
) -> None:
    for i in range(6):
        meta = '{"n": 1000000000000000000000000000000}' if i == 3 else json.dumps({"i": i})
        redis_client.xadd(settings.stream, {"id": f"m-{i}", "text": f"text {i}", "meta": meta})
    stats = make_worker(read_count=3, max_batch_rows=2).run()
    assert stats.texts == 5 and stats.dead_lettered == 1
    dead = [
        DeadLetter.from_entry(e) for e in as_entries(redis_client.xrange(f"{settings.stream}:dlq"))
    ]
    assert [(d.reason, d.original[b"id"]) for d in dead] == [("sink_rejected", b"m-3")]
    assert "meta cannot be stored as JSON" in dead[0].error
    assert sink.count() == 5 and {r["id"] for r in sink.get([f"m-{i}" for i in range(6)])} == {
        f"m-{i}" for i in (0, 1, 2, 4, 5)
    }
    cpu = stats.as_dict()["cpu_us_per_text"]
    assert {"read", "decode", "tokenize", "forward", "pool", "build_rows", "upsert", "ack"} <= set(
        cpu
    )


# -- several processes per device -------------------------------------------------------


def test_two_processes_per_device_share_the_stream_as_two_consumers(
    tmp_path: Path, tiny_model: Path, milvus_lite_server: MilvusLiteServer
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        client = server.client()
        for i in range(300):
            client.xadd("t", {"id": f"d{i}", "text": f"text number {i} about goats"})
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedq.cli",
                "worker",
                "--drain",
                "--procs-per-device",
                "2",
                "--device",
                "cpu",
                "--model",
                str(tiny_model),
                "--redis-url",
                server.url,
                "--stream",
                "t",
                "--consumer",
                "node",
                "--milvus-uri",
                milvus_lite_server.uri,
                "--collection",
                "procs",
                "--read-count",
                "20",
                "--block-ms",
                "100",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        consumers = {c["name"].decode(): c for c in client.xinfo_consumers("t", "embedq")}
        assert set(consumers) == {"node-cpu0-p0", "node-cpu0-p1"}
        stopped = [json.loads(x) for x in run.stderr.splitlines() if '"worker_stopped"' in x]
        assert len(stopped) == 2 and sum(s["texts"] for s in stopped) == 300
        assert client.xpending("t", "embedq")["pending"] == 0
        client.close()
    sink = Sink(milvus_lite_server.uri, "", "procs", timeout_s=20)
    try:
        assert sink.count() == 300
    finally:
        sink.close()


def test_procs_per_device_must_be_positive() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "embedq.cli", "worker", "--procs-per-device", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "procs" in run.stderr.lower()


# -- the feed benchmark's parts ---------------------------------------------------------


def test_the_rate_is_read_between_ten_and_ninety_percent() -> None:
    # 1,000 texts: 100 acked at t=1 s, 900 at t=5 s (a slow start and tail left out).
    samples = [(0.0, 0), (1.0, 100), (3.0, 500), (5.0, 900), (9.0, 1000)]
    assert rate_between(samples, 1000) == pytest.approx(800 / 4.0)


def test_feed_ratios_divide_by_the_slowest_component_of_the_same_run() -> None:
    results = [
        FeedResult("feed×1", 1, 10, 80.0),
        FeedResult("sink", 1, 10, 100.0),
        FeedResult("tokenizer", 1, 10, 500.0),
        FeedResult("redis", 1, 10, 900.0),
        FeedResult("feed×1", 2, 10, 45.0),
        FeedResult("sink", 2, 10, 50.0),
        FeedResult("tokenizer", 2, 10, 60.0),
        FeedResult("redis", 2, 10, 900.0),
    ]
    assert feed_ratios(results) == {"feed×1": pytest.approx(0.85)}


def test_the_zero_layer_copy_keeps_tokenizer_pooling_and_width(tmp_path: Path) -> None:
    source = packaged_model_dir()
    assert source is not None
    zero = zero_layer_copy(source, tmp_path / "zero")
    assert json.loads((zero / "config.json").read_text())["num_hidden_layers"] == 0
    full, bare = Encoder(str(source), "cpu"), Encoder(str(zero), "cpu")
    texts = ["a sentence about sheep", "another"]
    assert [t.ids for t in bare.tokenize(texts)] == [t.ids for t in full.tokenize(texts)]
    vectors = bare.encode(texts)
    assert vectors.shape == (2, full.width)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert run_tokenizer([{"id": "1", "text": t} for t in texts], model=zero, run=1).texts == 2


def test_bare_redis_read_and_ack_counts_every_entry(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        rows = [{"id": f"r{i}", "text": f"t {i}"} for i in range(1200)]
        result = run_redis(rows, redis_url=server.url, name="bare", run=1)
        client = server.client()
        assert result.texts == 1200 and client.xpending("bare", "bare")["pending"] == 0
        client.close()


def test_the_writer_gets_batches_back_in_read_order_up_to_its_row_budget() -> None:
    from embedq.worker.pipeline import END, Batch
    from embedq.worker.resequencer import Reorder

    held = Reorder()
    batches = [Batch(seq=i, items=[object()] * 3) for i in range(5)]  # type: ignore[list-item]
    assert held.take(batches[2]) == 0 and held.take(batches[1]) == 0
    assert held.ready(100) == []  # 0 has not arrived: nothing may be written before it
    held.take(batches[0])
    assert [b.seq for b in held.ready(6)] == [0, 1]  # 6 rows: two batches of three
    assert [b.seq for b in held.ready(6)] == [2]
    held.take(batches[4])
    assert held.ready(100) == [] and held.take(END) == 1
    assert held.pop_any().seq == 4 and len(held) == 0  # past a gap (a crashed replica)


def test_bench_sparse_reports_the_three_encoders(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedq.cli",
            "bench",
            "--sparse",
            "--corpus",
            str(sample),
            "-n",
            "24",
            "--runs",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if "x |" in line}
    assert set(rows) == {"dense", "dense+sparse", "splade"}
    assert rows["dense"].split("|")[3].strip() == "1.00x"
    assert rows["splade"].split("|")[6].strip() != "-"  # sparse vectors were produced


def test_the_feed_bench_waits_for_an_idle_milvus_before_each_variant(
    milvus_standalone: MilvusStandalone,
) -> None:
    # The load that must hold quiesce back: a client searching as fast as it can (the
    # stand-in for the index builds a variant leaves behind, which cannot be timed).
    sink = Sink(milvus_standalone.uri, "", "quiesce", timeout_s=60)
    sink.ensure_collection(8, "bench")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            sink.client.query("quiesce", filter='id == "x"', output_fields=["id"])

    before = milvus_standalone.cpu_s()
    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    threading.Timer(4.0, stop.set).start()
    started = time.monotonic()
    try:
        waited = milvus_standalone.quiesce()
    finally:
        stop.set()
        for t in threads:
            t.join()
        sink.client.drop_collection("quiesce")
        sink.close()
    assert milvus_standalone.cpu_s() > before
    assert time.monotonic() - started >= 3.5 and waited >= 3.5  # held back while busy
    # Idle again: done within a few seconds (after the drop's own background work).
    assert milvus_standalone.quiesce() < 10.0
