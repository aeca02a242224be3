"""Translating pymilvus and grpc exceptions into embedq's errors, where they enter embedq.

By type and error code: ``SinkUnavailable`` (retry later: Milvus unreachable, timing out,
over a rate limit or quota), ``SinkRejected`` (the request itself is wrong) or
``ConfigError`` (credentials, a Milvus Lite file another process holds). The message decides
only where the code says nothing. No message carries the token or the URI's password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from embedq.core.errors import (
    CollectionMissing,
    ConfigError,
    EmbedqError,
    SinkRejected,
    SinkUnavailable,
)

# Milvus's error codes (MilvusException.code; the server's table is milvus-io/milvus
# pkg/util/merr/errors.go) that retrying later can fix: the service is starting or
# unavailable, a collection or replica is still loading or recovering, or a limit is hit
# (rate, requests, memory, disk, quota, resources). Quotas and limits lift with time,
# compaction or an operator, not by changing the request, so they are not SinkRejected.
_RETRYABLE_CODES = frozenset(
    {
        2,  # ErrServiceUnavailable (pymilvus's own Status.CONNECT_FAILED too)
        3,  # ErrServiceMemoryLimitExceeded
        4,  # ErrServiceRequestLimitExceeded
        7,  # ErrServiceDiskLimitExceeded
        8,  # ErrServiceRateLimit (pymilvus ErrorCode.RATE_LIMIT)
        9,  # ErrServiceQuotaExceeded (pymilvus ErrorCode.FORCE_DENY: writes denied by quota)
        11,  # ErrServiceTimeTickLongDelay
        12,  # ErrServiceResourceInsufficient
        103,  # ErrCollectionNotFullyLoaded
        106,  # ErrCollectionOnRecovering
        202,  # ErrPartitionNotFullyLoaded
        401,  # ErrReplicaNotAvailable
        503,  # ErrChannelNotAvailable
        1807,  # ErrHTTPRateLimit
        10000,  # CanceledCode: the server's context was cancelled
        10001,  # TimeoutCode: the server's context timed out
    }
)
_AUTH_CODES = frozenset(
    {
        1400,  # ErrPrivilegeNotAuthenticated
        1401,  # ErrPrivilegeNotPermitted
        1800,  # ErrNeedAuthenticate
    }
)
# Codes that say nothing about the failure: pymilvus raises its client-side errors (retry
# timeouts, wrapped transport errors) with ErrorCode.UNEXPECTED_ERROR (1, which is also
# merr's ErrServiceNotReady), and the server's catch-all is 65535. Only for these does the
# message decide (_UNAVAILABLE_MARKERS, _AUTH_MARKERS).
_UNINFORMATIVE_CODES = frozenset({1, 65535})
# Milvus 2.2-era servers send only the legacy common.ErrorCode (MilvusException.
# compatible_code), by name here since the numbers are a protobuf enum's.
_RETRYABLE_LEGACY = frozenset(
    {
        "RateLimit",
        "ForceDeny",
        "MemoryQuotaExhausted",
        "DiskQuotaExhausted",
        "TimeTickLongDelay",
        "NotReadyServe",
        "NotReadyCoordActivating",
        "InsufficientMemoryToLoad",
        "ConnectFailed",
    }
)
# gRPC status codes (on a grpc.RpcError, or as the code of the MilvusException pymilvus
# raises after its own retries run out).
_RETRYABLE_GRPC = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
)
_AUTH_GRPC = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})

_UNAVAILABLE_MARKERS = (
    "fail connecting",
    "unavailable",
    "deadline",
    "timeout",
    "timed out",
    "connection",
    "not ready",
    "closed channel",
    "rate limit",
    "server is not",
    "shutting down",
    # Milvus Lite (code 1): a write that raced a rename of its collection (``migrate
    # --adopt``) met the old name's closed log; sent again, it reaches the renamed one.
    "wal already closed",
)
_AUTH_MARKERS = ("auth", "token", "permission", "privilege")


def _grpc_code_name(exc: BaseException) -> str:
    """The gRPC status name of a ``grpc.RpcError`` (``""`` for anything else)."""
    code = getattr(exc, "code", None)
    if callable(code) and type(exc).__module__.startswith("grpc"):
        return str(getattr(code(), "name", ""))
    return ""


def _refused_credentials(exc: BaseException) -> bool:
    """True when a gRPC error under ``exc`` says UNAUTHENTICATED or PERMISSION_DENIED.

    pymilvus reports a wrong token at connect time as "Fail connecting to server ...
    illegal connection params or server unavailable" (seen with Milvus 2.3.5 and
    authorization on); only the gRPC status in its cause tells it from an outage.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _grpc_code_name(cause) in _AUTH_GRPC:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _kind(exc: Any) -> type[EmbedqError]:
    """What a ``MilvusException`` means: by its code, legacy code or retriable flag, and by
    its message only when its code says nothing (``_UNINFORMATIVE_CODES``)."""
    code = exc.code
    grpc_name = "" if isinstance(code, int) else str(getattr(code, "name", ""))
    legacy = _legacy_code_name(getattr(exc, "compatible_code", None))
    if (
        code in _AUTH_CODES
        or grpc_name in _AUTH_GRPC
        or legacy == "PermissionDenied"
        or _refused_credentials(exc)
    ):
        return ConfigError
    if (
        code in _RETRYABLE_CODES
        or grpc_name in _RETRYABLE_GRPC
        or legacy in _RETRYABLE_LEGACY
        or getattr(exc, "retriable", False)  # the server's own word (newer pymilvus)
    ):
        return SinkUnavailable
    if grpc_name or (isinstance(code, int) and code not in _UNINFORMATIVE_CODES):
        return SinkRejected
    message = str(getattr(exc, "message", "") or exc).lower()
    if any(marker in message for marker in _AUTH_MARKERS):
        return ConfigError
    if any(marker in message for marker in _UNAVAILABLE_MARKERS):
        return SinkUnavailable
    return SinkRejected


def _collection_missing(exc: Any, message: str) -> bool:
    """merr's ErrCollectionNotFound (100), the legacy CollectionNotExists, or (Milvus Lite,
    2.3.5) only the message."""
    legacy = _legacy_code_name(getattr(exc, "compatible_code", None))
    text = message.lower()
    return (
        exc.code == 100
        or legacy == "CollectionNotExists"
        or "collection not found" in text
        or "can't find collection" in text
    )


def _legacy_code_name(code: Any) -> str:
    if not code:
        return ""
    from pymilvus.grpc_gen import common_pb2

    try:
        return str(common_pb2.ErrorCode.Name(int(code)))
    except (ValueError, TypeError):
        return ""


def _lite_config_error(message: str) -> ConfigError:
    """A ``ConnectionConfigException``: most often a Milvus Lite file another process holds."""
    if message.lower().strip() == "open local milvus failed":
        return ConfigError(
            "the Milvus Lite database is already open in another process (Milvus Lite "
            "allows one process per file); run `milvus-lite server` and point every "
            "worker at it with --milvus-uri http://HOST:PORT"
        )
    return ConfigError(f"cannot open Milvus: {message[:200]} (check --milvus-uri)")


@contextmanager
def translated(action: str) -> Iterator[None]:
    """pymilvus and grpc errors → ``SinkUnavailable`` (retry later), ``SinkRejected`` (the
    request is wrong) or ``ConfigError`` (credentials, an unusable URI), by type and code."""
    from pymilvus.exceptions import ConnectionConfigException, MilvusException

    try:
        yield
    except (SinkUnavailable, SinkRejected, ConfigError, CollectionMissing):
        raise
    except ConnectionConfigException as exc:
        raise _lite_config_error(str(exc.message or "")) from None
    except MilvusException as exc:
        message = str(getattr(exc, "message", "") or exc)
        if _collection_missing(exc, message):
            raise CollectionMissing(
                f"the collection was dropped (during {action}): restart the worker to "
                "create it again (the index is cleared then; re-send the sources)"
            ) from None
        kind = _kind(exc)
        if kind is ConfigError:
            raise ConfigError(
                f"Milvus refused {action}: authentication failed (check --milvus-token)"
            ) from None
        if kind is SinkUnavailable:
            raise SinkUnavailable(f"milvus unavailable during {action}: {message[:200]}") from None
        raise SinkRejected(f"milvus rejected {action}: {message[:300]}") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise SinkUnavailable(f"milvus unavailable during {action}: {type(exc).__name__}") from None
    except Exception as exc:
        # grpc raises its own RpcError types for transport failures and refused calls.
        name = _grpc_code_name(exc)
        if name in _AUTH_GRPC:
            raise ConfigError(
                f"Milvus refused {action}: authentication failed (check --milvus-token)"
            ) from None
        if type(exc).__module__.startswith("grpc"):
            raise SinkUnavailable(
                f"milvus unavailable during {action}: {name or type(exc).__name__}"
            ) from None
        raise
