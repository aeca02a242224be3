"""Enqueue jobs as ``embedq jobs`` / ``embedq job ID`` show them.

A job's counters live in Redis (see ``embedq.keys``): the producer's per-partition
``enqueued`` counts, and the workers' ``embedded`` / ``dead_lettered`` counts. The ETA
divides what is left by the workers' rate since their first entry of the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedq.stream import Stream


@dataclass(frozen=True)
class JobView:
    job: str
    source: str
    state: str  # sending | sent | done
    partitions: int
    total: int | None
    enqueued: int
    embedded: int
    dead_lettered: int
    started_ms: int
    updated_ms: int
    embedded_per_s: float | None
    eta_s: float | None

    @property
    def remaining(self) -> int:
        return max(self.enqueued - self.embedded - self.dead_lettered, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "source": self.source,
            "state": self.state,
            "partitions": self.partitions,
            "total": self.total,
            "enqueued": self.enqueued,
            "embedded": self.embedded,
            "dead_lettered": self.dead_lettered,
            "remaining": self.remaining,
            "started_ms": self.started_ms,
            "updated_ms": self.updated_ms,
            "embedded_per_s": self.embedded_per_s,
            "eta_s": self.eta_s,
        }


def job_view(job: str, state: dict[str, str]) -> JobView:
    def number(name: str) -> int:
        return int(state.get(name) or 0)

    enqueued, embedded, dead = number("enqueued"), number("embedded"), number("dead_lettered")
    rate: float | None = None
    span_ms = number("embedded_last_ms") - number("embedded_first_ms")
    if embedded and span_ms > 0:
        rate = round(embedded / (span_ms / 1000), 1)
    remaining = max(enqueued - embedded - dead, 0)
    sent = state.get("state", "sending")
    done = sent == "sent" and remaining == 0
    eta: float | None = 0.0 if done else None
    if not done and rate:
        eta = round(remaining / rate, 1)
    return JobView(
        job=job,
        source=state.get("source", ""),
        state="done" if done else sent,
        partitions=number("partitions") or 1,
        total=int(state["total"]) if state.get("total") else None,
        enqueued=enqueued,
        embedded=embedded,
        dead_lettered=dead,
        started_ms=number("started_ms"),
        updated_ms=number("updated_ms"),
        embedded_per_s=rate,
        eta_s=eta,
    )


def get_job(stream: Stream, job: str) -> JobView | None:
    state = stream.job_state(job)
    return None if state is None else job_view(job, state)


def list_jobs(stream: Stream) -> list[JobView]:
    """Every job on the stream, oldest first."""
    views = (get_job(stream, job) for job in stream.job_ids())
    return [v for v in views if v is not None]
