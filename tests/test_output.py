"""One convention per output kind (issue 28): aligned tables, labels that say what the
value is, and `--json` lists as JSON Lines (docs/reference/cli.md, "Output conventions")."""

from __future__ import annotations

import pytest
import redis

from embedq.cli import produce
from embedq.cli.verify import repair_line
from embedq.cli.work import summary_line
from embedq.core.config import Settings
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.jobs import JobView
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble


def view(job: str, state: str, eta_s: float | None = 12.0) -> JobView:
    return JobView(
        job=job,
        source="examples/sample.jsonl",
        state=state,
        partitions=1,
        total=500,
        enqueued=500,
        embedded=120,
        dead_lettered=3,
        started_ms=1_765_000_000_000,
        updated_ms=1_765_000_060_000,
        embedded_per_s=None,
        eta_s=eta_s,
    )


def test_the_jobs_table_stays_aligned_on_a_long_state(capsys: pytest.CaptureFixture[str]) -> None:
    produce._print_jobs([view("a-job", "interrupted"), view("another-job-name", "done", None)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "job",
        "state",
        "enqueued",
        "embedded",
        "dead",
        "tokens",
        "eta",
        "source",
    ]
    # every column starts (or, for numbers, ends) at the same place on every line
    for word in ("enqueued", "source"):
        at = lines[0].index(word)
        assert all(line[at - 1] == " " for line in lines[1:]), lines
    ends = {line.index("examples/") for line in lines[1:]}
    assert len(ends) == 1 and lines[0].index("source") in ends


def test_a_job_labels_its_dates_as_dates_and_an_unknown_rate_as_unknown() -> None:
    shown = produce._shown("embedded_per_s", None)
    assert shown == "-"
    assert "1970" not in produce._shown("started_ms", 1_765_000_000_000)


def test_verify_repair_ends_with_the_ids_to_resend_or_says_there_are_none() -> None:
    """It ended with "(re-send them): " and nothing after it when every id was repaired."""
    clean = repair_line({"resent": 4, "deleted": 1, "unrepairable": []})
    assert clean == "repair: sent 4 again, 1 deletes; 0 trimmed from the stream"
    lost = repair_line({"resent": 0, "deleted": 0, "unrepairable": [f"d{i}" for i in range(25)]})
    assert lost.endswith(
        "(re-send them): " + " ".join(f"d{i}" for i in range(20)) + " (and 5 more: verify --json)"
    )


def test_the_worker_summary_counts_the_deletes_it_applied(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> None:
    """Issue 28: the exit line said what was embedded and dead-lettered, not deleted."""
    producer = Producer(redis_client, settings.stream, group=settings.group)
    producer.enqueue([{"id": f"d{i}", "text": f"text number {i}"} for i in range(3)])
    producer.delete(["d0", "d1"])
    stream = Stream(redis_client, settings.stream, settings.group, settings.consumer)
    stats = assemble(settings, stream, tiny_encoder, sink).run()
    line = summary_line(stats.as_dict())
    # d0 and d1 may be written then deleted, or (one read window) only deleted.
    assert line.startswith("embedded ") and line.endswith(", 2 deleted, 0 dead-lettered")
    assert sink.count() == 1
    released = summary_line(stats.as_dict(), released=True)
    assert released.endswith("; the batches in hand past --grace stay pending")
