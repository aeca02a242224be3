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
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from embedq.api.requests import ApiError
from embedq.core.errors import ConfigError
from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.entries import load_script


def digest(secret: str) -> str:
    """A key's name in Redis and in logs: never the key itself."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Tenant:
    """What ``EMBEDQ_API_KEYS_FILE`` says of one key: its name (in logs and metrics, never
    the key), its own rate limit (0: the gateway's), and the filter every search it makes
    is confined to (ANDed around the client's, server-side; "": unscoped)."""

    name: str
    rate_limit: float = 0.0
    rate_burst: int = 0
    filter: str = ""


def load_keys_file(path: str) -> dict[str, Tenant]:
    """``{key: Tenant}`` from a JSON file: ``[{"key": …, "name": …, "rate_limit": …,
    "rate_burst": …, "filter": …}, …]``; a one-line ``ConfigError`` (never the key) when
    it cannot be read."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"EMBEDQ_API_KEYS_FILE {path}: cannot read it ({type(exc).__name__})"
        ) from None
    if not isinstance(entries, list):
        raise ConfigError(f"EMBEDQ_API_KEYS_FILE {path}: expected a JSON list of keys")
    found: dict[str, Tenant] = {}
    for n, entry in enumerate(entries):
        where = f"EMBEDQ_API_KEYS_FILE {path}, entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ConfigError(f'{where}: needs a "key" string')
        key, name = entry["key"].strip(), entry.get("name")
        if not key or not isinstance(name, str) or not name.strip():
            raise ConfigError(f'{where}: needs a non-empty "key" and "name"')
        try:
            tenant = Tenant(
                name.strip(),
                float(entry.get("rate_limit", 0) or 0),
                int(entry.get("rate_burst", 0) or 0),
                str(entry.get("filter", "") or "").strip(),
            )
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: rate_limit and rate_burst must be numbers") from None
        found[key] = tenant
    return found


class Keyring:
    def __init__(self, keys: tuple[str, ...], tenants: dict[str, Tenant] | None = None) -> None:
        tenants = tenants or {}
        everything = list(dict.fromkeys([*keys, *tenants]))
        self._keys = [k.encode("utf-8") for k in everything]
        # By digest: a caller's tenant (keys from EMBEDQ_API_KEYS: their digest as name).
        self.tenants = {digest(k): tenants.get(k) or Tenant(digest(k)) for k in everything}

    def tenant(self, caller: str) -> Tenant | None:
        """The tenant a ``caller`` (``caller()``'s answer) is; None without auth."""
        return self.tenants.get(caller)

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

    async def take(self, caller: str, rate: float = 0.0, burst: int = 0) -> Decision:
        """One request's token from ``caller``'s bucket (``rate``/``burst``: the key's
        own, else the gateway's)."""
        rate = rate or self.rate
        burst = burst or (max(1, math.ceil(rate)) if rate != self.rate else self.burst)
        if rate <= 0:
            return Decision(True, burst, 0)
        bucket = self.keys.rate_limit(digest(caller))
        with translated("rate limit"):
            reply: Any = await self._take(keys=[bucket], args=[rate, burst, 1])
        allowed, left, wait_ms = int(reply[0]), float(reply[1]), int(reply[2])
        return Decision(bool(allowed), int(left), max(1, math.ceil(wait_ms / 1000)))

    async def check(self, caller: str, tenant: Tenant | None = None) -> dict[str, str]:
        """The rate-limit headers of an allowed request; 429 with Retry-After otherwise."""
        rate = (tenant.rate_limit if tenant else 0.0) or self.rate
        burst = (tenant.rate_burst if tenant else 0) or (
            max(1, math.ceil(rate)) if rate != self.rate else self.burst
        )
        decision = await self.take(caller, rate, burst)
        headers = {}
        if rate > 0:
            headers = {
                "x-ratelimit-limit-requests": str(burst),
                "x-ratelimit-remaining-requests": str(decision.remaining),
            }
        if not decision.allowed:
            raise ApiError(
                429,
                f"rate limit reached: {rate:g} requests per second for this key; "
                f"retry after {decision.retry_after_s} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={**headers, "retry-after": str(decision.retry_after_s)},
            )
        return headers
