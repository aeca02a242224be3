"""Connecting to Redis (one server, or any node of a Redis Cluster) and translating
redis-py's exceptions into embedq's errors, without a URL or a secret in any message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis

from embedq.core.errors import ConfigError, QueueFull, QueueUnavailable


class RedisRefused(ConfigError):
    """What answers at the Redis URL refused to work with us, in a way only the operator can
    fix: credentials, ACL permissions, cluster mode, a server that is not Redis, a database
    number it does not have. A type of its own so that the CLI can add the address."""


def connect(
    url: str, *, block_ms: int = 2000, cluster: bool = False, socket_timeout_s: float = 0
) -> redis.Redis:
    """A client for ``url`` (redis:// or rediss://) whose socket timeout outlasts a BLOCK.

    With ``cluster`` the URL names any node of a Redis Cluster and the client follows the
    slots. ``RedisCluster`` has the same command methods; it is typed as ``Redis`` so that
    one ``Stream`` serves both, and the few cluster-only paths test ``is_cluster``.
    ``socket_timeout_s`` overrides the timeout for a client that never blocks: probes and
    the exporter's sampler give up on a frozen Redis within it.
    """
    timeout_s = socket_timeout_s or block_ms / 1000 + 10
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": min(5, timeout_s),
    }
    if cluster:
        with translated("cluster discovery"):
            return cast(redis.Redis, redis.RedisCluster.from_url(url, **options))
    return redis.Redis.from_url(url, health_check_interval=30, **options)


def is_cluster(client: redis.Redis) -> bool:
    return isinstance(client, redis.RedisCluster)


# Replies that mean "not now": a replica still loading its dataset (LOADING, a
# ConnectionError subclass), a master that lost its link (MASTERDOWN), a cluster that is
# resharding or failing over (CLUSTERDOWN, TRYAGAIN). redis-py parses each into its own
# type, with the code stripped from the message, so the type is what tells.
_NOT_READY = (
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ClusterDownError,  # MasterDownError is one too
    redis.exceptions.TryAgainError,
)


def _why(exc: Exception) -> str:
    """What went wrong in a connection error, in a few words: redis-py's messages name the
    address only for some failures, so the address is left to the caller (the CLI adds
    ``Settings.redis_address``) and the reason is kept short and free of it."""
    text = str(exc).lower()
    for marker, why in (
        ("refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("temporary failure in name resolution", "unknown host"),
        ("no route to host", "no route to host"),
        ("network is unreachable", "network unreachable"),
        ("closed by server", "the server closed the connection (is it a Redis server?)"),
        ("reset by peer", "the server closed the connection (is it a Redis server?)"),
        ("broken pipe", "the server closed the connection (is it a Redis server?)"),
        ("timeout", "timed out"),
        ("timed out", "timed out"),
    ):
        if marker in text:
            return why
    return "timed out" if isinstance(exc, redis.TimeoutError) else type(exc).__name__


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn redis-py's exceptions into ``QueueUnavailable`` (retry later) or ``ConfigError``
    (credentials, permissions, cluster mode, a server that is not Redis, a database number
    it does not have), by type; no URL, no secrets in messages."""
    try:
        yield
    except redis.AuthenticationError:
        # Before ConnectionError, its base class: a wrong password is not an outage to retry.
        raise RedisRefused(
            "redis rejected the credentials (check the password or ACL user)"
        ) from None
    except redis.exceptions.OutOfMemoryError:
        # maxmemory with noeviction (what docs/operations.md recommends): writes that would grow
        # Redis are refused until memory is freed; reads, acks and deletes still work.
        raise QueueFull(
            f"redis is out of memory during {action} (maxmemory reached, noeviction): "
            "free memory (embedq trim, a larger maxmemory) and embedq resumes"
        ) from None
    except _NOT_READY as exc:
        raise QueueUnavailable(f"redis not ready during {action}: {type(exc).__name__}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailable(f"redis unavailable during {action}: {_why(exc)}") from None
    except redis.exceptions.InvalidResponse:
        # Something answered, but not in Redis's protocol: an HTTP or PostgreSQL port.
        raise RedisRefused(
            f"the server does not speak the Redis protocol (during {action}): "
            "is the URL's port a Redis server's?"
        ) from None
    except redis.exceptions.NoPermissionError:
        # redis-py strips the NOPERM prefix from the message; the class is what tells.
        raise RedisRefused(
            f"redis refused {action}: NOPERM (the ACL user lacks a command or key permission)"
        ) from None
    except (redis.exceptions.MovedError, redis.exceptions.AskError):
        # Only a plain client sees these; the cluster client follows them.
        raise RedisRefused(
            f"redis answered MOVED during {action}: the server is a Redis Cluster node; "
            "pass --redis-cluster (EMBEDQ_REDIS_CLUSTER=1)"
        ) from None
    except redis.exceptions.RedisClusterException as exc:
        if "not enabled" in str(exc):  # "Cluster mode is not enabled on this node"
            raise RedisRefused(
                "--redis-cluster is set but the server is not in cluster mode"
            ) from None
        raise QueueUnavailable(f"redis cluster unavailable during {action}") from None
    except redis.ResponseError as exc:
        if "db index is out of range" in str(exc).lower():
            # The SELECT that opens every connection: the URL's /N is beyond `databases`.
            raise RedisRefused(
                "redis has no database with the URL's number (DB index is out of range: "
                "the server's `databases` setting, 16 by default, limits it); end the URL "
                "with /0"
            ) from None
        raise
