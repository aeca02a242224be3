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
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import structlog

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.queue.connection import translated
from embedq.queue.online_wire import Answer, entry_fields, now_ms, unpack_reply

log = structlog.get_logger("embedq.api")

TRIM_AFTER_DEADLINES = 2  # lane entries older than this many timeouts are trimmed
# One BLMPOP waits at most this long, well inside the client's socket timeout; the loop
# waits again until the deadline.
WAIT_STEP_S = 2.0
SOCKET_TIMEOUT_S = 10.0


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
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
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
            for raw in got[1] if got else ():
                answer = unpack_reply(raw)
                answers[answer.index] = answer
        return [answers[i] for i in range(len(texts))]

    async def _enqueue(
        self, request_id: str, texts: list[str], reply: str, deadline_ms: int
    ) -> None:
        oldest = now_ms() - int(TRIM_AFTER_DEADLINES * self.timeout_s * 1000)
        pipe = self.client.pipeline(transaction=False)
        for index, text in enumerate(texts):
            fields: Any = entry_fields(request_id, index, text, reply, deadline_ms)
            if index == 0:
                pipe.xadd(self.keys.stream, fields, minid=str(oldest), approximate=True)
            else:
                pipe.xadd(self.keys.stream, fields)
        with translated("XADD lane"):
            await pipe.execute()

    async def ping(self) -> None:
        with translated("PING"):
            await self.client.ping()
