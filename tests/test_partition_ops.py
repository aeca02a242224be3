"""Operating a partitioned deployment (``EMBEDQ_PARTITIONS=4``) with the same commands as
one stream: init creates every group, dead letters of every partition are listed, shown,
retried and purged under unambiguous names, and the exporter and top cover every partition.

Real Redis, a real Milvus Lite file and the real model; every command runs as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from embedq.core.errors import ConfigError
from embedq.core.keys import partition_for, partition_streams
from embedq.queue.dlq import iter_dead_letters, locate, purge, retry, show
from embedq.queue.stream import Stream

from .conftest import REDIS_URL, corpus_rows
from .support.servers import free_port, http_get, wait_for
from .test_cli import embedq
from .test_ops import samples_of, value


def env_for(stream: str, tmp_path: Path) -> dict[str, str]:
    return {
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": stream,
        "EMBEDQ_GROUP": "g",
        "EMBEDQ_PARTITIONS": "4",
        "EMBEDQ_MILVUS_URI": str(tmp_path / "milvus.db"),
        "EMBEDQ_COLLECTION": "vectors",
        "EMBEDQ_BLOCK_MS": "100",
        "EMBEDQ_LOG_JSON": "1",
    }


def lines(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_a_partitioned_deployment_is_operated_like_one_stream(
    tmp_path: Path, redis_client: redis.Redis, stream_name: str
) -> None:
    env = env_for(stream_name, tmp_path)
    streams = partition_streams(stream_name, 4)

    init = embedq("init", env=env)
    assert init.returncode == 0, init.stderr
    for name in streams:  # the group on every partition, at 0, before anything is enqueued
        (group,) = redis_client.xinfo_groups(name)
        assert (group["name"], group["last-delivered-id"]) == (b"g", b"0-0")

    good = [
        {"id": f"ok-{i}", "text": r["text"]} for i, r in enumerate(corpus_rows("short.jsonl", 40))
    ]
    # Blank texts are dead-lettered; ids chosen so that they land on several partitions.
    blank = [f"blank-{i}" for i in range(12)]
    assert len({partition_for(i, 4) for i in blank}) >= 3
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(json.dumps(r) for r in good + [{"id": i, "text": "   "} for i in blank]) + "\n"
    )
    sent = embedq("enqueue", str(source), env=env)
    assert sent.returncode == 0, sent.stderr
    assert redis_client.exists(stream_name) == 0  # everything went to partitions

    worker = embedq("worker", "--drain", env=env)
    assert worker.returncode == 0, worker.stderr

    listed = lines(embedq("dlq", "list", "--json", env=env).stdout)
    assert sorted(d["id"] for d in listed) == sorted(blank)
    for letter in listed:
        # Named <partition>/<id>: the partition the id hashes to, and its own stream.
        part = partition_for(str(letter["id"]), 4)
        assert str(letter["dlq_id"]).startswith(f"{part}/")
        assert letter["stream"] == streams[part]
        assert letter["reason"] == "empty_text"
    order = [str(d["dlq_id"]).split("/")[1] for d in listed]
    assert order == sorted(order, key=lambda i: tuple(map(int, i.split("-"))))  # oldest first
    table = embedq("dlq", "list", env=env).stdout
    assert "12 shown, 12 in 4 partition dead-letter streams" in table

    first = listed[0]
    shown = embedq("dlq", "show", str(first["dlq_id"]), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == first["id"]

    before = redis_client.xlen(str(first["stream"]))
    retried = embedq("dlq", "retry", str(first["dlq_id"]), env=env)
    assert retried.returncode == 0, retried.stderr
    assert f"-> {first['stream']} " in retried.stdout  # back on its own partition
    assert redis_client.xlen(str(first["stream"])) == before + 1

    lag = json.loads(embedq("lag", "--json", env=env).stdout)
    assert (lag["lag"], lag["dlq_length"]) == (1, 11)
    top = lines(embedq("top", "--json", "--iterations", "1", env=env).stdout)
    assert (top[0]["lag"], top[0]["dlq_length"], top[0]["length"]) == (1, 11, 53)

    purged = embedq("dlq", "purge", "--all", env=env)
    assert purged.returncode == 0 and "purged 11" in purged.stdout
    assert all(redis_client.xlen(name + ":dlq") == 0 for name in streams)


def test_the_exporter_reports_every_partition(
    tmp_path: Path, redis_client: redis.Redis, stream_name: str
) -> None:
    streams = partition_streams(stream_name, 4)
    for i, name in enumerate(streams):
        for n in range(i + 1):  # 1, 2, 3, 4 entries
            redis_client.xadd(name, {"id": f"{i}-{n}", "text": "t"})
        redis_client.xgroup_create(name, "g", id="0")
    redis_client.xreadgroup("g", "w1", {streams[3]: ">"}, count=3)
    port = free_port()
    env = {**os.environ, **env_for(stream_name, tmp_path), "EMBEDQ_METRICS_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", "exporter"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(base + "/healthz")[0] == 200, 30, "exporter")
        # The exporter samples Redis in the background: wait for its first fresh sample.
        seen: list[str] = []

        def fresh() -> bool:
            # The very scrape that shows a fresh sample (on a busy machine the next one may
            # already report it stale).
            seen[:] = [http_get(base + "/metrics")[1]]
            # A sample, not a substring: the HELP line reads "embedq_stream_up 1 when ...".
            return value(seen[0], "embedq_stream_up") == 1

        wait_for(fresh, 30, "a fresh sample")
        body = seen[0]
        for i, name in enumerate(streams):
            assert value(body, "embedq_stream_length", stream=name) == i + 1
        lags = {
            labels: v
            for (metric, labels), v in samples_of(body).items()
            if metric == "embedq_stream_lag"
        }
        assert len(lags) == 4 and sum(lags.values()) == 10 - 3  # sum by (group) = the backlog
        pending = value(
            body, "embedq_stream_consumer_pending", stream=streams[3], group="g", consumer="w1"
        )
        assert pending == 3

        # One partition whose lag Redis cannot count: no lag series at all, not a low sum.
        # (a last-delivered id in the middle of a stream, given without ENTRIESREAD)
        redis_client.xgroup_setid(streams[2], "g", id=redis_client.xrange(streams[2])[1][0])
        wait_for(  # the next background sample (every second) sees it
            lambda: "embedq_stream_lag{" not in http_get(base + "/metrics")[1], 30, "no lag"
        )
        body = http_get(base + "/metrics")[1]
        assert value(body, "embedq_stream_pending", stream=streams[3], group="g") == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_bare_dead_letter_id_in_two_partitions_must_be_named_with_its_partition(
    redis_client: redis.Redis, stream_name: str
) -> None:
    lanes = [Stream(redis_client, s, "g", "-").dlq for s in partition_streams(stream_name, 4)]
    # Two partitions dead-lettering in the same millisecond get the same entry id.
    for lane, doc in ((1, "a"), (3, "b")):
        redis_client.xadd(
            lanes[lane].keys.dlq,
            {"id": doc, "text": "x", "_dlq_reason": "empty_text"},
            id="1700000000000-0",
        )
    with pytest.raises(ConfigError, match=r"partitions \[1, 3\].*1/1700000000000-0"):
        locate(lanes, ["1700000000000-0"])
    letter = show(lanes, "3/1700000000000-0")
    assert letter is not None and letter.doc_id == "b" and letter.ref == "3/1700000000000-0"
    assert show(lanes, "2/1700000000000-0") is None
    with pytest.raises(ConfigError, match=r"not one of 0\.\.3"):
        locate(lanes, ["7/1700000000000-0"])

    assert purge(lanes, ["1/1700000000000-0"]) == 1  # only that one
    assert [d.ref for d in iter_dead_letters(lanes)] == ["3/1700000000000-0"]
    sent = retry(lanes, ["1700000000000-0"])  # unambiguous now
    assert list(sent) == ["1700000000000-0"] and sent["1700000000000-0"][0] == lanes[3].keys.stream
    assert redis_client.xrange(lanes[3].keys.stream)[0][1][b"id"] == b"b"
