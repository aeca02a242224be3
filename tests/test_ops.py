"""Fleet operations: stream gauges, /metrics /healthz /readyz, `embedq exporter`, `embedq top`.

Everything runs against real Redis; the worker test starts `embedq worker --metrics-port` as
a subprocess on a private redis-server it later stops, and a real Milvus Lite file.
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
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from embedq.bench.servers import RedisServer, free_port
from embedq.health import HealthServer, reachable, serve_stream_metrics
from embedq.lag import ConsumerInfo, LagInfo
from embedq.metrics import StreamCollector
from embedq.redis_connection import connect
from embedq.stream import Stream
from embedq.top import Sample, Window, rates, render

from .conftest import REDIS_URL, corpus_rows
from .servers import http_get, wait_for
from .test_cli import embedq


def samples_of(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics_text: str, name: str, **labels: str) -> float | None:
    return samples_of(metrics_text).get((name, tuple(sorted(labels.items()))))


def lag_info(
    *, lag: int | None, pending: int, entries_read: int | None, length: int = 1000
) -> LagInfo:
    return LagInfo(
        stream="s",
        group="g",
        length=length,
        lag=lag,
        pending=pending,
        last_delivered_id=None,
        entries_read=entries_read,
        consumers=[ConsumerInfo("w0", pending, 10)],
        dlq_length=0,
        group_exists=True,
    )


# -- top: rates and ETA (pure) ---------------------------------------------------------


def test_progress_measures_throughput_and_eta_while_draining() -> None:
    # 600 entries left; the fleet acks 20/s and nothing new arrives.
    samples = [
        Sample(t, lag_info(lag=500 - 20 * t, pending=100, entries_read=500 + 20 * t))
        for t in range(0, 11)
    ]
    p = rates(samples)
    assert p.window_s == 10
    assert p.done_per_s == pytest.approx(20.0)
    assert p.backlog == 400  # lag 300 + pending 100 at t=10
    assert p.backlog_change_per_s == pytest.approx(-20.0)
    assert p.eta_s == pytest.approx(20.0)
    assert "eta          20s to drain" in render(samples[-1].info, p)


def test_progress_has_no_eta_when_producers_outpace_the_fleet() -> None:
    # Acking 10/s while the backlog grows by 5/s: throughput is real, the ETA is not.
    samples = [
        Sample(t, lag_info(lag=100 + 5 * t, pending=50, entries_read=1000 + 10 * t))
        for t in range(0, 6)
    ]
    p = rates(samples)
    assert p.done_per_s == pytest.approx(10.0)
    assert p.backlog_change_per_s == pytest.approx(5.0)
    assert p.eta_s is None
    assert "not shrinking" in render(samples[-1].info, p)


def test_progress_never_turns_unknown_lag_into_zero() -> None:
    samples = [Sample(t, lag_info(lag=None, pending=7, entries_read=None)) for t in (0, 5)]
    p = rates(samples)
    assert (p.backlog, p.eta_s, p.done_per_s) == (None, None, None)
    shown = render(samples[-1].info, p)
    assert "unknown" in shown and "eta          0s" not in shown


def test_progress_drops_samples_older_than_the_window_and_restarts_after_a_reset() -> None:
    window = Window(window_s=60)
    window.add(lag_info(lag=1000, pending=0, entries_read=0), at_s=0)
    window.add(lag_info(lag=900, pending=0, entries_read=100), at_s=50)
    p = window.add(lag_info(lag=800, pending=0, entries_read=200), at_s=100)
    assert len(window.samples) == 2  # the t=0 sample left the 60 s window
    assert p.window_s == 50 and p.done_per_s == pytest.approx(2.0)
    # The group was deleted and recreated: entries_read went back; rates restart there.
    p = window.add(lag_info(lag=800, pending=0, entries_read=3), at_s=110)
    assert p.window_s == 0 and p.done_per_s is None
    p = window.add(lag_info(lag=790, pending=0, entries_read=13), at_s=115)
    assert p.window_s == 5 and p.done_per_s == pytest.approx(2.0)


def test_progress_of_an_empty_backlog_is_drained() -> None:
    samples = [Sample(t, lag_info(lag=0, pending=0, entries_read=50)) for t in (0, 2)]
    assert rates(samples).eta_s == 0


# -- stream gauges and probes against real Redis ----------------------------------------


def fill(client: redis.Redis, stream: str, n: int) -> list[bytes]:
    return [client.xadd(stream, {"id": f"d{i}", "text": f"text {i}"}) for i in range(n)]


def test_stream_gauges_read_redis_on_every_scrape(
    redis_client: redis.Redis, stream_name: str
) -> None:
    server = serve_stream_metrics(
        CollectorRegistry(), 0, [Stream(connect(REDIS_URL), stream_name, "g", "c")]
    )
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = http_get(base + "/metrics")
        assert status == 200
        assert value(body, "embedq_stream_up") == 1
        assert value(body, "embedq_stream_group_exists", stream=stream_name, group="g") == 0
        assert value(body, "embedq_stream_lag", stream=stream_name, group="g") is None

        fill(redis_client, stream_name, 10)
        redis_client.xgroup_create(stream_name, "g", id="0")
        redis_client.xreadgroup("g", "w1", {stream_name: ">"}, count=4)
        redis_client.xadd(stream_name + ":dlq", {"_dlq_reason": "missing_id"})
        body = http_get(base + "/metrics")[1]
        labels = {"stream": stream_name, "group": "g"}
        assert value(body, "embedq_stream_length", stream=stream_name) == 10
        assert value(body, "embedq_stream_dlq_length", stream=stream_name) == 1
        assert value(body, "embedq_stream_lag", **labels) == 6
        assert value(body, "embedq_stream_pending", **labels) == 4
        assert value(body, "embedq_stream_consumers", **labels) == 1
        assert value(body, "embedq_stream_consumer_pending", **labels, consumer="w1") == 4
        assert value(body, "embedq_stream_consumer_idle_seconds", **labels, consumer="w1") >= 0

        status, ready = http_get(base + "/readyz")
        assert status == 200 and json.loads(ready) == {"ready": True, "checks": {"redis": "ok"}}
    finally:
        server.close()


def test_unknown_lag_is_absent_not_zero(redis_client: redis.Redis, stream_name: str) -> None:
    ids = fill(redis_client, stream_name, 3)
    redis_client.xgroup_create(stream_name, "g", id=ids[1])  # Redis cannot count this lag
    registry = CollectorRegistry()
    registry.register(StreamCollector([Stream(redis_client, stream_name, "g", "c")]))
    assert registry.get_sample_value("embedq_stream_up") == 1
    assert (
        registry.get_sample_value("embedq_stream_pending", {"stream": stream_name, "group": "g"})
        == 0
    )
    assert (
        registry.get_sample_value("embedq_stream_lag", {"stream": stream_name, "group": "g"})
        is None
    )


def test_a_scrape_with_redis_down_reports_up_0_and_readyz_503() -> None:
    dead = Stream(connect(f"redis://127.0.0.1:{free_port()}/0"), "s", "g", "c")
    server = serve_stream_metrics(CollectorRegistry(), 0, [dead])
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, body = http_get(base + "/metrics")
        assert status == 200
        assert value(body, "embedq_stream_up") == 0
        assert "embedq_stream_length" not in body
        status, ready = http_get(base + "/readyz")
        assert status == 503
        assert json.loads(ready)["checks"]["redis"].startswith("QueueUnavailable")
        assert http_get(base + "/healthz")[0] == 200  # alive: not a reason to restart
    finally:
        server.close()


def test_readyz_names_each_failed_check_and_survives_a_raising_one() -> None:
    server = HealthServer(CollectorRegistry(), 0)
    base = f"http://127.0.0.1:{server.port}"
    loaded = False

    def broken() -> None:
        raise RuntimeError("stage thread died")

    try:
        assert http_get(base + "/readyz")[0] == 503  # no checks yet: not ready
        server.require("worker", lambda: loaded)
        server.require("milvus", reachable(lambda: None))
        status, body = http_get(base + "/readyz")
        assert status == 503 and json.loads(body)["checks"] == {
            "worker": "not ready",
            "milvus": "ok",
        }
        loaded = True
        assert http_get(base + "/readyz")[0] == 200
        server.require("encoder", reachable(broken))
        status, body = http_get(base + "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["encoder"] == "RuntimeError: stage thread died"
        assert http_get(base + "/nope")[0] == 404
    finally:
        server.close()


# -- commands --------------------------------------------------------------------------


def test_top_prints_lag_pending_consumers_and_rates(
    redis_client: redis.Redis, stream_name: str
) -> None:
    fill(redis_client, stream_name, 12)
    redis_client.xgroup_create(stream_name, "g", id="0")
    redis_client.xreadgroup("g", "worker-a", {stream_name: ">"}, count=5)
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name, "EMBEDQ_GROUP": "g"}

    raw = embedq("top", "--json", "--iterations", "2", "--interval", "0.2", env=env)
    assert raw.returncode == 0, raw.stderr
    frames = [json.loads(line) for line in raw.stdout.splitlines()]
    assert len(frames) == 2
    assert (frames[1]["lag"], frames[1]["pending"], frames[1]["backlog"]) == (7, 5, 12)
    assert frames[0]["window_s"] == 0 and frames[1]["window_s"] > 0
    assert frames[1]["done_per_s"] == 0 and frames[1]["eta_s"] is None  # nobody is acking

    human = embedq("top", "--iterations", "1", env=env)
    assert human.returncode == 0, human.stderr
    assert "lag          7" in human.stdout and "pending      5" in human.stdout
    assert "worker-a" in human.stdout and "\x1b[" not in human.stdout  # no escapes in a pipe


def test_exporter_serves_until_sigterm(redis_client: redis.Redis, stream_name: str) -> None:
    fill(redis_client, stream_name, 3)
    port = free_port()
    env = {**os.environ, "EMBEDQ_STREAM": stream_name, "EMBEDQ_REDIS_URL": REDIS_URL}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", "exporter", "--metrics-port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 30, "exporter")
        body = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert value(body, "embedq_stream_length", stream=stream_name) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    missing = embedq("exporter", env={"EMBEDQ_REDIS_URL": REDIS_URL})
    assert missing.returncode == 2 and "--metrics-port" in missing.stderr


@pytest.mark.slow
def test_worker_serves_metrics_and_probes_and_readyz_follows_redis(tmp_path: Path) -> None:
    """`embedq worker --metrics-port` on a private Redis that is stopped mid-test."""
    private = RedisServer(tmp_path / "redis").start()
    rows = corpus_rows("short.jsonl", 40)
    pipe = private.client().pipeline()
    for row in rows:
        pipe.xadd("tasks", {"id": row["id"], "text": row["text"]})
    pipe.execute()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBEDQ_REDIS_URL": private.url,
        "EMBEDQ_STREAM": "tasks",
        "EMBEDQ_MILVUS_URI": str(tmp_path / "m.db"),
        "EMBEDQ_METRICS_PORT": str(port),
        "EMBEDQ_LOG_JSON": "true",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", "worker", "--block-ms", "200", "--grace", "3"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:

        def answers(path: str, status: int) -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            return http_get(base + path)[0] == status

        wait_for(lambda: answers("/healthz", 200), 60, "the worker's /healthz")
        wait_for(lambda: answers("/readyz", 200), 120, "the worker's /readyz")
        status, ready = http_get(base + "/readyz")
        assert json.loads(ready)["checks"] == {"redis": "ok", "worker": "ok", "milvus": "ok"}

        def drained() -> bool:
            body = http_get(base + "/metrics")[1]
            labels = {"stream": "tasks", "group": "embedq"}
            return (
                value(body, "embedq_stream_lag", **labels) == 0
                and value(body, "embedq_stream_pending", **labels) == 0
            )

        wait_for(drained, 120, "the worker to drain the stream (seen in /metrics)")
        body = http_get(base + "/metrics")[1]
        info = {(k[1]): v for k, v in samples_of(body).items() if k[0] == "embedq_model_info"}
        (labels,) = info
        assert dict(labels)["device"] == "cpu" and dict(labels)["dimension"] == "384"
        assert "all-MiniLM-L6-v2" in dict(labels)["model"]
        for stage in ("read", "tokenize", "inference", "write", "ack"):
            assert f'embedq_stage_duration_seconds_count{{stage="{stage}"}}' in body
        consumers = value(body, "embedq_stream_consumers", stream="tasks", group="embedq")
        assert consumers == 1
        # The worker's own counters, wired into its pipeline stages.
        assert value(body, "embedq_texts_total") == 40
        assert value(body, "embedq_batches_total") >= 1
        assert value(body, "embedq_tokens_total") > 40
        assert value(body, "embedq_in_flight_entries") == 0
        assert value(body, "embedq_stage_duration_seconds_count", stage="inference") >= 1

        private.stop()  # Redis goes away: not ready, but alive, and /metrics still answers
        wait_for(lambda: http_get(base + "/readyz")[0] == 503, 30, "/readyz to turn 503")
        checks = json.loads(http_get(base + "/readyz")[1])["checks"]
        assert checks["redis"].startswith("QueueUnavailable") and checks["milvus"] == "ok"
        assert http_get(base + "/healthz")[0] == 200
        status, body = http_get(base + "/metrics")
        assert status == 200 and value(body, "embedq_stream_up") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        private.stop()
    lines = log_path.read_text().splitlines()
    events = [json.loads(x)["event"] for x in lines if x.startswith("{")]
    assert "metrics_serving" in events and "not_ready" in events


def test_init_creates_the_group_at_0_without_model_side_packages(
    redis_client: redis.Redis, stream_name: str
) -> None:
    """What the Helm hook Job and the compose init run, in the small producer image (no
    torch, pymilvus or numpy: blocked here to prove the commands never import them)."""
    fill(redis_client, stream_name, 5)  # producers were faster than the first deploy
    blocked = ["torch", "pymilvus", "numpy", "transformers", "tokenizers", "milvus_lite"]
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import embedq.health, embedq.top  # exporter and top run there too\n"
        "from embedq.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name}

    def init() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, "init"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    first = init()
    assert first.returncode == 0, first.stderr
    assert "created at 0" in first.stdout
    (group,) = redis_client.xinfo_groups(stream_name)
    assert group["lag"] == 5  # at 0, not at $: the five early entries will be read
    again = init()
    assert again.returncode == 0 and "already there" in again.stdout
