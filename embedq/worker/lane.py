"""A worker's side of the interactive lane: online requests go ahead of the bulk backlog.

The lane (``embedq.core.keys.lane_stream``, entries in ``embedq.queue.online_wire``'s
format) is one more stream the worker reads, first: one XREADGROUP blocks on the lane and
the bulk streams together, so an idle worker wakes for a query at once. What makes a query
wait for at most the batch in hand while a backlog drains:

* ``Lanes``, the model stage's inbox, hands out lane batches before bulk ones and never
  makes them wait for room;
* while that inbox is full of bulk batches the reader is not blocked in XREADGROUP but
  waiting for room: ``OnlineLane.poll`` reads the lane alone meanwhile (no BLOCK), every
  ``POLL_S``;
* the answer is sent by the model thread right after the forward pass
  (``OnlineEncoding``), not behind the writer's Milvus upserts.

An answer is one script call (``lane_reply.lua``): the vectors onto the request's reply
list and the XACK together. Online entries never reach Milvus; an expired one (its
``deadline_ms`` passed: the gateway answered 503) is acked without encoding; a text the
model refuses is answered with the error, not dead-lettered. Lane entries are always
truncated at the model's limit, whatever ``--on-overlong`` says for bulk entries.

Every answer carries the worker's model identity (``Stamp``: name and fingerprint). An
entry that asks for another model (its ``model`` field: during a rollout two models serve
one lane) is answered ``MISMATCH`` at once, unencoded, and acked: the gateway sends it
again for a worker of its model, and never returns another model's vector.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from embedq.core.backoff import Retrier
from embedq.core.errors import InfrastructureError, QueueFull
from embedq.model.encoder import Encoder
from embedq.queue.entries import Entry, load_script
from embedq.queue.online_wire import (
    Stamp,
    expired,
    index_of,
    pack_failure,
    pack_mismatch,
    pack_reply,
    reply_key,
    worker_member,
    workers_key,
)
from embedq.queue.stream import Claimed, Stream
from embedq.worker.batcher import Batcher
from embedq.worker.heartbeat import InFlight
from embedq.worker.model_stage import Encoding
from embedq.worker.pipeline import Batch, Item, Stage

log = structlog.get_logger("embedq.worker.lane")

POLL_S = 0.01  # how often a reader waiting for room looks at the lane: the most a query waits
REVIVE_S = 5.0  # how often a worker retries creating a lane a full Redis refused

Reject = Callable[[Item, str, str], None]


class Lanes(queue.Queue[Stage]):
    """The model stage's inbox: lane batches are taken first and never wait for room (the
    lane's own read count bounds them); bulk batches wait as in any bounded queue, and the
    reader calls ``while_full`` between short waits so the lane is read meanwhile."""

    def __init__(self, maxsize: int, while_full: Callable[[Lanes], None] | None = None) -> None:
        super().__init__(maxsize)
        self.while_full = while_full

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self.online: deque[Stage] = deque()

    def _qsize(self) -> int:
        return len(self.queue) + len(self.online)

    def _get(self) -> Stage:
        return self.online.popleft() if self.online else self.queue.popleft()

    def put(self, item: Stage, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, Batch) and item.online:
            with self.not_full:  # the queue's lock
                self.online.append(item)
                self.unfinished_tasks += 1
                self.not_empty.notify()
            return
        if self.while_full is None or not isinstance(item, Batch) or not block:
            super().put(item, block, timeout)
            return
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while True:
            try:
                super().put(item, timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    raise
                self.while_full(self)


class LaneStream(Stream):
    """The interactive lane as a worker reads it. A worker started on a full Redis (OOM)
    cannot create the lane (XGROUP CREATE MKSTREAM grows memory) and must still drain its
    bulk streams: until the lane's group exists the lane is left out of reads, reclaims and
    own-pending reads, and creating it is tried again every ``REVIVE_S``."""

    def __init__(self, client: Any, stream: str, group: str, consumer: str) -> None:
        super().__init__(client, stream, group, consumer, online=True)
        self.available = True
        self._retry_at = 0.0

    def ensure_group(self) -> bool:
        try:
            created = super().ensure_group()
        except QueueFull as exc:
            if self.available:
                log.warning(
                    "online_lane_unavailable",
                    stream=self.keys.stream,
                    error=str(exc)[:200],
                    why="no online requests until Redis has room; bulk work goes on",
                )
            self.available, self._retry_at = False, time.monotonic() + REVIVE_S
            return False
        self.available = True
        return created

    def readable(self) -> bool:
        if not self.available and time.monotonic() >= self._retry_at:
            self.ensure_group()
        return self.available

    def read_own_pending(self, count: int, after: str = "0") -> list[Entry]:
        return super().read_own_pending(count, after) if self.readable() else []

    def autoclaim(self, min_idle_ms: int, cursor: str = "0-0", count: int = 100) -> Claimed:
        if not self.readable():
            return Claimed(cursor="0-0", entries=[], deleted_ids=[])
        return super().autoclaim(min_idle_ms, cursor, count)

    def delete_idle_consumers(self, min_idle_ms: int) -> list[str]:
        return super().delete_idle_consumers(min_idle_ms) if self.readable() else []


class OnlineLane:
    """The lane stream as a worker uses it: skip, answer, fail, poll."""

    def __init__(
        self,
        stream: Stream,
        in_flight: InFlight,
        retrying: Retrier,
        *,
        reply_ttl_ms: int,
        read_count: int,
        stop: threading.Event,
        stamp: Stamp,
    ) -> None:
        self.stream = stream
        self.stamp = stamp
        self.in_flight = in_flight
        self.retrying = retrying
        self.reply_ttl_ms = reply_ttl_ms
        self.read_count = read_count
        self.stop = stop
        self.batcher: Batcher | None = None  # set by LaneBatcher (the two refer to each other)
        self._reply = stream.client.register_script(load_script("lane_reply.lua"))

    def publish(self, ttl_s: float) -> None:
        """Say (for ``ttl_s``) that this worker serves the lane with its model: the
        gateway's ``/readyz`` and ``/v1/models`` count these records."""
        key = workers_key(self.stream.keys.stream)
        now = int(time.time() * 1000)
        pipe = self.stream.client.pipeline(transaction=False)
        pipe.zadd(key, {worker_member(self.stamp, self.stream.consumer): now + int(ttl_s * 1000)})
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.execute()

    def live(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries someone still waits for; the expired ones are acked unencoded."""
        late = [e for e in entries if expired(e.fields)]
        if late:
            self._send([], [], [e.entry_id for e in late])
            log.info("online_expired", count=len(late), why="the request's deadline passed")
        live = [e for e in entries if not expired(e.fields)]
        others = [e for e in live if not self.stamp.serves(e.fields)]
        if others:
            self._send(
                [reply_key(e.fields) for e in others],
                [pack_mismatch(self.stamp, index_of(e.fields)) for e in others],
                [e.entry_id for e in others],
            )
            log.info(
                "online_other_model",
                count=len(others),
                model=self.stamp.name,
                fingerprint=self.stamp.fingerprint,
                why="the request asks for another model; its gateway sends it again",
            )
            live = [e for e in live if self.stamp.serves(e.fields)]
        return live

    def answer(self, batch: Batch) -> None:
        """Send ``batch``'s vectors to their requests and ack its entries; the batch is left
        empty, so the writer has nothing of it to write."""
        if batch.vectors is None:
            return
        answers = [
            pack_reply(self.stamp, index_of(i.entry.fields), len(i.ids), v)
            for i, v in zip(batch.items, batch.vectors, strict=True)
        ]
        self._send(
            [reply_key(i.entry.fields) for i in batch.items],
            answers,
            [e.entry_id for i in batch.items for e in i.entries],
        )
        batch.items, batch.vectors = [], None

    def fail(self, item: Item, reason: str, error: str) -> None:
        """The model refused this text: tell its request (a 422), ack the entry."""
        message = f"{reason}: {error}"
        self._send(
            [reply_key(item.entry.fields)],
            [pack_failure(self.stamp, index_of(item.entry.fields), message)],
            [e.entry_id for e in item.entries],
        )

    def _send(self, keys: list[str], answers: list[bytes], entry_ids: list[str]) -> None:
        def call() -> Any:
            from embedq.queue.connection import translated

            with translated("answer online"):
                return self._reply(
                    keys=[self.stream.keys.stream, *keys],
                    args=[self.stream.group, self.reply_ttl_ms, *answers, *entry_ids],
                )

        self.retrying("answer online", call)
        self.in_flight.discard((self.stream.keys.stream, i) for i in entry_ids)

    def poll(self, inbox: Lanes) -> None:
        """Read what the lane holds now (no BLOCK) into ``inbox``: the reader calls this
        while it waits for room for a bulk batch."""
        if self.batcher is None or self.stop.is_set():
            time.sleep(POLL_S)
            return
        try:
            entries = self.stream.read_new(self.read_count, 0)
        except InfrastructureError as exc:
            # The reader's own retries will meet the outage; a bulk batch still goes on.
            log.warning("online_poll_failed", error=str(exc)[:200])
            time.sleep(POLL_S)
            return
        if not entries:
            return
        self.in_flight.add((self.stream.keys.stream, e.entry_id) for e in entries)
        for batch in self.batcher.batches(self.stream, entries):
            inbox.put(batch)


class LaneBatcher(Batcher):
    """The worker's batcher, with lane entries screened first (expired ones acked) and
    always truncated at the model's limit."""

    def __init__(self, lane: OnlineLane, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane = lane
        lane.batcher = self

    def batches(self, stream: Stream, entries: Sequence[Entry]) -> list[Batch]:
        if not stream.keys.online:
            return super().batches(stream, entries)
        live = self.lane.live(entries)
        # Single-threaded (the reader, or reclaim's one thread): swapping is safe.
        bulk, self.policy = self.policy, dataclasses.replace(self.policy, reject_overlong=False)
        try:
            return super().batches(stream, live)
        finally:
            self.policy = bulk


class OnlineEncoding(Encoding):
    """The model stage's work, with lane batches answered right after the forward pass."""

    def __init__(self, lane: OnlineLane, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane = lane

    def encode(self, batch: Batch, encoder: Encoder) -> None:
        super().encode(batch, encoder)
        if batch.online:
            self.lane.answer(batch)


def rejecting(lane: OnlineLane, reject: Reject) -> Reject:
    """``reject`` for bulk items; lane items get their error as the answer instead."""

    def route(item: Item, reason: str, error: str) -> None:
        if item.stream.keys.online:
            lane.fail(item, reason, error)
        else:
            reject(item, reason, error)

    return route
