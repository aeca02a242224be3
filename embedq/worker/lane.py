"""A worker's side of the interactive lane: online requests go ahead of the bulk backlog.

The lane (``embedq.core.keys.lane_stream``, entries in ``embedq.queue.online_wire``'s
format) is one more stream the worker reads, first: one XREADGROUP blocks on the lane and
the bulk streams together, so an idle worker wakes for a query at once. ``OnlineLane`` is
everything the worker does differently for it, one object the worker composes (the batcher
screens lane entries with it, the model stage encodes through it). A query never waits for
a bulk batch:

* lane batches have a model thread of their own, with an encoder of its own
  (``Encoder.replica()``: the same weights, and on CUDA its own stream), so they never
  queue behind a bulk batch or a bulk forward pass. They wait in the model stage's
  ``Inbox`` beside the bulk batches, never for room and taken first: the lane's thread
  takes lane batches only, a bulk replica between two bulk batches takes either (so on an
  idle fleet every replica answers queries);
* on a CPU the two would fight for the same cores (torch's intra-op threads): while the
  lane's thread runs a forward pass, one bulk replica (the *seat*) steps aside at its next
  checkpoint, a forward pre-hook on each of the model's linear layers (``Gate``), and goes
  on once the lane's pass is over. An idle lane costs the bulk replicas one attribute read
  per layer; on CUDA nothing steps aside (the GPU interleaves the two streams);
* while the bulk inbox is full the reader is not blocked in XREADGROUP but waiting for
  room: ``OnlineLane.poll`` reads the lane alone meanwhile, blocking up to
  ``LANE_BLOCK_MS`` (a query wakes it at once), then the reader looks for room again;
* the answer is sent by the lane's model thread right after the forward pass, not behind
  the writer's Milvus upserts.

An answer is one script call (``lane_reply.lua``): the vectors onto the request's reply
list and the XACK together. Online entries never reach Milvus; an expired one (its
``deadline_ms`` passed: the gateway answered 503) is acked without encoding; a text the
model refuses is answered with the error, not dead-lettered. Lane entries are always
truncated at the model's limit, whatever ``--on-overlong`` says for bulk entries.

Every answer carries the worker's model identity (``Stamp``: name and fingerprint). An
entry that asks for another model (its ``model`` field: during a rollout two models serve
one lane) is answered ``MISMATCH`` at once, unencoded, and acked: the gateway sends it
again for a worker of its model, and never returns another model's vector.

A worker started on a full Redis (OOM) cannot create the lane (XGROUP CREATE MKSTREAM
grows memory) and must still drain its bulk streams: until the lane's group exists the
lane is left out of reads, reclaims and own-pending reads (``OnlineLane.readable``), and
creating it is tried again every ``REVIVE_S``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

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
from embedq.queue.stream import Stream
from embedq.worker.heartbeat import InFlight
from embedq.worker.pipeline import END, Batch, Item, Stage

log = structlog.get_logger("embedq.worker.lane")

POLL_S = 0.01  # a reader waiting for room waits this long for it between two lane reads
# A lane read by a reader waiting for room blocks this long: a query wakes it at once, and
# a reader that woke 100 times a second to look cost a drain on a loaded CPU its share.
# Short against the bulk inbox's work (QUEUE_BATCHES batches), so room is taken soon.
LANE_BLOCK_MS = 50
REVIVE_S = 5.0  # how often a worker retries creating a lane a full Redis refused
# The longest a bulk forward pass waits at one checkpoint for the lane: a lane busy without
# a pause (a flood of queries) slows the seat replica down, it never stalls it (the
# watchdog would call a stalled stage stuck).
MAX_PAUSE_S = 1.0

Reject = Callable[[Item, str, str], None]
Encode = Callable[[Batch, Encoder], None]
Batches = Callable[[Stream, Sequence[Entry]], list[Batch]]


class Takes(Protocol):
    """What a model thread takes batches from: a ``queue.Queue``, or an ``Inbox``."""

    def get(self, block: bool = True, timeout: float | None = None) -> Stage: ...

    def put(self, item: Stage, block: bool = True, timeout: float | None = None) -> None: ...

    def qsize(self) -> int: ...


class Inbox:
    """The model stage's inbox with the lane: bulk batches (and ``END``) wait for room, at
    most ``maxsize``; lane batches never do (the lane's read count bounds them) and are
    taken first. ``lane_only()`` is the lane thread's view: lane batches, and ``END`` once
    the reader put it."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._bulk: deque[Stage] = deque()
        self._lane: deque[Stage] = deque()
        self._cond = threading.Condition()

    def qsize(self) -> int:
        return len(self._bulk) + len(self._lane)

    def put(self, item: Stage, block: bool = True, timeout: float | None = None) -> None:
        with self._cond:
            if isinstance(item, Batch) and item.online:
                self._lane.append(item)
            elif self._cond.wait_for(lambda: len(self._bulk) < self.maxsize, timeout):
                self._bulk.append(item)
            else:
                raise queue.Full
            self._cond.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Stage:
        return self._take(timeout, lane_only=False)

    def lane_only(self) -> Takes:
        return _LaneView(self)

    def _take(self, timeout: float | None, *, lane_only: bool) -> Stage:
        def ready() -> bool:
            if self._lane:
                return True
            return any(x is END for x in self._bulk) if lane_only else bool(self._bulk)

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise queue.Empty
            if self._lane:
                found = self._lane.popleft()
            elif lane_only:
                return END  # the reader's; left for the bulk replicas to see
            else:
                found = self._bulk.popleft()
            self._cond.notify_all()
            return found


class _LaneView:
    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def get(self, block: bool = True, timeout: float | None = None) -> Stage:
        return self._inbox._take(timeout, lane_only=True)

    def put(self, item: Stage, block: bool = True, timeout: float | None = None) -> None:
        if item is not END:  # END stays where the reader put it
            self._inbox.put(item, block, timeout)

    def qsize(self) -> int:
        return self._inbox.qsize()


_yielding = threading.local()  # .gate: the Gate the calling thread's bulk pass steps aside for


def _checkpoint(_module: Any, _args: Any) -> None:
    """A forward pre-hook: a bulk pass inside ``Gate.yielding`` waits here while the lane's
    thread runs a forward pass; any other pass (the lane's own, other replicas) goes on."""
    gate: Gate | None = getattr(_yielding, "gate", None)
    if gate is not None and gate.busy:
        gate.wait()


class Gate:
    """Who steps aside on a CPU while the lane's thread runs a forward pass: the *seat*, one
    bulk replica (the last), so the lane's threads get the cores its threads had. None of
    it on CUDA or with the ONNX backend (no torch modules to hook): there ``seat`` is None.
    """

    def __init__(self, seat: Encoder | None) -> None:
        self.seat = seat
        self.busy = 0  # lane forward passes running now
        self.waiting = 0  # bulk passes stepping aside now
        self._cond = threading.Condition()
        if seat is not None:
            install_checkpoints(seat.model)

    @classmethod
    def for_replicas(cls, bulk: Sequence[Encoder]) -> Gate:
        seat = bulk[-1]
        on_cpu = seat.device == "cpu" and seat.backend == "torch"
        return cls(seat if on_cpu else None)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """The lane's forward pass: the seat waits at its next checkpoint until it ends."""
        with self._cond:
            self.busy += 1
        try:
            yield
        finally:
            with self._cond:
                self.busy -= 1
                if not self.busy:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def yielding(self, encoder: Encoder) -> Iterator[None]:
        """A bulk pass on ``encoder``: it steps aside for the lane if ``encoder`` is the seat."""
        if encoder is not self.seat:
            yield
            return
        _yielding.gate = self
        try:
            yield
        finally:
            _yielding.gate = None

    def wait(self) -> None:
        with self._cond:
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: not self.busy, timeout=MAX_PAUSE_S)
            finally:
                self.waiting -= 1


def install_checkpoints(model: Any) -> None:
    """A checkpoint before each linear layer of ``model`` (shared by every replica),
    installed once per model however many workers use it: a long bulk pass is cut into
    slices of one matrix product each, a few tens per pass."""
    import torch

    if getattr(model, "_embedq_checkpoints", False):
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(_checkpoint)
    model._embedq_checkpoints = True


class OnlineLane:
    """The lane as a worker runs it: screen, encode, answer, fail, poll, publish."""

    def __init__(
        self,
        stream: Stream,
        encoder: Encoder,
        gate: Gate,
        in_flight: InFlight,
        retrying: Retrier,
        *,
        reply_ttl_ms: int,
        read_count: int,
        stop: threading.Event,
        stamp: Stamp,
    ) -> None:
        self.stream = stream
        self.encoder = encoder  # the lane's own replica, for its own model thread
        self.gate = gate
        self.stamp = stamp
        self.in_flight = in_flight
        self.retrying = retrying
        self.reply_ttl_ms = reply_ttl_ms
        self.read_count = read_count
        self.stop = stop
        self.available = True
        self._retry_at = 0.0
        stream.usable = self.readable  # reads, reclaims and tidying skip a lane not there
        self._reply = stream.client.register_script(load_script("lane_reply.lua"))

    # -- the group ---------------------------------------------------------------------

    def ensure_group(self) -> bool:
        """Create the lane's group; on a full Redis, leave the lane out for now."""
        try:
            created = self.stream.ensure_group()
        except QueueFull as exc:
            if self.available:
                log.warning(
                    "online_lane_unavailable",
                    stream=self.stream.keys.stream,
                    error=str(exc)[:200],
                    why="no online requests until Redis has room; bulk work goes on",
                )
            self.available, self._retry_at = False, time.monotonic() + REVIVE_S
            return False
        self.available = True
        return created

    def readable(self) -> bool:
        """Whether reads, reclaims and own-pending reads may include the lane now."""
        if not self.available and time.monotonic() >= self._retry_at:
            self.ensure_group()
        return self.available

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

    # -- the batcher's side ------------------------------------------------------------

    def live(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries someone still waits for, for this worker's model; the expired ones
        are acked unencoded, the other model's answered ``MISMATCH``."""
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

    def rejecting(self, reject: Reject) -> Reject:
        """``reject`` for bulk items; lane items get their error as the answer instead."""

        def route(item: Item, reason: str, error: str) -> None:
            if item.stream.keys.online:
                self.fail(item, reason, error)
            else:
                reject(item, reason, error)

        return route

    # -- the model stage's side --------------------------------------------------------

    def encode(self, batch: Batch, encoder: Encoder, encode: Encode) -> None:
        """``encode(batch, encoder)``: a lane batch with the seat stepping aside, answered
        right after; a bulk batch stepping aside itself if ``encoder`` is the seat."""
        if not batch.online:
            with self.gate.yielding(encoder):
                encode(batch, encoder)
            return
        with self.gate.serving():
            encode(batch, encoder)
        self.answer(batch)

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

    # -- the reader's side -------------------------------------------------------------

    def poll(self, batches: Batches, inbox: Takes) -> None:
        """Read the lane (waiting up to ``LANE_BLOCK_MS`` for an entry), batch what came
        with ``batches`` into ``inbox``: the reader calls this while it waits for room for
        a bulk batch."""
        if self.stop.is_set() or not self.readable():
            time.sleep(POLL_S)
            return
        try:
            entries = self.stream.read_new(self.read_count, LANE_BLOCK_MS)
        except InfrastructureError as exc:
            # The reader's own retries will meet the outage; a bulk batch still goes on.
            log.warning("online_poll_failed", error=str(exc)[:200])
            time.sleep(POLL_S)
            return
        if not entries:
            return
        self.in_flight.add((self.stream.keys.stream, e.entry_id) for e in entries)
        for batch in batches(self.stream, entries):
            inbox.put(batch)
