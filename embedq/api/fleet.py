"""The gateway's way through the fleet: a request's inputs onto the interactive lane, its
answers from its reply list.

``Fleet.embed`` adds one lane entry per input (``embedq.queue.online_wire``: text, reply key, index,
deadline) in one pipelined round trip, then pops answers from the request's reply list
(BLMPOP) until it has them all or the deadline passes. Past the deadline it raises
``DeadlineExceeded`` (the gateway's 503): a worker that picks an entry up later sees the
deadline and acks it unencoded, and an answer that still comes lands on a list nobody
reads, which expires. Entries older than any deadline are trimmed from the lane as new
ones are added (``XADD … MINID ~``), so the lane never grows without bound, with or
without workers.

One model per answer: each entry names the model this gateway serves (``ModelIdentity``),
and each answer the model that made it. An answer of another model (a worker of the old
or the new model during a rollout, answering ``MISMATCH`` or an old-style vector) is
discarded and its input sent again, after a short backoff, until a worker of this model
answers or the deadline passes; it is never returned.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import structlog

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.model.identity import ModelIdentity
from embedq.queue.connection import translated
from embedq.queue.online_wire import (
    Answer,
    entry_fields,
    now_ms,
    parse_member,
    unpack_reply,
    workers_key,
)

log = structlog.get_logger("embedq.api")

TRIM_AFTER_DEADLINES = 2  # lane entries older than this many timeouts are trimmed
# One BLMPOP waits at most this long, well inside the client's socket timeout; the loop
# waits again until the deadline.
WAIT_STEP_S = 2.0
SOCKET_TIMEOUT_S = 10.0
RESEND_BACKOFF_S = (0.002, 0.25)  # first and longest wait before sending an input again


class DeadlineExceeded(Exception):
    """No worker answered every input in time."""

    def __init__(self, answered: int, asked: int) -> None:
        super().__init__(f"{answered} of {asked} inputs answered before the deadline")
        self.answered, self.asked = answered, asked


def connect_async(settings: Settings) -> aioredis.Redis:
    """An asyncio Redis client for ``settings.redis_url`` (one server or a cluster)."""
    if settings.redis_cluster:
        cluster: aioredis.Redis = aioredis.RedisCluster.from_url(  # type: ignore[assignment]
            settings.redis_url, socket_timeout=SOCKET_TIMEOUT_S
        )
        return cluster  # typed as Redis: the commands used are common to both
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30
    )


class Fleet:
    def __init__(self, client: aioredis.Redis, settings: Settings, identity: ModelIdentity) -> None:
        self.client = client
        self.identity = identity
        self.resent = 0  # inputs sent again because another model answered (a counter)
        self.keys = Keys(lane_stream(Keys(settings.stream).base), online=True)
        self.group = settings.group
        self.timeout_s = settings.api_timeout_s

    async def ensure_group(self) -> None:
        """Create the lane and its group at 0 (workers do too; whoever comes first)."""
        with translated("XGROUP CREATE lane"):
            try:
                await self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
            except aioredis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def embed(self, texts: list[str]) -> list[Answer]:
        """Every input's answer, in order; ``DeadlineExceeded`` when the fleet is too slow."""
        request_id = uuid.uuid4().hex
        reply = self.keys.reply(request_id)
        deadline = time.monotonic() + self.timeout_s
        deadline_ms = now_ms() + int(self.timeout_s * 1000)
        await self._enqueue(request_id, texts, reply, deadline_ms)
        answers: dict[int, Answer] = {}
        backoff, others = RESEND_BACKOFF_S[0], 0
        while len(answers) < len(texts):
            left = deadline - time.monotonic()
            if left < 0.001:  # BLMPOP 0 would block forever
                raise DeadlineExceeded(len(answers), len(texts))
            with translated("BLMPOP reply"):
                got: Any = await self.client.blmpop(
                    min(left, WAIT_STEP_S),
                    1,
                    reply,
                    direction="LEFT",
                    count=len(texts) - len(answers),
                )
            resend: list[int] = []
            for raw in got[1] if got else ():
                answer = unpack_reply(raw)
                if answer.index in answers or not 0 <= answer.index < len(texts):
                    continue
                if answer.mismatch or not self.identity.accepts(answer.model, answer.fingerprint):
                    resend.append(answer.index)
                    continue
                answers[answer.index] = answer
            if resend:
                if not others:
                    log.info(
                        "api_other_model_answered",
                        model=self.identity.name,
                        fingerprint=self.identity.fingerprint,
                        other=unpack_reply(got[1][0]).model,
                        why="another model's worker took the input; sent again",
                    )
                others += len(resend)
                self.resent += len(resend)
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, RESEND_BACKOFF_S[1])
                await self._enqueue(request_id, texts, reply, deadline_ms, resend)
        return [answers[i] for i in range(len(texts))]

    async def _enqueue(
        self,
        request_id: str,
        texts: list[str],
        reply: str,
        deadline_ms: int,
        indexes: list[int] | None = None,
    ) -> None:
        oldest = now_ms() - int(TRIM_AFTER_DEADLINES * self.timeout_s * 1000)
        model = (self.identity.name, self.identity.fingerprint)
        pipe = self.client.pipeline(transaction=False)
        for n, index in enumerate(range(len(texts)) if indexes is None else indexes):
            fields: Any = entry_fields(
                request_id, index, texts[index], reply, deadline_ms, model=model
            )
            if n == 0:
                pipe.xadd(self.keys.stream, fields, minid=str(oldest), approximate=True)
            else:
                pipe.xadd(self.keys.stream, fields)
        with translated("XADD lane"):
            await pipe.execute()

    async def workers(self) -> tuple[int, dict[str, int]]:
        """How many live workers serve this gateway's model on the lane, and how many serve
        each other model (by name) there: what workers published (``workers_key``)."""
        with translated("ZRANGE workers"):
            members: list[bytes] = await self.client.zrangebyscore(  # type: ignore[assignment]
                workers_key(self.keys.stream), now_ms(), "+inf"
            )
        mine, others = 0, dict[str, int]()
        for raw in members:
            fingerprint, _consumer, name = parse_member(raw.decode("utf-8", "replace"))
            if self.identity.accepts(name, fingerprint):
                mine += 1
            else:
                others[name] = others.get(name, 0) + 1
        return mine, others

    async def ping(self) -> None:
        with translated("PING"):
            await self.client.ping()
