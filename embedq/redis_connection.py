"""Connecting to Redis (one server, or any node of a Redis Cluster) and translating
redis-py's exceptions into embedq's errors, without a URL or a secret in any message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import redis

from embedq.errors import ConfigError, QueueUnavailable


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


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn redis-py's exceptions into ``QueueUnavailable`` (retry later) or ``ConfigError``
    (credentials, permissions, cluster mode), by type; no URL, no secrets in messages."""
    try:
        yield
    except redis.AuthenticationError:
        # Before ConnectionError, its base class: a wrong password is not an outage to retry.
        raise ConfigError(
            "redis rejected the credentials (check the password or ACL user)"
        ) from None
    except _NOT_READY as exc:
        raise QueueUnavailable(f"redis not ready during {action}: {type(exc).__name__}") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailable(f"redis unavailable during {action}: {type(exc).__name__}") from None
    except redis.exceptions.NoPermissionError:
        # redis-py strips the NOPERM prefix from the message; the class is what tells.
        raise ConfigError(
            f"redis refused {action}: NOPERM (the ACL user lacks a command or key permission)"
        ) from None
    except (redis.exceptions.MovedError, redis.exceptions.AskError):
        # Only a plain client sees these; the cluster client follows them.
        raise ConfigError(
            f"redis answered MOVED during {action}: the server is a Redis Cluster node; "
            "pass --redis-cluster (EMBEDQ_REDIS_CLUSTER=1)"
        ) from None
    except redis.exceptions.RedisClusterException as exc:
        if "not enabled" in str(exc):  # "Cluster mode is not enabled on this node"
            raise ConfigError(
                "--redis-cluster is set but the server is not in cluster mode"
            ) from None
        raise QueueUnavailable(f"redis cluster unavailable during {action}") from None
