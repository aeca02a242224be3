"""Shutdown that fits the batch (issue 28): signals that arrive together are one request,
and a grace period shorter than the batch in hand lets it go cleanly (entries pending for
the reclaimer, exit 0, the summary printed) instead of ending in ``forced_exit``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq.producer.client import Producer
from embedq.worker import shutdown
from embedq.worker.shutdown import GracefulShutdown

from .conftest import REDIS_URL
from .support.servers import wait_until


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The exit codes ``exit_now`` was called with (it returns instead of exiting); the
    process's signal handlers and timer are put back afterwards."""
    codes: list[int] = []

    def exit_now(code: int = shutdown.EXIT_FORCED) -> None:
        codes.append(code)

    monkeypatch.setattr(shutdown, "exit_now", exit_now)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    yield codes
    signal.setitimer(signal.ITIMER_REAL, 0)
    for s, handler in saved.items():
        signal.signal(s, handler)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_signals_arriving_together_are_one_request(exits: list[int]) -> None:
    """A process-group Ctrl-C (or `timeout -s INT`) delivers SIGINT twice within 1 ms."""
    stop, clock = threading.Event(), Clock()
    handler = GracefulShutdown(stop, grace_s=600, clock=clock)
    handler._on_signal(signal.SIGINT, None)
    clock.now += 0.0004
    handler._on_signal(signal.SIGINT, None)
    clock.now += 0.3
    handler._on_signal(signal.SIGTERM, None)
    assert stop.is_set() and exits == []
    clock.now += 1.0  # an operator who insists, a second later
    handler._on_signal(signal.SIGINT, None)
    assert exits == [shutdown.EXIT_FORCED]


def test_the_end_of_the_grace_lets_the_batch_go_with_the_summary(exits: list[int]) -> None:
    released: list[bool] = []
    handler = GracefulShutdown(
        threading.Event(), grace_s=600, on_release=lambda: released.append(True)
    )
    handler._on_signal(signal.SIGTERM, None)
    handler._on_grace_expired(signal.SIGALRM, None)
    assert released == [True] and exits == [shutdown.EXIT_RELEASED] == [0]


def test_a_failing_summary_does_not_stop_the_release(exits: list[int]) -> None:
    def broken() -> None:
        raise RuntimeError("stdout closed")

    GracefulShutdown(threading.Event(), grace_s=600, on_release=broken)._on_grace_expired(
        signal.SIGALRM, None
    )
    assert exits == [0]


# A worker whose model takes forever on its first batch: a CPU worker on a 512-entry window
# of long texts, in the small. It writes MARKER when the batch is in its hands.
STAND_IN = """
import sys, threading
from pathlib import Path
from embedq.worker import loop

def encode(self, batch, encoder):
    Path(sys.argv[1]).write_text(str(len(batch.items)))
    threading.Event().wait()  # longer than any grace

loop.Worker.encode = encode
from embedq.cli import main
main(sys.argv[2:], prog_name="embedq")
"""


def test_double_sigint_on_a_slow_batch_exits_0_with_the_summary_and_leaves_it_pending(
    tmp_path: Path, tiny_model: Path, stream_name: str, redis_client: redis.Redis
) -> None:
    with Producer.connect(REDIS_URL, stream=stream_name) as producer:
        producer.enqueue({"id": f"doc-{i}", "text": f"text number {i}"} for i in range(40))
    script, marker = tmp_path / "stand_in.py", tmp_path / "in-hand"
    script.write_text(STAND_IN)
    args = [
        *("worker", "--redis-url", REDIS_URL, "--stream", stream_name, "--group", "g"),
        *("--consumer", "T", "--milvus-uri", str(tmp_path / "milvus.db")),
        *("--collection", "shutdown", "--model", str(tiny_model), "--device", "cpu"),
        *("--grace", "1", "--block-ms", "100", "--no-online"),
    ]
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "true"},
        start_new_session=True,
    )
    try:
        wait_until(marker.exists, 120, "the worker holding a batch", 0.05)
        os.kill(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the process ...
        os.kill(proc.pid, signal.SIGINT)  # ... and to its group, within a millisecond
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    logged = (tmp_path / "worker.log").read_text()
    assert proc.returncode == 0, logged[-3000:]
    assert '"forced_exit"' not in logged and '"grace_over"' in logged
    assert '"worker_stopped"' in logged
    assert out.decode().startswith("embedded 0 texts"), out
    assert "stay pending" in out.decode()
    # the batch in hand stays pending on this consumer, for the reclaimer (or its restart)
    held = int(marker.read_text())
    pending = redis_client.xpending(stream_name, "g")
    assert pending["pending"] >= held > 0
