"""Producer jobs: a killed `embedq enqueue` resumes without a resend or a gap, --max-lag
holds the stream still until a worker drains it, --dedup skips exactly the repeated texts,
`embedq trim` drops only what every group acknowledged, and `embedq jobs` counts it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import partition_streams
from embedq.core.records import Record
from embedq.producer.client import Producer
from embedq.producer.sources import read_jsonl
from embedq.queue.jobs import JobLedger, get_job
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker

from .conftest import REDIS_URL, corpus_rows
from .test_cli import embedq


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sent_ids(client: redis.Redis, streams: list[str]) -> list[str]:
    return [f[b"id"].decode() for s in streams for _, f in client.xrange(s)]


def start_enqueue(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", "enqueue", *args],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
            stdout=subprocess.PIPE,
            stderr=err,
        )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("partitions", [1, 4])
def test_killed_enqueue_resumes_and_sends_every_record_exactly_once(
    tmp_path: Path, stream_name: str, redis_client: redis.Redis, partitions: int
) -> None:
    total = 40_000
    rows = [{"id": f"r{i}", "text": f"record number {i}"} for i in range(total)]
    source = write_jsonl(tmp_path / "big.jsonl", rows)
    streams = partition_streams(stream_name, partitions)
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name, "EMBEDQ_LOG_JSON": "1"}
    # Small chunks slow the producer down enough to kill it part-way through the file.
    args = [str(source), "--job", "J", "--chunk", "10", "--partitions", str(partitions)]

    proc = start_enqueue(args, env, tmp_path / "first.log")
    wait_for(lambda: sum(redis_client.xlen(s) for s in streams) >= 4000, 120, "the first entries")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    at_kill = sum(redis_client.xlen(s) for s in streams)
    assert proc.returncode == -signal.SIGKILL and 4000 <= at_kill < total

    again = embedq("enqueue", *args, env=env)
    assert again.returncode == 0, again.stderr
    assert f"enqueued {total - at_kill} records" in again.stdout
    assert f"{at_kill} sent before" in again.stdout

    ids = sent_ids(redis_client, streams)
    assert len(ids) == total and set(ids) == {r["id"] for r in rows}  # no gap, no resend
    job = get_job(JobLedger(redis_client, stream_name), "J")
    assert job is not None and (job.enqueued, job.state, job.partitions) == (
        total,
        "sent",
        partitions,
    )
    # A third run of a finished job sends nothing.
    third = embedq("enqueue", *args, env=env)
    assert "enqueued 0 records" in third.stdout and f"{total} sent before" in third.stdout


def test_max_lag_holds_the_stream_still_until_a_worker_drains_it(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    rows = corpus_rows("short.jsonl", 600)
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    env = {
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_GROUP": settings.group,
        "EMBEDQ_LOG_JSON": "1",
    }
    log = tmp_path / "enqueue.log"
    proc = start_enqueue(
        [str(source), "--max-lag", "100", "--chunk", "25", "--job", "bp"], env, log
    )
    wait_for(lambda: "backpressure_wait" in log.read_text(), 120, "backpressure_wait")

    def settled() -> bool:  # chunks handed to the sender before the wait may still land
        before = redis_client.xlen(settings.stream)
        time.sleep(0.5)
        return redis_client.xlen(settings.stream) == before

    wait_for(settled, 30, "the stream to stop growing")
    held = redis_client.xlen(settings.stream)
    time.sleep(1.0)  # the producer polls every 0.2 s: five chances to send more
    assert redis_client.xlen(settings.stream) == held
    # Over the limit by at most the chunks already handed to the sender (3 × 25).
    assert 100 < held <= 100 + 3 * 25 and proc.poll() is None

    while proc.poll() is None:
        make_worker().run()  # drains what is there; the producer then sends more
    make_worker().run()
    out, _ = proc.communicate()
    assert proc.returncode == 0 and b"enqueued 600 records" in out
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "backpressure_resumed" in events
    assert sink.count() == 600

    job = get_job(JobLedger(redis_client, settings.stream), "bp")
    assert job is not None
    assert (job.enqueued, job.embedded, job.dead_lettered, job.state) == (600, 600, 0, "done")
    listed = embedq("jobs", "--json", env=env)
    jobs = [json.loads(line) for line in listed.stdout.splitlines()]  # JSON Lines
    assert [(j["job"], j["embedded"], j["eta_s"]) for j in jobs] == [("bp", 600, 0.0)]
    shown = embedq("job", "bp", env=env)
    assert "embedded         600" in shown.stdout
    missing = embedq("job", "nope", env=env)
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr


def test_dedup_skips_only_an_id_that_already_holds_its_text(
    tmp_path: Path,
    settings: Settings,
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
) -> None:
    texts = [r["text"] for r in corpus_rows("long.jsonl", 200)]
    texts = list(dict.fromkeys(texts))[:70]  # 70 distinct texts
    embedded, fresh = texts[:40], texts[40:]
    producer = Producer(
        redis_client, settings.stream, group=settings.group, collection=settings.collection
    )
    first_rows = [{"id": f"a{i}", "text": t} for i, t in enumerate(embedded)]
    first = producer.run(
        read_jsonl(str(write_jsonl(tmp_path / "a.jsonl", first_rows))), job="first", dedup=True
    )
    assert (first.sent, first.unchanged) == (40, 0)
    # Nothing is recorded as written before the worker confirmed it: a re-send now goes out.
    assert producer.run(iter([Record("a0", embedded[0])]), dedup=True).sent == 1
    make_worker().run()

    second_rows = (
        [{"id": f"a{i}", "text": t} for i, t in enumerate(embedded[:20])]  # unchanged
        + [{"id": f"b{i}", "text": t} for i, t in enumerate(embedded[:20])]  # same text, new id
        + [{"id": "a20", "text": "a20 changed its text"}]
        + [{"id": f"n{i}", "text": t} for i, t in enumerate(fresh)]  # 30 new
        + [{"id": f"n{i}", "text": t} for i, t in enumerate(fresh[:10])]  # repeated in the run
    )
    source = write_jsonl(tmp_path / "b.jsonl", second_rows)
    env = {
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_COLLECTION": settings.collection,
    }
    cli = embedq("enqueue", str(source), "--dedup", "--job", "second", env=env)
    assert cli.returncode == 0, cli.stderr
    assert "enqueued 51 records" in cli.stdout and "; 30 unchanged" in cli.stdout
    entries = [f for _, f in redis_client.xrange(settings.stream) if f.get(b"job") == b"second"]
    sent_ids = [f[b"id"].decode() for f in entries]
    assert sent_ids == [f"b{i}" for i in range(20)] + ["a20"] + [f"n{i}" for i in range(30)]
    make_worker().run()
    # Every id has its row, the shared texts included.
    assert len(sink.get([f"b{i}" for i in range(20)], with_vectors=False)) == 20
    assert sink.count() == 40 + 20 + 30

    # Into another collection nothing is held yet: everything is sent again.
    other = Producer(redis_client, settings.stream, collection="another")
    rerun = other.run(read_jsonl(str(source)), job="third", dedup=True)
    assert (rerun.sent, rerun.unchanged) == (71, 10)


def test_trim_drops_only_what_every_group_acknowledged(
    stream_name: str, redis_client: redis.Redis
) -> None:
    stream = Stream(redis_client, stream_name, "g1", "c")
    assert stream.trim() == (0, None)  # no stream at all
    ids = [redis_client.xadd(stream_name, {"id": str(i), "text": "t"}).decode() for i in range(10)]
    assert stream.trim() == (0, None)  # no group yet: every entry is undelivered
    redis_client.xgroup_create(stream_name, "g1", id="0")
    redis_client.xgroup_create(stream_name, "g2", id="0")
    redis_client.xreadgroup("g1", "c", {stream_name: ">"}, count=6)
    redis_client.xack(stream_name, "g1", *ids[:3])  # g1: 3..5 pending, 6..9 undelivered
    redis_client.xreadgroup("g2", "c", {stream_name: ">"}, count=2)
    redis_client.xack(stream_name, "g2", *ids[:2])  # g2: done with 0 and 1 only

    assert stream.trim() == (2, ids[2])
    redis_client.xgroup_destroy(stream_name, "g2")
    assert stream.trim() == (1, ids[3])  # g1's oldest pending entry stays
    redis_client.xack(stream_name, "g1", *ids[3:6])
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name, "EMBEDQ_GROUP": "g1"}
    cli = embedq("trim", "--json", env=env)
    ms, seq = ids[5].split("-")
    assert [json.loads(line) for line in cli.stdout.splitlines()] == [
        {"stream": stream_name, "trimmed": 3, "minid": f"{ms}-{int(seq) + 1}"}
    ]
    left = [eid.decode() for eid, _ in redis_client.xrange(stream_name)]
    assert left == ids[6:]  # the undelivered entries, untouched
    assert stream.lag().lag == 4  # still countable: KEDA keeps seeing the backlog


def test_worker_trims_acknowledged_entries_when_asked(
    settings: Settings, redis_client: redis.Redis, make_worker: Callable[..., Worker]
) -> None:
    Producer(redis_client, settings.stream).enqueue(corpus_rows("short.jsonl", 30))
    make_worker(trim_interval_s=0.001).run()
    assert redis_client.xlen(settings.stream) == 0
    assert Stream(redis_client, settings.stream, "g", "-").lag().lag == 0


def test_progress_draws_a_bar_on_a_terminal_and_logs_off_one() -> None:
    import io

    from structlog.testing import capture_logs

    from embedq.core.progress import Progress
    from embedq.producer.client import Counts

    counts = Counts(sent=400, unchanged=5, rejected=1, position=406)
    screen = io.StringIO()
    bar = Progress(1000, tty=True, out=screen)
    bar.every_s = 0.0
    bar(counts)
    bar.close()
    shown = screen.getvalue()
    assert "406/1,000" in shown and "ETA" in shown and "unchanged 5" in shown
    assert shown.endswith("\n")
    with capture_logs() as logs:
        lines = Progress(None, tty=False, every_s=0.0, out=io.StringIO())
        lines(counts)
    assert logs[0]["event"] == "enqueue_progress" and logs[0]["total"] is None
    assert (logs[0]["sent"], logs[0]["read"], logs[0]["eta_s"]) == (400, 406, None)
