"""Enqueue jobs: the ledger in Redis, and the views ``embedq jobs`` / ``embedq job ID`` show.

A job's counters live in Redis (see ``embedq.core.keys``): the producer's per-partition
``enqueued`` counts and resume positions (written by ``enqueue.lua`` with the entries
themselves), and the workers' ``embedded`` / ``dead_lettered`` counts. The ETA divides
what is left by the workers' rate since their first entry of the job.
"""

from __future__ import annotations

import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from embedq.core.config import Settings
from embedq.core.errors import ConfigError, QueueUnavailable
from embedq.core.keys import Keys, partition_streams
from embedq.queue.connection import connect, translated
from embedq.queue.entries import Entry, load_script, text

JOB_TTL_S = 7 * 24 * 3600  # an ended job's keys live a week (`embedq jobs --prune` sooner)
ENDED = ("done", "failed", "interrupted")
WAIT_TIMEOUT_MS = 1000  # below the client's socket timeout (2 s and more)
# Job ids go into key names: no braces (a hash tag would move keys off their partition's slot).
JOB_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
LOST = (
    "Redis lost this job's keys (its source, start and enqueued counts; Redis lost its data): "
    "the counts shown are what workers recorded since. Re-send the job from its source"
)
# What only the producer's keys say: unknown (None) for a lost job.
_PRODUCERS = frozenset(
    ("source", "partitions", "total", "enqueued", "remaining", "started_ms", "updated_ms", "eta_s")
)


class Sender:
    """Sends batches from a thread of its own, so that reading and parsing the source
    overlaps the round trip and Redis's own work (a socket wait releases the GIL). At most
    ``depth`` chunks wait; an error there stops sending and is raised in the caller."""

    def __init__(
        self, ledger: JobLedger, job: str, on_sent: Callable[[int], None], depth: int = 2
    ) -> None:
        self._ledger = ledger
        self._job = job
        self._on_sent = on_sent
        self._queue: queue.Queue[list[EnqueueBatch] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="embedq-sender", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (batches := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep taking chunks so the producer never blocks on a full queue
            try:
                self._on_sent(self._ledger.send(self._job, batches))
            except BaseException as exc:  # handed to the producer's thread, raised there
                self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, batches: list[EnqueueBatch]) -> None:
        self._raise()
        if batches:
            self._queue.put(batches)

    def close(self) -> None:
        """Wait until every chunk handed over is sent (or failed), then raise any error."""
        self._queue.put(None)
        self._thread.join()
        self._raise()


def check_job_id(job: str) -> None:
    if not JOB_ID.fullmatch(job):
        raise ConfigError(
            f"job id {job!r}: use 1-128 letters, digits and . _ - : @ (no spaces or braces)"
        )


def new_job_id() -> str:
    """A sortable, unique job id: UTC start time plus random hex."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class EnqueueBatch:
    """Entries for one partition stream, flattened for ``enqueue.lua``, and the source
    position of the last of them."""

    stream: str
    position: int
    values: list[Any]


class JobLedger:
    """The enqueue jobs of one (base) tasks stream and its partitions: what producers send
    and workers count."""

    def __init__(self, client: redis.Redis, stream: str, *, wait_replicas: int = 0) -> None:
        self.client = client
        self.keys = Keys(stream)
        # After each batch, wait until this many replicas have it (WAIT): an enqueue that
        # returned then survives a failover to one of them (async replication otherwise
        # loses the last writes). 0: no wait.
        self.wait_replicas = wait_replicas
        self._enqueue = client.register_script(load_script("enqueue.lua"))

    # -- producers -----------------------------------------------------------------------

    def send(self, job: str, batches: Sequence[EnqueueBatch]) -> int:
        """Each batch's entries and its resume position, one atomic script call per
        partition stream. Returns the number of entries added."""
        added = 0
        with translated("enqueue"):
            for batch in batches:
                keys = Keys(batch.stream)
                added += int(
                    self._enqueue(
                        keys=[keys.stream, keys.sent(job) if job else keys.stream],
                        args=[job, batch.position, *batch.values],
                    )
                )
                self._replicated()
        return added

    def _replicated(self) -> None:
        if not self.wait_replicas:
            return
        confirmed = int(self.client.wait(self.wait_replicas, WAIT_TIMEOUT_MS))
        if confirmed < self.wait_replicas:
            raise QueueUnavailable(
                f"only {confirmed} of {self.wait_replicas} replicas confirmed the enqueue "
                f"within {WAIT_TIMEOUT_MS} ms (--wait-replicas): it may be lost in a failover; "
                "resume the job once the replicas are back"
            )

    def start(self, job: str, source: str, partitions: int, total: int | None) -> None:
        """Register ``job`` (or touch it again on a resume); ``started_ms`` is kept."""
        now_ms = int(time.time() * 1000)
        key = self.keys.job(job)
        with translated("start job"):
            before = self.client.hget(key, "partitions")
        if before is not None and int(before) != partitions:
            # Positions are kept per partition stream: another count would resend records.
            raise ConfigError(
                f"job {job} was started with --partitions {int(before)}; resume it with the "
                f"same count, or start a new job"
            )
        fields: dict[str, str | int] = {
            "source": source,
            "partitions": partitions,
            "state": "sending",
            "updated_ms": now_ms,
        }
        if total is not None:
            fields["total"] = total
        # Not a MULTI: the index and the job hash sit on different cluster slots.
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.jobs, {job: now_ms}, nx=True)
        pipe.hsetnx(key, "started_ms", now_ms)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        with translated("start job"):
            pipe.execute()

    def finish(self, job: str, state: str = "sent", error: str = "") -> None:
        """The producer is done with ``job``: ``sent`` everything, ``failed`` (``error``
        says why) or ``interrupted``. Its keys expire ``JOB_TTL_S`` later."""
        now_ms = int(time.time() * 1000)
        fields: dict[str, str | int] = {"state": state, "updated_ms": now_ms, "finished_ms": now_ms}
        if error:
            fields["error"] = error[:500]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.keys.job(job), mapping=fields)  # type: ignore[arg-type]
        for key in self._keys_of(job):
            pipe.expire(key, JOB_TTL_S)
        with translated("finish job"):
            pipe.execute()

    def forget(self, job: str) -> None:
        """Remove every trace of ``job`` (one that sent nothing is not worth listing)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.jobs, job)
        for key in self._keys_of(job):
            pipe.delete(key)
        with translated("forget job"):
            pipe.execute()

    def prune(self, older_than_s: float = 0.0) -> list[str]:
        """Forget the jobs that ended (done, failed, interrupted) at least ``older_than_s``
        ago, any whose keys expired, and any whose keys Redis lost (``lost``: only workers'
        counts left, nothing says when it ended); returns their ids."""
        cutoff_ms = int((time.time() - older_than_s) * 1000)
        gone = []
        for job in self.ids():
            state = self.state(job)
            view = None if state is None else job_view(job, state)
            ended = view is None or view.state in ENDED or view.lost
            if ended and (state is None or int(state.get("finished_ms") or 0) <= cutoff_ms):
                self.forget(job)
                gone.append(job)
        return gone

    def _keys_of(self, job: str) -> list[str]:
        before = self.client.hget(self.keys.job(job), "partitions")
        streams = partition_streams(self.keys.base, int(before or 1))
        return [self.keys.job(job), *(Keys(s).sent(job) for s in streams)]

    def positions(self, job: str, streams: Sequence[str]) -> dict[str, int]:
        """The last source position ``job`` sent to each stream (-1: nothing yet)."""
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.hget(Keys(stream).sent(job), "position")
        with translated("job positions"):
            found = pipe.execute()
        return {s: -1 if p is None else int(p) for s, p in zip(streams, found, strict=True)}

    # -- workers -------------------------------------------------------------------------

    def record_embedded(
        self, entries: Sequence[Entry], tokens: Mapping[str, int] | None = None
    ) -> None:
        """After an ack: count entries per job, and the tokens they were embedded from
        (``tokens``: per entry id, for the entries whose text went through the model), in
        the pipeline of the batch's other counts. Counts are at-least-once: a crash between
        the ack and this call loses a few, a redelivery counts twice."""
        per_job: dict[str, int] = {}
        tokens_per_job: dict[str, int] = {}
        for entry in entries:
            raw_job = entry.fields.get(b"job")
            if raw_job:
                name = raw_job.decode("utf-8", "replace")
                per_job[name] = per_job.get(name, 0) + 1
                used = tokens.get(entry.entry_id, 0) if tokens else 0
                tokens_per_job[name] = tokens_per_job.get(name, 0) + used
        if not per_job:
            return
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for job, count in per_job.items():
            key = self.keys.job(job)
            # Listed even when Redis lost the job's keys (issue 25): `jobs` then shows it as
            # "lost" (no started_ms: ``job_view``) instead of nothing. NX: the start stays.
            pipe.zadd(self.keys.jobs, {job: now_ms}, nx=True)
            pipe.hincrby(key, "embedded", count)
            if tokens_per_job[job]:
                pipe.hincrby(key, "tokens", tokens_per_job[job])
            pipe.hsetnx(key, "embedded_first_ms", now_ms)
            pipe.hset(key, "embedded_last_ms", now_ms)
        with translated("record embedded"):
            pipe.execute()

    def record_dead_lettered(self, entry: Entry) -> None:
        job = entry.fields.get(b"job")
        if job:
            with translated("record dead-lettered"):
                self.client.hincrby(self.keys.job(job.decode("utf-8", "replace")), "dead_lettered")

    # -- inspection ----------------------------------------------------------------------

    def ids(self) -> list[str]:
        with translated("ZRANGE jobs"):
            found: Any = self.client.zrange(self.keys.jobs, 0, -1)
        return [text(j) or "" for j in found]

    def state(self, job: str) -> dict[str, str] | None:
        """The job's hash plus ``enqueued`` summed over its partitions; None if unknown."""
        with translated("job state"):
            raw: Any = self.client.hgetall(self.keys.job(job))
            if not raw:
                return None
            state = {text(k) or "": text(v) or "" for k, v in raw.items()}
            streams = partition_streams(self.keys.base, int(state.get("partitions", "1")))
            pipe = self.client.pipeline(transaction=False)
            for stream in streams:
                pipe.hget(Keys(stream).sent(job), "enqueued")
            state["enqueued"] = str(sum(int(n or 0) for n in pipe.execute()))
        return state


@dataclass(frozen=True)
class JobView:
    job: str
    source: str
    state: str  # sending | sent | done | failed | interrupted
    partitions: int
    total: int | None
    enqueued: int
    embedded: int
    dead_lettered: int
    started_ms: int
    updated_ms: int
    embedded_per_s: float | None
    eta_s: float | None
    # Tokens embedded (each text as the model took it: special tokens, truncation); the
    # metering of a bulk job, as the gateway meters a key.
    tokens: int = 0
    lost: bool = False  # Redis lost the job's keys; only workers' counts since are left

    @property
    def remaining(self) -> int:
        return max(self.enqueued - self.embedded - self.dead_lettered, 0)

    def as_dict(self) -> dict[str, Any]:
        found = self._fields()
        if self.lost:  # what only the producer's keys said is unknown, not 0 (nor 1970)
            return {"job": self.job, "state": self.state, "lost": LOST} | {
                k: None if k in _PRODUCERS else v for k, v in found.items()
            }
        return found

    def _fields(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "source": self.source,
            "state": self.state,
            "partitions": self.partitions,
            "total": self.total,
            "enqueued": self.enqueued,
            "embedded": self.embedded,
            "dead_lettered": self.dead_lettered,
            "tokens": self.tokens,
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
    # The producer writes started_ms first (``JobLedger.start``): a hash without it holds
    # only what workers counted after Redis lost the job's keys (issue 25: a "zombie" job,
    # state sending, started 1970-01-01).
    lost = not state.get("started_ms")
    done = sent == "sent" and remaining == 0 and not lost
    eta: float | None = 0.0 if done else None
    if not done and rate:
        eta = round(remaining / rate, 1)
    return JobView(
        job=job,
        source=state.get("source", ""),
        state="lost" if lost else "done" if done else sent,
        partitions=number("partitions") or 1,
        total=int(state["total"]) if state.get("total") else None,
        enqueued=enqueued,
        embedded=embedded,
        dead_lettered=dead,
        started_ms=number("started_ms"),
        updated_ms=number("updated_ms"),
        embedded_per_s=rate,
        eta_s=None if lost else eta,
        tokens=number("tokens"),
        lost=lost,
    )


def open_ledger(settings: Settings) -> JobLedger:
    """The job ledger of the stream ``settings`` names."""
    client = connect(settings.redis_url, block_ms=0, cluster=settings.redis_cluster)
    return JobLedger(client, settings.stream)


def get_job(ledger: JobLedger, job: str) -> JobView | None:
    state = ledger.state(job)
    return None if state is None else job_view(job, state)


def list_jobs(ledger: JobLedger) -> list[JobView]:
    """Every job on the stream, oldest first."""
    views = (get_job(ledger, job) for job in ledger.ids())
    return [v for v in views if v is not None]
