"""The operator's view checked against a real Prometheus (issue 17).

A private Redis, a real `embedq worker` (the packaged model, a Milvus Lite file) and a real
`embedq exporter`, scraped every second by Debian's `prometheus`, which also evaluates the
chart's alert rules. Every expression of the shipped Grafana dashboard is run through
Prometheus's HTTP API during and after a drain, and the backlog, throughput and ETA panels
are compared with `embedq lag --json` and the drain's own timing: with the lag known, with
it unknown (an XDEL ahead of the group) and after a dead letter. Then Redis is frozen
(SIGSTOP): /metrics must answer within a second, the stream gauges say down, and no log
line is anything but JSON. The alert rules are also unit-tested with `promtool test rules`
(the Prometheus rule engine) on series that a healthy and a broken fleet produce.

The fleet fixture is shared by the tests of this module (one model load, ~12 s here).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from embedq.queue.lag import lag_json
from embedq.queue.stream import Stream

from .conftest import corpus_rows
from .support.prometheus import (
    RULES,
    Prometheus,
    binary,
    dashboard_panels,
    grafana_to_promql,
    shown,
)
from .support.servers import RedisServer, free_port, http_get, wait_for
from .test_cli import embedq

STREAM, GROUP = "tasks", "embedq"
# Entries: long enough a drain to sample rates once the 5 s window lies inside it. 1,500
# drained in 6 s on a quiet machine (too short); 3,000 takes 12-30 s here.
DRAIN = 3000
SG = f'stream=~"{STREAM}(:[{{]p[0-9]+[}}])?", group="{GROUP}"'


@dataclass
class Fleet:
    redis: RedisServer
    client: redis.Redis
    worker: subprocess.Popen[bytes]
    exporter: subprocess.Popen[bytes]
    prometheus: Prometheus
    worker_url: str
    exporter_url: str
    logs: dict[str, Path]
    env: dict[str, str]

    @property
    def stream(self) -> Stream:
        return Stream(self.client, STREAM, GROUP, "monitor")

    def panel(self, title: str, index: int = 0) -> float | None:
        expr = dashboard_panels()[title][index]
        return self.prometheus.value(grafana_to_promql(expr, STREAM, GROUP))

    def lag_json(self) -> dict[str, Any]:
        done = embedq("lag", "--json", env=self.env)
        assert done.returncode == 0, done.stderr
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def settled(self, what: str, condition: Any, timeout_s: float = 15) -> None:
        """Wait until the exporter sampled and Prometheus scraped a state (both every 1 s)."""
        wait_for(condition, timeout_s, what)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    binary("prometheus")
    tmp = tmp_path_factory.mktemp("monitoring")
    server = RedisServer(tmp / "redis").start()
    client = server.client()
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)  # what `embedq init` does
    worker_port, exporter_port = free_port(), free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "EMBEDQ_REDIS_URL": server.url,
        "EMBEDQ_STREAM": STREAM,
        "EMBEDQ_GROUP": GROUP,
        "EMBEDQ_MILVUS_URI": str(tmp / "m.db"),
        "EMBEDQ_LOG_JSON": "true",
        "EMBEDQ_METRICS_HOST": "127.0.0.1",
    }
    logs = {"worker": tmp / "worker.log", "exporter": tmp / "exporter.log"}
    worker = start(
        ["worker", "--block-ms", "200", "--grace", "3", "--metrics-port", str(worker_port)],
        env,
        logs["worker"],
    )
    exporter = start(["exporter", "--metrics-port", str(exporter_port)], env, logs["exporter"])
    prometheus = Prometheus(
        tmp / "prometheus",
        {"worker": f"127.0.0.1:{worker_port}", "exporter": f"127.0.0.1:{exporter_port}"},
    ).start()
    fleet = Fleet(
        server,
        client,
        worker,
        exporter,
        prometheus,
        f"http://127.0.0.1:{worker_port}",
        f"http://127.0.0.1:{exporter_port}",
        logs,
        env,
    )
    try:

        def ready() -> bool:
            assert worker.poll() is None, logs["worker"].read_text()[-3000:]
            return http_get(fleet.worker_url + "/readyz")[0] == 200

        wait_for(ready, 120, "the worker's /readyz")
        yield fleet
    finally:
        for proc in (server.proc, worker, exporter):  # a failed test may have left one frozen
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        for proc in (worker, exporter):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, exporter):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        prometheus.stop()
        server.stop()


def enqueue(client: redis.Redis, rows: list[dict[str, Any]]) -> list[str]:
    pipe = client.pipeline()
    for row in rows:
        fields = {"id": row["id"]} if row.get("text") is None else row
        pipe.xadd(STREAM, {k: v for k, v in fields.items() if k in ("id", "text")})
    return [i.decode() for i in pipe.execute()]


def waiting_count(client: redis.Redis) -> int:
    """The truth the backlog must show: entries after the group's position, plus pending."""
    (group,) = client.xinfo_groups(STREAM)
    after = group["last-delivered-id"].decode()
    return len(client.xrange(STREAM, min=f"({after}", max="+")) + int(group["pending"])


def test_dashboard_panels_agree_with_embedq_lag_through_a_drain(fleet: Fleet) -> None:
    p = fleet.prometheus
    # A warm-up the worker processes: it leaves acked entries in the stream (no trimming),
    # so the stream's length is not the backlog afterwards.
    enqueue(fleet.client, corpus_rows("short.jsonl", 50))
    fleet.settled(
        "the warm-up",
        lambda: fleet.panel("Backlog") == 0 and p.value(f"sum(embedq_texts_total{{{SG}}})") == 50,
    )
    assert shown("ETA to drain", fleet.panel("ETA to drain")) == "drained"
    assert shown("Lag", fleet.panel("Lag")) == "0"

    # The worker frozen: a stable backlog to compare with `embedq lag --json`, with the lag
    # unknown (an entry deleted ahead of the group) and a text-less entry in it.
    os.kill(fleet.worker.pid, signal.SIGSTOP)
    try:
        rows = corpus_rows("short.jsonl", 50 + DRAIN)[50:]
        rows[100] = {"id": "no-text"}  # dead-lettered as missing_text
        ids = enqueue(fleet.client, rows)
        fleet.client.xdel(STREAM, ids[DRAIN - 300])
        # (A read the worker sent before it froze may have been served: some are pending.)
        truth = DRAIN - 1
        fleet.settled(
            "the exporter and Prometheus to see the backlog",
            lambda: fleet.panel("Backlog") == truth,
        )
        frozen = fleet.lag_json()
        assert waiting_count(fleet.client) == truth
        assert frozen["lag"] is None and frozen["pending"] <= truth
        assert frozen["length"] == 50 + truth  # the length alone would overstate it
        assert shown("Lag", fleet.panel("Lag")) == "unknown"  # not empty, not 0
        assert fleet.panel("Backlog", 0) == truth
        resumed_at = time.monotonic()
    finally:
        os.kill(fleet.worker.pid, signal.SIGCONT)

    samples = sample_the_drain(fleet)
    drained_at = time.monotonic()
    check_the_drain(samples, resumed_at, drained_at, total=truth)

    # After the drain: backlog 0 as `lag` says, ETA "drained" (not NaN), the dead letter
    # counted from its first occurrence (its series started at 0).
    fleet.settled("the drained state", lambda: fleet.panel("Backlog") == 0)
    after = fleet.lag_json()
    assert (after["lag"], after["pending"], after["dlq_length"]) == (0, 0, 1)
    assert shown("ETA to drain", fleet.panel("ETA to drain")) == "drained"
    assert fleet.panel("Dead letters") == after["dlq_length"]
    first = p.value(f'sum(increase(embedq_dead_lettered_total{{{SG}, reason="missing_text"}}[1m]))')
    assert first is not None and first >= 0.9  # Prometheus extrapolates a little
    assert p.value(f'sum(embedq_errors_total{{{SG}, kind="redis"}})') == 0  # present at 0
    assert p.value(f"sum(embedq_texts_total{{{SG}}})") == 50 + truth - 1
    time.sleep(6)  # past the rate window: nothing is being processed any more
    assert fleet.panel("Throughput") == 0
    assert shown("ETA to drain", fleet.panel("ETA to drain")) == "drained"

    check_the_workers_own_metrics(p, acked=50 + truth - 1)
    run_every_dashboard_expression(fleet)
    check_the_alerts(p)


def check_the_workers_own_metrics(p: Prometheus, acked: int) -> None:
    """What item 9 of issue 17 found missing, as Prometheus scraped it from the worker."""
    (model,) = p.query(f"embedq_model_info{{{SG}}}")
    assert model["metric"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (model["metric"]["device"], model["metric"]["dimension"]) == ("cpu", "384")
    assert p.value(f"sum(embedq_model_replicas{{{SG}}})") >= 1  # type: ignore[operator]
    observed = p.value(f"sum(embedq_enqueue_to_ack_seconds_count{{{SG}}})")
    assert observed == acked  # one observation per acked entry
    last_ack = p.value(f"max(embedq_last_ack_timestamp_seconds{{{SG}}})")
    assert last_ack is not None and time.time() - last_ack < 120
    for positive in (
        f'sum(embedq_stage_duration_seconds_count{{{SG}, stage="inference"}})',
        f"sum(embedq_batch_size_count{{{SG}}})",
        f"sum(embedq_batch_tokens_sum{{{SG}}})",
        f"sum(embedq_model_busy_seconds_total{{{SG}}})",
        f"sum(embedq_read_duration_seconds_count{{{SG}}})",
        'process_resident_memory_bytes{job="worker"}',
        'process_start_time_seconds{job="exporter"}',
        'embedq_build_info{job="worker"}',
    ):
        assert (p.value(positive) or 0) > 0, positive
    assert p.value(f"sum(embedq_in_flight_entries{{{SG}}})") == 0
    assert len(p.query(f"embedq_queue_depth{{{SG}}}")) == 2  # tokenized, encoded
    assert p.query('{__name__=~".+_created"}') == []
    # Stream gauges come from the exporter only (issue 12 item 8).
    assert p.query('{__name__=~"embedq_stream_.+", job="worker"}') == []


@dataclass(frozen=True)
class Seen:
    at: float
    backlog: float | None
    throughput: float | None
    eta: float | None


def sample_the_drain(fleet: Fleet) -> list[Seen]:
    """The backlog, throughput and ETA panels once a second until `lag` says drained."""
    seen: list[Seen] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        seen.append(
            Seen(
                time.monotonic(),
                fleet.panel("Backlog"),
                fleet.panel("Throughput"),
                fleet.panel("ETA to drain"),
            )
        )
        info = lag_json(STREAM, GROUP, [fleet.stream.lag()])  # what `lag --json` prints
        if info["lag"] == 0 and info["pending"] == 0:
            return seen
        time.sleep(0.3)
    pytest.fail("the worker did not drain the stream in 90 s")


def check_the_drain(seen: list[Seen], resumed: float, drained: float, total: int) -> None:
    took = drained - resumed
    rate = total / took
    # Once the rate window ($__rate_interval, 5 s) lies inside the drain, until its end.
    middle = [s for s in seen if resumed + 5 <= s.at <= drained - 1]
    assert len(middle) >= 3, f"a drain of {took:.1f} s is too short to sample: {seen}"
    # Throughput follows the work: within a factor of 2 of the drain's own rate (a 5-minute
    # window read 10/s during a 143/s drain in issue 17).
    throughputs = [s.throughput or 0 for s in middle]
    assert rate / 2 <= statistics.median(throughputs) <= rate * 2, (rate, throughputs)
    # The ETA says about how long the drain still took.
    errors = [abs((s.eta or 0) - (drained - s.at)) for s in middle]
    allowed = [max(5.0, 0.6 * (drained - s.at)) for s in middle]
    good = sum(e <= a for e, a in zip(errors, allowed, strict=True))
    assert good >= len(middle) / 2, [(round(s.eta or -1), round(drained - s.at)) for s in middle]
    # The backlog shrinks and never reads 0 (or "drained") while entries are left.
    assert all(s.backlog and s.backlog > 0 and s.eta and s.eta > 0 for s in middle), middle


def run_every_dashboard_expression(fleet: Fleet) -> None:
    """Every panel's expressions run without error; every metric they name exists (GPU
    ones only on CUDA workers)."""
    names: set[str] = set()
    for exprs in dashboard_panels().values():
        for expr in exprs:
            fleet.prometheus.query(grafana_to_promql(expr, STREAM, GROUP))  # asserts success
            names |= _metric_names(expr)
    for name in sorted(names):
        if name.startswith("embedq_gpu_"):
            continue
        # At some point of the run: a consumer's pending series exists only while it holds any.
        exported = fleet.prometheus.query(f"count(last_over_time({name}[10m]))")
        assert exported, f"{name} is not exported"
    match = {"match[]": "embedq_stream_backlog"}
    values = fleet.prometheus.api("/api/v1/label/group/values", **match)
    assert values == [GROUP]  # the dashboard's $group variable


def _metric_names(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\b((?:embedq|process)_[a-z_]+)\b", expr))


def check_the_alerts(p: Prometheus) -> None:
    rules = p.api("/api/v1/rules")["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} == {
        "EmbedqNotDraining",
        "EmbedqRedisUnreadable",
        "EmbedqExporterMissing",
        "EmbedqDeadLettered",
        "EmbedqRedisDataLost",
    }
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    # A healthy fleet that drained and dead-lettered one bad entry: only that shows.
    assert p.alerts() == {"EmbedqDeadLettered": "firing"}


def test_a_frozen_redis_is_reported_not_waited_on(fleet: Fleet) -> None:
    p = fleet.prometheus
    assert fleet.redis.proc is not None
    os.kill(fleet.redis.proc.pid, signal.SIGSTOP)
    try:
        fleet.settled(
            "the exporter to report Redis down",
            lambda: p.value('embedq_stream_up{job="exporter"}') == 0,
        )
        for url in (fleet.worker_url, fleet.exporter_url):
            started = time.monotonic()
            status, _ = http_get(url + "/metrics")
            assert status == 200 and time.monotonic() - started < 1.0, url
        assert p.value('up{job="worker"}') == 1 and p.value('up{job="exporter"}') == 1
        assert p.value(f"sum(embedq_texts_total{{{SG}}})") is not None  # the worker's own
        fleet.settled(
            "the worker's /readyz to say 503",
            lambda: http_get(fleet.worker_url + "/readyz")[0] == 503,
        )
        checks = json.loads(http_get(fleet.worker_url + "/readyz")[1])["checks"]
        assert checks["redis"] != "ok" and checks["milvus"] == "ok", checks
        assert http_get(fleet.worker_url + "/healthz")[0] == 200
        assert shown("Redis", fleet.panel("Redis")) == "down"
        fleet.settled(
            "the alert to go pending", lambda: p.alerts().get("EmbedqRedisUnreadable") == "pending"
        )
    finally:
        os.kill(fleet.redis.proc.pid, signal.SIGCONT)
    fleet.settled("Redis to read as up again", lambda: fleet.panel("Redis") == 1, 20)
    fleet.settled(
        "the worker to be ready again", lambda: http_get(fleet.worker_url + "/readyz")[0] == 200, 20
    )
    enqueue(fleet.client, [{"id": f"late-{i}", "text": f"after the freeze {i}"} for i in range(5)])

    def caught_up() -> bool:
        info = fleet.lag_json()
        return bool(info["lag"] == 0 and info["pending"] == 0)

    fleet.settled("the worker to process what came after", caught_up)
    for name, path in fleet.logs.items():
        lines = path.read_text().splitlines()
        assert lines, name
        for line in lines:
            event = json.loads(line)  # every line is one JSON object: no bare traceback
            assert isinstance(event, dict) and "event" in event, (name, line)
    exporter_log = fleet.logs["exporter"].read_text().splitlines()
    exporter_events = [json.loads(line)["event"] for line in exporter_log]
    assert exporter_events.count("stream_sample_failed") == 1  # once per outage
    assert "stream_sample_recovered" in exporter_events


def test_alert_rules_fire_only_when_something_is_wrong(tmp_path: Path) -> None:
    """The shipped rules, evaluated by Prometheus's rule engine (`promtool test rules`) on
    the series a healthy idle fleet, a draining one, a stuck one, one scaled to zero, a
    frozen Redis and a first dead letter produce. Annotations are left out of the copy the
    tests evaluate (they are text, compared exactly by promtool)."""
    promtool = binary("promtool")
    shipped = yaml.safe_load(RULES.read_text())
    for group in shipped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(shipped))

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{inner}}}", "values": values}

    def fleet_of(stream: str, backlog: str, texts: str | None, dead: str = "0x40") -> list[Any]:
        out = [series("embedq_stream_backlog", backlog, stream=stream, group="g")]
        if texts is not None:  # None: no worker at all (KEDA at zero)
            base = stream.split(":{", maxsplit=1)[0]
            labels = {"stream": base, "group": "g", "instance": f"w-{stream}"}
            out.append(series("embedq_texts_total", texts, **labels))
            out.append(series("embedq_dead_lettered_total", dead, reason="missing_text", **labels))
        return out

    inputs = [
        *fleet_of("idle", "0x40", "100x40"),  # idle for 40 minutes: nothing is wrong
        *fleet_of("busy:{p0}", "5000-100x40", "0+200x40"),  # draining, partitioned
        *fleet_of("busy:{p1}", "4000-100x40", None),
        *fleet_of("stuck", "300x40", "50x40"),  # workers there, nothing acked
        *fleet_of("nobody", "10x40", None),  # a backlog and no worker at all
        *fleet_of("poison", "0x40", "10x40", dead="0x20 1x20"),  # one dead letter at 21m
        series("embedq_stream_up", "1x10 0x10 1x20", instance="exporter"),
        series("embedq_redis_data_lost", "0x10 1x10 0x20", instance="exporter"),
    ]
    critical = {"severity": "critical"}
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": inputs,
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": "EmbedqNotDraining",
                        "exp_alerts": [
                            {"exp_labels": {**critical, "stream": "stuck", "group": "g"}},
                            {"exp_labels": {**critical, "stream": "nobody", "group": "g"}},
                        ],
                    },
                    {"eval_time": "11m", "alertname": "EmbedqRedisUnreadable", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "EmbedqRedisUnreadable",
                        "exp_alerts": [
                            {"exp_labels": {**critical, "instance": "exporter"}},
                        ],
                    },
                    {"eval_time": "25m", "alertname": "EmbedqRedisUnreadable", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "EmbedqDeadLettered", "exp_alerts": []},
                    {
                        "eval_time": "25m",
                        "alertname": "EmbedqDeadLettered",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "stream": "poison",
                                    "group": "g",
                                    "reason": "missing_text",
                                }
                            },
                        ],
                    },
                    {"eval_time": "39m", "alertname": "EmbedqDeadLettered", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "EmbedqExporterMissing", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "EmbedqRedisDataLost", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "EmbedqRedisDataLost",
                        "exp_alerts": [
                            {"exp_labels": {**critical, "instance": "exporter"}},
                        ],
                    },
                    {"eval_time": "25m", "alertname": "EmbedqRedisDataLost", "exp_alerts": []},
                ],
            },
            {  # no exporter scraped at all
                "interval": "1m",
                "input_series": fleet_of("idle", "0x0", "1x30")[1:],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "EmbedqExporterMissing", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "EmbedqExporterMissing",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning"}},
                        ],
                    },
                ],
            },
        ],
    }
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump(tests))
    done = subprocess.run(
        [promtool, "test", "rules", str(spec)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
