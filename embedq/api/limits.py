"""Who may call, and how often: API keys and the per-key rate limit shared by every
gateway replica.

Keys come from ``EMBEDQ_API_KEYS`` (a comma-separated list, from a Secret in the chart);
they are compared in constant time and never logged: a key is named by a short digest.
With no keys configured every request is let in (the gateway says so loudly at start) and
the rate limit applies per client address instead.

The rate limit is a token bucket in Redis (``rate_limit.lua``): every gateway takes from
the same bucket, so N replicas do not give a key N times its rate. Refill and capacity:
``--rate-limit`` requests per second, bursts of ``--rate-burst`` (default: one second's
worth).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from embedq.api.requests import ApiError
from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.entries import load_script


def digest(secret: str) -> str:
    """A key's name in Redis and in logs: never the key itself."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


class Keyring:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def caller(self, authorization: str | None, address: str) -> str:
        """Who is calling (a key digest, or ``addr:<client>`` without auth); 401 for a
        missing or wrong key."""
        if not self.enabled:
            return f"addr:{address}"
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send Authorization: Bearer <key>",
                type="authentication_error",
                code="missing_api_key",
            )
        given = token.strip().encode("utf-8")
        # Every key compared, whatever matches first: the time says nothing about which.
        matched = [hmac.compare_digest(given, k) for k in self._keys]
        if not any(matched):
            raise ApiError(
                401, "invalid API key", type="authentication_error", code="invalid_api_key"
            )
        return digest(token.strip())


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after_s: int


class RateLimiter:
    def __init__(self, client: aioredis.Redis, stream: str, rate: float, burst: int) -> None:
        self.client = client
        self.keys = Keys(stream)
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self._take = client.register_script(load_script("rate_limit.lua"))

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def take(self, caller: str) -> Decision:
        """One request's token from ``caller``'s bucket."""
        if not self.enabled:
            return Decision(True, self.burst, 0)
        bucket = self.keys.rate_limit(digest(caller))
        with translated("rate limit"):
            reply: Any = await self._take(keys=[bucket], args=[self.rate, self.burst, 1])
        allowed, left, wait_ms = int(reply[0]), float(reply[1]), int(reply[2])
        return Decision(bool(allowed), int(left), max(1, math.ceil(wait_ms / 1000)))

    async def check(self, caller: str) -> dict[str, str]:
        """The rate-limit headers of an allowed request; 429 with Retry-After otherwise."""
        decision = await self.take(caller)
        headers = {}
        if self.enabled:
            headers = {
                "x-ratelimit-limit-requests": str(self.burst),
                "x-ratelimit-remaining-requests": str(decision.remaining),
            }
        if not decision.allowed:
            raise ApiError(
                429,
                f"rate limit reached: {self.rate:g} requests per second for this key; "
                f"retry after {decision.retry_after_s} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={**headers, "retry-after": str(decision.retry_after_s)},
            )
        return headers
