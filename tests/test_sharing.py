"""Fair sharing (issue 28): a worker reads at most a few seconds of work at its measured
rate, so a worker that joins shares the backlog. Before, two workers on the demo's 500
entries: one read all 500 in one 512-entry window and embedded them alone (25-40 s of work
on a CPU), the other embedded none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis

from embedq.producer.client import Producer
from embedq.worker.reader import FIRST_COUNT, MIN_COUNT, ReadWindow

from .conftest import REDIS_URL
from .support.servers import MilvusLiteServer

# The tiny model behind a stand-in pace of 10 texts/s: a CPU worker on long texts, in the
# small, so that the backlog outlasts the second worker's start.
SLOW_MODEL = """
import sys, time
from embedq.worker import loop

encode = loop.Worker.encode

def slow_encode(self, batch, encoder):
    time.sleep(0.1 * len(batch.items))
    encode(self, batch, encoder)

loop.Worker.encode = slow_encode
from embedq.cli import main
main(sys.argv[1:], prog_name="embedq")
"""


def test_two_workers_share_a_500_entry_backlog(
    tmp_path: Path,
    tiny_model: Path,
    stream_name: str,
    redis_client: redis.Redis,
    milvus_lite_server: MilvusLiteServer,
) -> None:
    with Producer.connect(REDIS_URL, stream=stream_name) as producer:
        producer.enqueue({"id": f"doc-{i}", "text": f"text number {i}"} for i in range(500))
    script = tmp_path / "slow.py"
    script.write_text(SLOW_MODEL)
    procs = []
    for name in ("A", "B"):
        args = [
            *("worker", "--drain", "--redis-url", REDIS_URL, "--stream", stream_name),
            *("--group", "g", "--consumer", name, "--milvus-uri", milvus_lite_server.uri),
            *("--collection", "sharing", "--model", str(tiny_model), "--device", "cpu"),
            *("--block-ms", "100", "--no-online", "--replicas", "1"),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                stdout=subprocess.PIPE,
                stderr=(tmp_path / f"{name}.log").open("wb"),
                env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "true"},
            )
        )
    embedded = []
    try:
        for name, proc in zip("AB", procs, strict=True):
            out, _ = proc.communicate(timeout=400)
            log = (tmp_path / f"{name}.log").read_text()[-3000:]
            assert proc.returncode == 0, log
            found = re.search(r"embedded (\d+) texts", out.decode())
            assert found, out
            embedded.append(int(found[1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sum(embedded) == 500
    assert min(embedded) > 0, embedded  # each worker had a share


def test_the_window_holds_seconds_of_work_at_the_measured_rate() -> None:
    window = ReadWindow(512, hold_s=5.0)
    assert window.count() == FIRST_COUNT  # nothing measured yet: a small first read,
    assert window.count(held=FIRST_COUNT) == 0  # and no other until a forward pass measured
    window.measured(64, 4.0)  # 16 texts/s: a CPU on long texts
    assert window.count() == 80
    assert window.count(held=60) == 20  # what the worker already holds counts
    assert window.count(held=80 - MIN_COUNT + 1) == 0  # its share held: it waits for acks
    window.measured(64, 0.01, replicas=2)  # a GPU: the read window is the limit again
    for _ in range(10):
        window.measured(64, 0.01, replicas=2)
    assert window.count() == 512


def test_a_held_share_is_topped_up_by_windows_worth_batching() -> None:
    """Reads of whatever the last acks freed (8 entries at a time) packed long texts into
    small batches, 15-20 % fewer texts/s: a read waits for room for a batch per replica
    (``min_count``), or half the hold where the rate is slow, and never lets the worker run
    dry."""
    window = ReadWindow(512, hold_s=5.0, min_count=128)  # 2 replicas x 64 rows
    assert window.count() == 128  # the first read fills both replicas
    assert window.count(held=1) == 0
    window.measured(50, 1.0, replicas=2)  # 100 texts/s: 500 entries are 5 s of work
    assert window.count(held=400) == 0  # 100 free: less than a batch per replica
    assert window.count(held=372) == 128
    assert window.count(held=0) == 500
    slow = ReadWindow(512, hold_s=5.0, min_count=128)
    slow.measured(16, 1.0)  # 16 texts/s: 80 entries are the whole hold
    assert slow.count(held=50) == 0
    assert slow.count(held=40) == 40  # half the hold, not a batch per replica it never has
    assert slow.count(held=0) == 80


def test_no_hold_reads_the_whole_window() -> None:
    window = ReadWindow(512)
    window.measured(64, 4.0)
    assert window.count() == 512
