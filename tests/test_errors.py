"""Errors by kind: the hierarchy, the exit code each kind gives a command, and the
translation of redis-py's and pymilvus's exceptions where they enter (no servers needed)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
import redis
from pymilvus.exceptions import ConnectionConfigException, MilvusException, ParamError
from structlog.testing import capture_logs

from embedq.cli.options import run_guarded
from embedq.core import logs
from embedq.core.config import SettingsError
from embedq.core.errors import (
    ConfigError,
    EmbedqError,
    ExitCode,
    PoisonInput,
    QueueUnavailable,
    SinkRejected,
    SinkUnavailable,
    StageCrashed,
)
from embedq.queue.connection import translated as redis_translated
from embedq.sink.error_codes import translated as milvus_translated


def test_settings_errors_are_config_errors_and_value_errors() -> None:
    assert issubclass(SettingsError, ConfigError)
    assert issubclass(SettingsError, ValueError)
    assert issubclass(ConfigError, EmbedqError)


def exit_of(body: Callable[[], int | None]) -> int:
    with pytest.raises(SystemExit) as stopped:
        run_guarded(body)
    code = stopped.value.code
    assert isinstance(code, int)
    return code


def fails(exc: Exception) -> Callable[[], int]:
    def body() -> int:
        raise exc

    return body


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SettingsError("read_count must be > 0"), ExitCode.USAGE),
        (ConfigError("collection nope does not exist"), ExitCode.USAGE),
        (QueueUnavailable("redis unavailable during lag: ConnectionError"), ExitCode.CONNECT),
        (SinkUnavailable("milvus unavailable during connect: timeout"), ExitCode.CONNECT),
        (StageCrashed("model-0 crashed"), ExitCode.CRASHED),
        (PoisonInput("text_missing"), ExitCode.CRASHED),
    ],
)
def test_each_kind_of_error_exits_with_its_code_and_one_line(
    error: EmbedqError, code: ExitCode, capsys: pytest.CaptureFixture[str]
) -> None:
    with capture_logs() as events:
        assert exit_of(fails(error)) == code
    err = capsys.readouterr().err
    assert err == f"embedq: {error}\n"
    assert events[-1]["log_level"] == "error"
    assert (events[-1]["kind"], events[-1]["exit_code"]) == (type(error).__name__, code)


def test_a_body_exits_with_what_it_returns() -> None:
    assert exit_of(lambda: None) == ExitCode.OK
    assert exit_of(lambda: ExitCode.NOT_FOUND) == 1
    assert exit_of(lambda: ExitCode.INTERRUPTED) == 130


def test_an_error_line_never_prints_a_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What logs.configure(..., secrets=settings.secrets) sets at the entry point.
    monkeypatch.setattr(logs, "_scrubber", logs.SecretScrubber(["pw-s3cret"]))
    with capture_logs() as events:
        exit_of(fails(ConfigError("cannot open redis://u:pw-s3cret@host/0")))
    err = capsys.readouterr().err
    assert "pw-s3cret" not in err and "u:***@host" in err
    assert "pw-s3cret" not in str(events)


# -- redis-py -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (redis.exceptions.ConnectionError("refused"), QueueUnavailable),
        (redis.exceptions.TimeoutError("timed out"), QueueUnavailable),
        # redis-py strips the reply's code from these messages: only the type tells.
        (redis.exceptions.BusyLoadingError("Redis is loading the dataset"), QueueUnavailable),
        (redis.exceptions.MasterDownError("Link with MASTER is down"), QueueUnavailable),
        (redis.exceptions.ClusterDownError("The cluster is down"), QueueUnavailable),
        (redis.exceptions.TryAgainError("Multiple keys request during rehash"), QueueUnavailable),
        (redis.exceptions.AuthenticationError("invalid username-password pair"), ConfigError),
        (redis.exceptions.NoPermissionError("this user has no permissions"), ConfigError),
        (redis.exceptions.MovedError("3999 127.0.0.1:6381"), ConfigError),
    ],
)
def test_redis_errors_are_translated_by_type(raised: Exception, kind: type[Exception]) -> None:
    with pytest.raises(kind) as caught, redis_translated("read"):
        raise raised
    assert "127.0.0.1" not in str(caught.value)


def test_other_redis_replies_are_not_hidden() -> None:
    with pytest.raises(redis.exceptions.ResponseError), redis_translated("xadd"):
        raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key")


# -- pymilvus -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        # Milvus's merr codes: limits and quotas are retried, never dead-lettered.
        (MilvusException(8, "rate limit exceeded[rate=0.1]"), SinkUnavailable),
        (MilvusException(9, "quota exceeded[reason=disk quota exceeded]"), SinkUnavailable),
        (MilvusException(7, "disk limit exceeded"), SinkUnavailable),
        (MilvusException(3, "memory limit exceeded"), SinkUnavailable),
        (MilvusException(12, "service resource insufficient"), SinkUnavailable),
        (MilvusException(2, "Fail connecting to server on localhost:19530"), SinkUnavailable),
        (MilvusException(106, "collection on recovering"), SinkUnavailable),
        # A code decides over the words in the message.
        (MilvusException(1100, "invalid parameter: connection field too long"), SinkRejected),
        (MilvusException(1804, "fail to deal the insert data"), SinkRejected),
        (MilvusException(1400, "not authenticated"), ConfigError),
        (MilvusException(1401, "privilege not permitted"), ConfigError),
        # gRPC status codes, as pymilvus reports them after its own retries.
        (MilvusException(grpc.StatusCode.UNAVAILABLE, "Retry timeout"), SinkUnavailable),
        (MilvusException(grpc.StatusCode.UNAUTHENTICATED, "bad token"), ConfigError),
        # Code 1 (pymilvus's UNEXPECTED_ERROR) says nothing: the message decides.
        (MilvusException(message="[upsert] Retry timeout: 10s"), SinkUnavailable),
        (ParamError(message="data type mismatch"), SinkRejected),
        (MilvusException(message="the token is invalid"), ConfigError),
        # Milvus Lite: a write that raced `migrate --adopt`'s rename is sent again (issue 26).
        (MilvusException(1, "WAL already closed"), SinkUnavailable),
        # The server's own word, where pymilvus passes it on.
        (MilvusException(1, "service not ready", retriable=True), SinkUnavailable),
    ],
)
def test_milvus_errors_are_translated_by_code(raised: Exception, kind: type[Exception]) -> None:
    with pytest.raises(kind), milvus_translated("upsert"):
        raise raised


def test_a_locked_milvus_lite_file_is_a_config_error_that_says_what_to_do() -> None:
    locked = ConnectionConfigException(message="Open local milvus failed")
    with (
        pytest.raises(ConfigError, match="already open in another process"),
        milvus_translated("connect"),
    ):
        raise locked
    no_dir = ConnectionConfigException(message="Open local milvus failed, dir: /x not exists")
    with pytest.raises(ConfigError, match="check --milvus-uri"), milvus_translated("connect"):
        raise no_dir


def test_builtin_network_errors_from_milvus_are_retryable() -> None:
    reset = ConnectionResetError("reset by peer")
    with (
        pytest.raises(SinkUnavailable, match="during ping: ConnectionResetError"),
        milvus_translated("ping"),
    ):
        raise reset
