"""Enqueue jobs end: ``sent`` (then ``done`` once embedded), ``failed`` with the error,
``interrupted`` (Ctrl-C, SIGTERM); a new job that sent nothing is not recorded; ``embedq
jobs --prune`` forgets ended jobs, and their keys expire. Real Redis, real CLI processes.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.core.records import Record
from embedq.producer.client import Producer, as_record
from embedq.queue.jobs import JobLedger, get_job

from .conftest import REDIS_URL
from .test_cli import embedq
from .test_producer_jobs import start_enqueue, wait_for, write_jsonl


def failing_after(n: int) -> Iterator[Record]:
    for i in range(n):
        yield as_record({"id": f"r{i}", "text": f"record {i}"})
    raise OSError("the source went away")


def test_a_job_that_fails_before_sending_anything_is_not_recorded(
    redis_client: redis.Redis, stream_name: str
) -> None:
    ledger = JobLedger(redis_client, stream_name)
    with pytest.raises(OSError, match="went away"):
        Producer(redis_client, stream_name).run(failing_after(0), job="early")
    assert ledger.ids() == [] and get_job(ledger, "early") is None
    assert not list(redis_client.scan_iter(match=f"{stream_name}*job*early*"))


def test_a_job_that_fails_midway_is_failed_with_its_error_and_resumable(
    redis_client: redis.Redis, stream_name: str
) -> None:
    ledger = JobLedger(redis_client, stream_name)
    producer = Producer(redis_client, stream_name, chunk=100)
    with pytest.raises(OSError, match="went away"):
        producer.run(failing_after(250), job="mid")
    view = get_job(ledger, "mid")
    # The full chunks were sent; the last, partial one was not (a resume sends it).
    assert view is not None and view.state == "failed" and view.enqueued == 200
    assert (ledger.state("mid") or {}).get("error") == "OSError: the source went away"
    assert 0 < redis_client.ttl(ledger.keys.job("mid")) <= 7 * 24 * 3600  # it expires


def test_the_cli_advises_a_resume_only_when_something_was_sent(
    tmp_path: Path, redis_client: redis.Redis, stream_name: str
) -> None:
    good = [f"r{i},record {i}" for i in range(5000)]
    source = tmp_path / "broken.csv"  # a file that stops being UTF-8 after 300 rows
    source.write_bytes(("id,text\n" + "\n".join(good) + "\n").encode() + b"x,\xff\xfe\n")
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name}
    midway = embedq("enqueue", str(source), "--job", "half", "--chunk", "100", env=env)
    assert midway.returncode == 2, midway.stderr
    # The reader decodes 8 KiB at a time: the rows before the bad bytes' block were sent.
    assert "sent; resume with --job half" in midway.stderr, midway.stderr
    view = get_job(JobLedger(redis_client, stream_name), "half")
    assert view is not None and view.state == "failed"

    unreachable = {**env, "EMBEDQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    nothing = embedq("enqueue", str(source), "--job", "never", env=unreachable)
    assert nothing.returncode == 3 and "resume with" not in nothing.stderr, nothing.stderr


def test_sigterm_marks_a_job_interrupted_and_prune_forgets_ended_jobs(
    tmp_path: Path, redis_client: redis.Redis, stream_name: str
) -> None:
    rows: list[dict[str, Any]] = [{"id": f"r{i}", "text": f"record {i}"} for i in range(40_000)]
    source = write_jsonl(tmp_path / "big.jsonl", rows)
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name, "EMBEDQ_LOG_JSON": "1"}
    proc = start_enqueue([str(source), "--job", "stopped", "--chunk", "10"], env, tmp_path / "e")
    wait_for(lambda: redis_client.xlen(stream_name) >= 2000, 120, "the first entries")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    ledger = JobLedger(redis_client, stream_name)
    view = get_job(ledger, "stopped")
    assert view is not None and view.state == "interrupted"

    small = write_jsonl(tmp_path / "one.jsonl", rows[:3])
    done = embedq("enqueue", str(small), "--job", "ok", env=env)
    assert done.returncode == 0, done.stderr
    ledger.start("still-sending", "elsewhere", 1, None)  # another producer, running
    pruned = embedq("jobs", "--prune", env=env)
    assert pruned.returncode == 0, pruned.stderr
    # "ok" is only sent (nothing embedded it yet), so it has not ended; "stopped" has.
    assert "pruned 1 jobs: stopped" in pruned.stdout
    assert sorted(ledger.ids()) == ["ok", "still-sending"]
