"""A worker's own metrics, the retry loop's failure events and backoff state, and the
probes' background checks: pure or in-process, no Redis (issue 17).

What Prometheus makes of them with a real worker is test_monitoring.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from embedq.core import backoff
from embedq.core.backoff import Retrier
from embedq.core.errors import QueueUnavailable, SinkUnavailable
from embedq.model.encoder import model_name
from embedq.model.identity import ModelIdentity
from embedq.worker.health import HealthServer, NotReady, Watched, not_backing_off
from embedq.worker.metrics import DEAD_LETTER_REASONS, ERROR_KINDS, WorkerMetrics

ON = {"stream": "s", "group": "g"}


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted({**ON, **labels}.items()))))


# -- the retry loop --------------------------------------------------------------------


def flaky(failures: int, exc: Exception) -> Any:
    left = [failures]

    def call() -> str:
        if left[0]:
            left[0] -= 1
            raise exc
        return "done"

    return call


def test_a_failed_call_is_one_failure_event_however_many_retries() -> None:
    """Issue 17: one outage counted 17 errors, one per attempt."""
    events: list[tuple[str, str]] = []
    seen_waiting: list[list[str]] = []
    retrying: Retrier

    def sleep(_s: float) -> None:
        seen_waiting.append([f"{w.action}/{w.dependency}" for w in retrying.waiting()])

    retrying = Retrier(on_failure=lambda a, e: events.append((a, type(e).__name__)), sleep=sleep)
    assert retrying("upsert", flaky(4, SinkUnavailable("milvus down"))) == "done"
    assert events == [("upsert", "SinkUnavailable")]
    assert seen_waiting == [["upsert/milvus"]] * 4  # readiness sees it while it waits
    assert retrying.waiting() == []  # and not after it went through
    metrics = WorkerMetrics(stream="s", group="g")
    metrics.watch_retries(retrying.waiting)
    assert get(metrics, "embedq_retry_waiting", dependency="milvus") == 0


def test_a_failed_call_warns_once_and_says_when_it_recovered() -> None:
    """Issue 28: a warning per retry; now one, the retries at debug, one line at the end."""
    retrying = Retrier(sleep=lambda _s: None)
    with capture_logs() as logs:
        assert retrying("upsert", flaky(5, SinkUnavailable("milvus down"))) == "done"
    # Debug lines reach capture_logs only when no earlier test configured logging at info
    # (the filtering logger drops them before any processor): count what an operator sees.
    said = [(e["event"], e["log_level"]) for e in logs if e["log_level"] != "debug"]
    assert said == [("infrastructure_error", "warning"), ("infrastructure_recovered", "info")]
    assert all(e["event"] == "infrastructure_error" for e in logs if e["log_level"] == "debug")
    assert logs[-1]["failed_attempts"] == 5 and logs[-1]["dependency"] == "milvus"
    with capture_logs() as logs, pytest.raises(SinkUnavailable):
        Retrier(give_up=lambda: True)("upsert", flaky(1, SinkUnavailable("milvus down")))
    assert [e["log_level"] for e in logs] == ["warning"]  # the caller says the final line


def test_wake_ends_a_backoff_when_the_dependency_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: ready for 22 s while the worker sat out a 27 s backoff."""
    monkeypatch.setattr(backoff, "compute_backoff", lambda attempt: 60.0)
    retrying = Retrier()
    done: list[str] = []
    thread = threading.Thread(
        target=lambda: done.append(retrying("read", flaky(1, QueueUnavailable("redis gone"))))
    )
    thread.start()
    deadline = time.monotonic() + 5
    while not retrying.waiting() and time.monotonic() < deadline:
        time.sleep(0.01)
    check = not_backing_off(retrying.waiting)
    with pytest.raises(NotReady, match="read waits for redis"):
        check()
    started = time.monotonic()
    retrying.wake()
    thread.join(timeout=5)
    assert done == ["done"] and time.monotonic() - started < 2  # not the 60 s backoff
    assert check() is True


def test_a_watched_check_reads_its_last_result_and_reports_a_recovery_once() -> None:
    up = [False]
    recovered: list[bool] = []

    def ping() -> None:
        if not up[0]:
            raise QueueUnavailable("redis unavailable during PING: timed out")

    watched = Watched("redis", ping, stale_after_s=30, on_recovered=lambda: recovered.append(True))
    watched.run_once()
    with pytest.raises(NotReady, match="QueueUnavailable: redis unavailable"):
        watched()
    up[0] = True
    watched.run_once()
    watched.run_once()
    assert watched() is True and recovered == [True]
    watched._ok_at = time.monotonic() - 60  # a call that hangs: its last success grows old
    with pytest.raises(NotReady, match="no answer for"):
        watched()


# -- the worker's metrics ------------------------------------------------------------------


def test_known_label_sets_start_at_zero_with_stream_and_group() -> None:
    """Issue 17: counters created at 1 hid each first event from increase()."""
    metrics = WorkerMetrics(stream="s", group="g")
    for reason in DEAD_LETTER_REASONS:
        assert get(metrics, "embedq_dead_lettered_total", reason=reason) == 0
    for kind in ERROR_KINDS:
        assert get(metrics, "embedq_errors_total", kind=kind) == 0
    assert get(metrics, "embedq_texts_total") == 0
    assert get(metrics, "embedq_queue_depth", queue="tokenized") == 0
    text = generate_latest(metrics.registry).decode()
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert 'embedq_build_info{python="' in text
    metrics.errors.labels(kind="redis").inc()  # the callers' API: stream and group implied
    assert get(metrics, "embedq_errors_total", kind="redis") == 1


def test_acks_counted_per_millisecond_give_the_histogram_one_observation_per_entry() -> None:
    """``acked`` observes once per distinct XADD millisecond, counted as many times: every
    bucket, the count and the sum must be what one observation per entry gives."""
    from prometheus_client import CollectorRegistry, Histogram

    metrics = WorkerMetrics(stream="s", group="g")
    now_ms = int(time.time() * 1000)
    ages_ms = [0, 0, 0, 40, 40, 700, 700, 700, 700, 3_500, 20_000, 20_000, 10**9]  # off the bounds
    ids = [f"{now_ms - age}-{seq}" for seq, age in enumerate(ages_ms)]
    metrics.acked(ids)
    reference = Histogram(
        "ref", "", buckets=metrics.enqueue_to_ack._upper_bounds[:-1], registry=CollectorRegistry()
    )
    now = time.time()
    for age in ages_ms:
        reference.observe(max(0.0, now - (now_ms - age) / 1000))
    mine = {
        s.labels.get("le"): s.value
        for m in metrics.registry.collect()
        if m.name == "embedq_enqueue_to_ack_seconds"
        for s in m.samples
        if s.name.endswith("_bucket")
    }
    wanted = {
        s.labels["le"]: s.value
        for m in reference.collect()
        for s in m.samples
        if s.name.endswith("_bucket")
    }
    assert mine == wanted
    assert get(metrics, "embedq_enqueue_to_ack_seconds_count") == len(ids)
    total = sum(s.value for m in reference.collect() for s in m.samples if s.name == "ref_sum")
    assert get(metrics, "embedq_enqueue_to_ack_seconds_sum") == pytest.approx(total, rel=1e-3)


def test_acks_observe_the_time_since_xadd_and_the_last_ack() -> None:
    metrics = WorkerMetrics(stream="s", group="g")
    now_ms = int(time.time() * 1000)
    metrics.acked([f"{now_ms - 2000}-0", f"{now_ms - 4000}-3"])
    assert get(metrics, "embedq_enqueue_to_ack_seconds_count") == 2
    assert get(metrics, "embedq_enqueue_to_ack_seconds_sum") == pytest.approx(6, abs=1)
    assert get(metrics, "embedq_last_ack_timestamp_seconds") == pytest.approx(time.time(), abs=5)


def test_forward_passes_feed_batch_shapes_and_model_busy_time() -> None:
    metrics = WorkerMetrics(stream="s", group="g")
    metrics.forward_done(0.5, rows=32, padded_tokens=1024)
    metrics.forward_done(0.25, rows=8, padded_tokens=256)
    metrics.observe_stage("read", 1.5)  # BLOCK wait: not a stage of work
    assert get(metrics, "embedq_model_busy_seconds_total") == 0.75
    assert get(metrics, "embedq_batch_size_sum") == 40
    assert get(metrics, "embedq_batch_tokens_sum") == 1280
    assert get(metrics, "embedq_stage_duration_seconds_count", stage="inference") == 2
    assert get(metrics, "embedq_read_duration_seconds_count") == 1
    assert get(metrics, "embedq_stage_duration_seconds_count", stage="read") is None
    metrics.describe_model(
        ModelIdentity("m", "", width=384), "cpu", "float32", replicas=2, model_dir="/opt/x/model"
    )
    assert get(metrics, "embedq_model_replicas") == 2


@pytest.mark.parametrize(
    ("model_dir", "expected"),
    [
        ("/models/bge-small-en-v1.5/model", "bge-small-en-v1.5"),
        (
            "/hf/hub/models--BAAI--bge-m3/snapshots/0123456789abcdef0123456789abcdef01234567",
            "BAAI/bge-m3",
        ),
        ("/models/e5-large", "e5-large"),
    ],
)
def test_model_info_names_the_model_not_its_directory(model_dir: str, expected: str) -> None:
    """Encoder.name, which embedq_model_info reports (the packaged model is named by
    resolve_model_dir: sentence-transformers/all-MiniLM-L6-v2)."""
    assert model_name(Path(model_dir)) == expected


def test_the_metrics_server_takes_a_bind_address_and_backlog_and_hides_broken_pipes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = HealthServer(WorkerMetrics().registry, 0, host="127.0.0.1", backlog=7)
    try:
        assert server._httpd.server_address[0] == "127.0.0.1"
        assert server._httpd.request_queue_size == 7
        # A scrape abandoned mid-answer: socketserver would print a traceback to stderr.
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                reset = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER 0: close with RST
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            server._httpd.handle_error(None, ("127.0.0.1", 1))
        time.sleep(0.2)
    finally:
        server.close()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_workers_export_gpu_memory_and_ooms(tmp_path: Path) -> None:
    metrics = WorkerMetrics(stream="s", group="g")
    metrics.describe_model(ModelIdentity("m", "", width=384), "cuda", "float16")
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    allocated = get(metrics, "embedq_gpu_memory_allocated_bytes", device="cuda")
    assert allocated is not None and allocated >= held.numel()
    total = get(metrics, "embedq_gpu_memory_total_bytes", device="cuda")
    assert total is not None and total > allocated
    assert get(metrics, "embedq_gpu_ooms_total", device="cuda") == 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        torch.empty(int(total * 2), dtype=torch.uint8, device="cuda")
    assert get(metrics, "embedq_gpu_ooms_total", device="cuda") == 1


def test_everything_a_process_writes_to_stderr_is_one_json_object_per_line() -> None:
    """Issue 17: 441 of 473 lines of a worker's log were not JSON (gRPC notices and
    tracebacks). Library logging, Python warnings and a thread that dies go through the
    same renderer; gRPC's C core, which writes to the file descriptor itself, is silenced."""
    script = (
        "import logging, os, threading, warnings\n"
        "from embedq.core import logs\n"
        "logs.configure('info', json=True, secrets=['s3cret'])\n"
        "logging.getLogger('pymilvus').warning('retrying with token s3cret')\n"
        "warnings.warn('a library deprecates something')\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='stage'); t.start(); t.join()\n"
        "print(os.environ['GRPC_VERBOSITY'])\n"
        "raise RuntimeError('a bug')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip() == "NONE"
    events = [json.loads(line) for line in done.stderr.splitlines()]  # each line is JSON
    by_event = {e["event"]: e for e in events}
    assert by_event["retrying with token ***"]["logger"] == "pymilvus"
    assert any("a library deprecates something" in e["event"] for e in events)
    assert "ZeroDivisionError" in by_event["thread_crashed"]["exception"]
    assert "RuntimeError: a bug" in by_event["uncaught_exception"]["exception"]
    assert done.returncode == 1
