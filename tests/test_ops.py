"""Fleet operations: stream gauges, /metrics /healthz /readyz, `embedq exporter`, `embedq top`.

Everything runs against real Redis. A real worker's metrics and probes, scraped by a real
Prometheus with Redis frozen under it, are in test_monitoring.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from embedq.core.config import Settings
from embedq.ops.exporter import StreamCollector, StreamSampler, serve_exporter
from embedq.ops.top import Sample, Window, rates, render
from embedq.queue.lag import ConsumerInfo, LagInfo
from embedq.queue.stream import Stream
from embedq.worker.health import HealthServer, reachable

from .conftest import REDIS_URL
from .support.servers import free_port, http_get, wait_for
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


def exporter_settings(stream: str, url: str = REDIS_URL) -> Settings:
    # metrics_port 0: the server binds a free port (HealthServer.port says which).
    return Settings(redis_url=url, stream=stream, group="g", metrics_port=0, log_json=True)


def test_the_exporter_serves_the_stream_gauges_from_its_background_sample(
    redis_client: redis.Redis, stream_name: str
) -> None:
    server, sampler = serve_exporter(exporter_settings(stream_name))
    base = f"http://127.0.0.1:{server.port}"
    labels = {"stream": stream_name, "group": "g"}
    try:
        wait_for(lambda: value(http_get(base + "/metrics")[1], "embedq_stream_up") == 1, 10, "up")
        body = http_get(base + "/metrics")[1]
        assert value(body, "embedq_stream_group_exists", **labels) == 0
        assert value(body, "embedq_stream_lag", **labels) is None
        assert value(body, "embedq_stream_backlog", **labels) == 0  # the length: 0

        fill(redis_client, stream_name, 10)
        redis_client.xgroup_create(stream_name, "g", id="0")
        redis_client.xreadgroup("g", "w1", {stream_name: ">"}, count=4)
        redis_client.xadd(stream_name + ":dlq", {"_dlq_reason": "missing_id"})
        redis_client.xgroup_createconsumer(stream_name, "g", "idle-worker")

        def sampled() -> bool:
            return value(http_get(base + "/metrics")[1], "embedq_stream_pending", **labels) == 4

        wait_for(sampled, 10, "the next sample")
        body = http_get(base + "/metrics")[1]
        assert value(body, "embedq_stream_length", stream=stream_name) == 10
        assert value(body, "embedq_stream_dlq_length", stream=stream_name) == 1
        assert value(body, "embedq_stream_lag", **labels) == 6
        assert value(body, "embedq_stream_lag_unknown", **labels) == 0
        assert value(body, "embedq_stream_backlog", **labels) == 10
        assert value(body, "embedq_stream_consumers", **labels) == 2
        # Only consumers holding entries get a series of their own (issue 12 item 8).
        assert value(body, "embedq_stream_consumer_pending", **labels, consumer="w1") == 4
        assert "idle-worker" not in body and "consumer_idle" not in body
        assert 0 <= value(body, "embedq_stream_oldest_waiting_age_seconds", **labels) < 60
        assert 0 <= value(body, "embedq_stream_oldest_pending_age_seconds", **labels) < 60
        assert value(body, "embedq_stream_sample_age_seconds") < 5
        assert 'embedq_build_info{python="' in body and "process_resident_memory_bytes" in body
        assert "_created" not in body

        status, ready = http_get(base + "/readyz")
        assert status == 200 and json.loads(ready) == {"ready": True, "checks": {"redis": "ok"}}
        assert http_get(base + "/healthz")[0] == 200
    finally:
        server.close()
        sampler.stop()


def test_unknown_lag_is_absent_not_zero_and_the_backlog_is_counted(
    redis_client: redis.Redis, stream_name: str
) -> None:
    ids = fill(redis_client, stream_name, 8)
    redis_client.xgroup_create(stream_name, "g", id="0")
    redis_client.xreadgroup("g", "w1", {stream_name: ">"}, count=2)
    redis_client.xdel(stream_name, ids[5])  # between the group's position and the tail
    sampler = StreamSampler([Stream(redis_client, stream_name, "g", "c")])
    sampler.refresh()
    registry = CollectorRegistry()
    registry.register(StreamCollector(sampler))
    labels = {"stream": stream_name, "group": "g"}
    assert registry.get_sample_value("embedq_stream_up") == 1
    assert registry.get_sample_value("embedq_stream_pending", labels) == 2
    assert registry.get_sample_value("embedq_stream_lag", labels) is None
    assert registry.get_sample_value("embedq_stream_lag_unknown", labels) == 1
    # 5 entries wait (the sixth was deleted) and 2 are pending: not the length (7), not 0.
    assert registry.get_sample_value("embedq_stream_backlog", labels) == 5 + 2
    assert registry.get_sample_value("embedq_stream_length", {"stream": stream_name}) == 7


def test_a_frozen_or_dead_redis_reads_as_down_without_blocking_a_scrape() -> None:
    dead = exporter_settings("s", url=f"redis://127.0.0.1:{free_port()}/0")
    server, sampler = serve_exporter(dead)
    base = f"http://127.0.0.1:{server.port}"
    try:
        wait_for(lambda: http_get(base + "/readyz")[0] == 503, 10, "/readyz 503")
        status, body = http_get(base + "/metrics")
        assert status == 200
        assert value(body, "embedq_stream_up") == 0
        assert "embedq_stream_length" not in body
        checks = json.loads(http_get(base + "/readyz")[1])["checks"]
        assert checks["redis"].startswith("QueueUnavailable")
        assert http_get(base + "/healthz")[0] == 200  # alive: not a reason to restart
    finally:
        server.close()
        sampler.stop()


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
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 30, "exporter")
        body = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        assert value(body, "embedq_stream_length", stream=stream_name) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    missing = embedq("exporter", env={"EMBEDQ_REDIS_URL": REDIS_URL})
    assert missing.returncode == 2 and "--metrics-port" in missing.stderr


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
        "import embedq.worker.health, embedq.ops.top  # exporter and top run there too\n"
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


def test_throughput_is_known_when_redis_does_not_count_reads_but_the_backlog_is() -> None:
    """``embedq top`` showed "throughput unknown" next to a backlog falling at 64/s."""
    window = Window(60)
    window.add(lag_info(lag=2000, pending=100, entries_read=None, length=3000), at_s=0)
    r = window.add(lag_info(lag=1400, pending=60, entries_read=None, length=3000), at_s=10)
    assert r.done_per_s == 64.0 and r.backlog_change_per_s == -64.0
    assert "throughput   64.0/s" in render(lag_info(lag=1400, pending=60, entries_read=None), r)
