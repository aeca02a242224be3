"""Every CLI command, run as a user runs it: a subprocess with flags and EMBEDQ_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis

from embedq.core.config import Settings
from embedq.sink.milvus import Sink, open_sink

from .conftest import REDIS_URL, corpus_rows
from .support.cli import embedq  # other test files import it from here too

LAG_KEYS = {
    "stream",
    "group",
    "group_exists",
    "length",
    "lag",
    "pending",
    "last_delivered_id",
    "entries_read",
    "dlq_length",
    "consumers",
    "groups",  # every consumer group on the stream: one per collection during a migration
    "redis_memory",
    "redis_data_lost",  # null here: no collection yet (embedq.sink.epoch, issue 25)
    "redis_data_lost_message",
}


def test_enqueue_worker_lag_search_round_trip(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    rows = corpus_rows("long.jsonl", 60)
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(json.dumps(r) for r in rows[:50])
        + "\n{broken json\n"
        + json.dumps({"id": "no-text"})
        + "\n"
    )
    env = {
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": settings.stream,
        "EMBEDQ_GROUP": "cli",
        "EMBEDQ_MILVUS_URI": settings.milvus_uri,
        "EMBEDQ_COLLECTION": "cli_vectors",
        "EMBEDQ_LOG_JSON": "true",
    }

    sent = embedq("enqueue", str(source), env=env)
    assert sent.returncode == 0, sent.stderr
    assert "enqueued 50 records" in sent.stdout and "(2 rejected)" in sent.stdout
    assert "in.jsonl:51" in sent.stderr  # the rejected line is named
    piped = embedq(
        "enqueue",
        "-",
        "--id-field",
        "key",
        "--text-field",
        "body",
        env=env,
        stdin="\n".join(json.dumps({"key": r["id"], "body": r["text"]}) for r in rows[50:]),
    )
    assert piped.returncode == 0, piped.stderr
    assert "enqueued 10 records" in piped.stdout

    before = embedq("lag", "--json", env=env)
    assert before.returncode == 0, before.stderr
    info = json.loads(before.stdout)
    assert set(info) == LAG_KEYS
    assert info["group_exists"] is False and info["length"] == 60

    ran = embedq("worker", "--drain", "--block-ms", "200", "--consumer", "w1", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "embedded 60 texts" in ran.stdout
    events = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
    assert {"worker_started", "worker_stopped"} <= {e["event"] for e in events}

    after = json.loads(embedq("lag", "--json", env=env).stdout)
    assert (after["lag"], after["pending"], after["length"]) == (0, 0, 60)
    assert after["consumers"][0]["name"] == "w1" and after["consumers"][0]["pending"] == 0
    human = embedq("lag", env=env)
    assert "lag          0" in human.stdout and "w1" in human.stdout

    found = embedq("search", rows[3]["text"], "-k", "3", "--json", env=env)
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]  # JSON Lines
    assert hits[0]["id"] == rows[3]["id"] and hits[0]["score"] > 0.99 and len(hits) == 3
    text_out = embedq("search", rows[3]["text"], "-k", "2", env=env)
    assert rows[3]["id"] in text_out.stdout.splitlines()[0]


def test_lag_shows_unknown_when_redis_reports_null(
    redis_client: redis.Redis, stream_name: str
) -> None:
    ids = [redis_client.xadd(stream_name, {"id": str(i), "text": "x"}) for i in range(3)]
    # A group created at an arbitrary id is one of the cases where Redis cannot count lag.
    redis_client.xgroup_create(stream_name, "g", id=ids[1])
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name, "EMBEDQ_GROUP": "g"}
    as_json = json.loads(embedq("lag", "--json", env=env).stdout)
    assert as_json["lag"] is None
    human = embedq("lag", env=env).stdout
    assert "unknown" in human and "lag          0" not in human


def test_second_process_on_a_milvus_lite_file_gets_one_clear_line(
    tmp_path: Path, sink: Sink, settings: Settings
) -> None:
    sink.ensure_collection(384, "m")  # this test process now holds the Lite file open
    result = embedq(
        "search",
        "anything",
        "--milvus-uri",
        settings.milvus_uri,
        "--collection",
        settings.collection,
    )
    assert result.returncode == 2
    assert "already open in another process" in result.stderr
    assert "milvus-lite server" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_on_a_missing_collection_says_so(settings: Settings) -> None:
    # A database without the collection asked for, made by a process that then ends (this
    # one would hold the Milvus Lite file).
    make = f"from embedq.sink.milvus import Sink; Sink({settings.milvus_uri!r}, '', 'other', "
    make += "timeout_s=10).ensure_collection(384, 'm')"
    subprocess.run([sys.executable, "-c", make], check=True, timeout=120)
    result = embedq("search", "x", "--milvus-uri", settings.milvus_uri, "--collection", "nope")
    assert result.returncode == 2
    assert "collection nope does not exist" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_directory_names_the_flag(tmp_path: Path) -> None:
    result = embedq(
        "search", "x", "--model", str(tmp_path / "nope"), "--milvus-uri", str(tmp_path / "m.db")
    )
    assert result.returncode == 2
    assert "--model" in result.stderr and "Traceback" not in result.stderr


def test_env_vars_fill_settings_and_flags_override_them(tmp_path: Path) -> None:
    result = embedq("worker", "--help", env={"EMBEDQ_MAX_DELIVERIES": "9"})
    assert "EMBEDQ_MAX_DELIVERIES" not in result.stdout or result.returncode == 0
    bad = embedq("lag", env={"EMBEDQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert bad.returncode == 3 and "redis unavailable" in bad.stderr  # ExitCode.CONNECT
    unsafe = embedq("worker", "--milvus-timeout", "120", "--min-idle", "60")
    assert unsafe.returncode == 2 and "shorter than --min-idle (60.0)" in unsafe.stderr


def test_redis_password_never_appears_in_output(stream_name: str) -> None:
    url = "redis://someone:hunter2-secret@127.0.0.1:1/0"
    result = embedq(
        "lag", "--log-level", "debug", env={"EMBEDQ_REDIS_URL": url, "EMBEDQ_STREAM": stream_name}
    )
    assert result.returncode == 3  # ExitCode.CONNECT
    assert "hunter2-secret" not in result.stderr + result.stdout


JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def test_the_worker_runs_under_jemalloc_when_an_operator_preloads_it(
    tmp_path: Path, settings: Settings, redis_client: redis.Redis
) -> None:
    """README, "Memory": an operator may preload jemalloc (a lower CPU RSS on long texts,
    embedq.worker.heap's glibc tuning then does nothing); torch and the pipeline must work under
    it. redis-server depends on libjemalloc2, so it is on every machine that runs these
    tests."""
    import signal
    import time

    assert JEMALLOC.is_file(), "libjemalloc2 is missing (apt-get install libjemalloc2)"
    rows = corpus_rows("long.jsonl", 40)
    for r in rows:
        redis_client.xadd(settings.stream, {"id": r["id"], "text": r["text"]})
    worker = subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", "worker", "--block-ms", "100"],
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LD_PRELOAD": str(JEMALLOC),
            "EMBEDQ_REDIS_URL": REDIS_URL,
            "EMBEDQ_STREAM": settings.stream,
            "EMBEDQ_GROUP": "g",
            "EMBEDQ_MILVUS_URI": settings.milvus_uri,
            "EMBEDQ_COLLECTION": "vectors",
            "EMBEDQ_LOG_JSON": "1",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # every entry read and acked
            groups = redis_client.xinfo_groups(settings.stream)
            if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
                break
            assert worker.poll() is None, worker.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the worker did not drain the stream"
            time.sleep(0.2)
        maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "libjemalloc" in maps  # the allocator really is jemalloc
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        events = {
            e["event"]: e
            for e in (json.loads(x) for x in worker.communicate()[1].splitlines() if x[:1] == "{")
        }
    finally:
        worker.kill()
        worker.wait()
    # The CPU default: two model replicas sharing torch's threads (docs/benchmarks.md).
    import torch

    if torch.get_num_threads() >= 2:
        assert events["worker_started"]["replicas"] == 2
        assert events["cpu_threads_shared"]["threads_each"] == torch.get_num_threads() // 2
    sink = open_sink(settings.replace(collection="vectors"))
    try:
        assert sink.count() == 40
    finally:
        sink.close()
