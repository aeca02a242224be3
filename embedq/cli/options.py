"""Shared option machinery for the ``embedq`` commands.

Every option is a flag that also reads ``EMBEDQ_<NAME>`` (e.g. ``--redis-url`` and
``EMBEDQ_REDIS_URL``); defaults come from ``embedq.core.config.Settings``. Commands declare
their options with ``setting(...)`` and the ``common``/``milvus``/``model`` groups, build
their Settings with ``build_settings`` and run their body under ``run_guarded``, which
turns the body's return value or error into an ``embedq.core.errors.ExitCode``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click
import structlog
from click.core import ParameterSource

from embedq.cli.feedback import for_the_user, set_by
from embedq.core import logs
from embedq.core.config import Settings, SettingsError
from embedq.core.errors import (
    EmbedqError,
    ExitCode,
    QueueUnavailable,
    SinkUnavailable,
    exit_code_for,
)

log = structlog.get_logger("embedq.cli")

_DEFAULTS = Settings(consumer="<hostname>-<pid>")

F = Callable[..., Any]


def setting(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option for ``Settings.<name>`` with its env var and documented default."""
    flag = "--" + name.replace("_", "-")
    default = getattr(_DEFAULTS, name)
    kwargs.setdefault("show_default", str(default) if default not in ("", None) else False)
    kwargs.setdefault("show_envvar", True)  # --help names the variable (issue 18)
    # A bool setting, or one whose "not given" (None) means "decide for me", is an on/off pair.
    boolean = kwargs.pop("boolean", isinstance(default, bool))
    if boolean and "is_flag" not in kwargs and not decls:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    elif "type" not in kwargs and default is not None and not isinstance(default, bool):
        kwargs["type"] = type(default)
    return click.option(flag, *decls, name, envvar=f"EMBEDQ_{name.upper()}", default=None, **kwargs)


def stacked(*options: Callable[[F], F]) -> Callable[[F], F]:
    """``options`` as one decorator; ``--help`` lists them in the order given."""

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


LOG_LEVEL = setting(
    "log_level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="debug adds a line per batch.",
)


# Where the queue is and how the command logs: the options of every command.
common = stacked(
    setting("redis_url", help="Redis URL (redis:// or rediss://, password allowed)."),
    setting("redis_cluster", help="The URL names a node of a Redis Cluster."),
    setting("stream", help="Tasks stream key."),
    setting("group", help="Consumer group."),
    setting(
        "partitions",
        help="Tasks streams <stream>:{p<i>}, entries spread by a hash of their id; "
        "every command of one deployment must agree.",
    ),
    setting(
        "connect_timeout_s",
        "--connect-timeout",
        type=click.FloatRange(min=0),
        show_default=False,
        help="Seconds to keep trying the first connection to Redis (and a worker's "
        "to Milvus) before exiting 3; 0 waits forever. Default: 60 for worker and "
        "reclaim; other commands try once.",
    ),
    LOG_LEVEL,
    setting(
        "log_json",
        boolean=True,
        help="JSON log lines (default: when stderr is not a terminal).",
    ),
)


# Where the collection is: the options of every command that uses Milvus.
milvus_reading = stacked(
    setting("milvus_uri", help="Milvus Lite file, or http(s)://host:19530 for a server."),
    setting("milvus_token", help="Milvus token (user:password or API key).", show_default=False),
    setting("collection", help="Milvus collection."),
    setting(
        "milvus_timeout_s",
        "--milvus-timeout",
        type=float,
        help="Seconds per Milvus call (must be below --min-idle).",
    ),
)


def milvus(func: F) -> F:
    """``milvus_reading`` and what commands that create or write the collection decide."""
    func = setting("store_text", help="Store the text (cut at 64 KB) next to the vector.")(func)
    return milvus_reading(func)


# Which model, and how it runs: the options of every command that embeds.
model = stacked(
    setting("model", help="Local model directory (default: the packaged all-MiniLM-L6-v2)."),
    setting("device", help="auto, cpu, cuda or cuda:N."),
    setting(
        "dtype",
        type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
        help="auto is fp16 on CUDA, fp32 on CPU.",
    ),
    setting(
        "backend",
        type=click.Choice(["torch", "onnx", "openvino"]),
        help="Forward pass: torch, or ONNX Runtime or OpenVINO on the CPU (exported "
        "once, checked against fp32 torch at load; docs/backends.md).",
    ),
    setting(
        "quantize",
        type=click.Choice(["none", "int8"]),
        help="int8: int8 weights (needs --backend onnx or openvino).",
    ),
    setting(
        "model_cache",
        help="Folder for exported models (default: ~/.cache/embedq).",
    ),
    setting(
        "dimensions",
        type=click.IntRange(min=0),
        help="Matryoshka: keep the first N dimensions, renormalised (0: all); the "
        "collection is created with N.",
    ),
    setting(
        "force_dimensions",
        is_flag=True,
        help="Truncate with --dimensions a model whose card declares no Matryoshka training.",
    ),
)


# Options of every command that processes entries (``worker`` and ``reclaim``).
processing = stacked(
    setting("consumer", help="Consumer name in the group."),
    setting("max_batch_tokens", help="Padded tokens per forward pass (0: auto per device)."),
    setting("max_batch_rows", help="Texts per forward pass at most (0: auto per device)."),
    setting("min_idle_s", "--min-idle", type=float, help="Reclaim entries idle this long (s)."),
    setting(
        "reclaim_interval_s",
        "--reclaim-interval",
        type=float,
        help="Seconds between reclaim passes.",
    ),
    setting("max_deliveries", help="Dead-letter an entry delivered more often than this."),
    setting(
        "on_overlong",
        type=click.Choice(["truncate", "reject"]),
        help="Text longer than the model's limit: truncate it or dead-letter it.",
    ),
    setting("max_text_bytes", help="Larger texts are dead-lettered."),
    setting("max_meta_bytes", help="Larger meta objects are dead-lettered."),
    setting("grace_s", "--grace", type=float, help="Seconds to finish the batch after SIGTERM."),
    setting(
        "consumer_idle_delete_s",
        "--consumer-idle-delete",
        type=float,
        help="Remove consumers idle this long (s) with nothing pending.",
    ),
)


_SETTINGS = "embedq.settings"  # where build_settings leaves them in click's context


def build_settings(options: dict[str, Any]) -> Settings:
    """The command's Settings; an invalid value is a usage error naming the flag or the
    variable it came from."""
    ctx = click.get_current_context(silent=True)
    try:
        settings = Settings.from_options(**options)
    except SettingsError as exc:
        message = str(exc)
        if ctx is not None:
            message = for_the_user(ctx, message, getattr(exc, "settings", ()))
        raise click.UsageError(message, ctx) from None
    logs.configure(settings.log_level, settings.log_json, settings.secrets)
    if ctx is not None:
        ctx.meta[_SETTINGS] = settings
    return settings


# Commands that run a worker wait for Redis ``connect_timeout_s`` (60 s) unless told
# otherwise, before the model loads; the others try once, unless given --connect-timeout.
_WAIT_BY_DEFAULT = ("worker", "reclaim", "serve")


def _waits_for_redis(ctx: click.Context) -> bool:
    if not any(p.name == "connect_timeout_s" for p in ctx.command.params):
        return False  # no Redis (search, bench)
    given = ctx.get_parameter_source("connect_timeout_s") in (
        ParameterSource.COMMANDLINE,
        ParameterSource.ENVIRONMENT,
    )
    return given or ctx.command.name in _WAIT_BY_DEFAULT


def wait_for_redis(settings: Settings) -> None:
    """Return once Redis answers PING; retry with backoff for ``connect_timeout_s`` (0:
    forever), then raise the last ``QueueUnavailable``."""
    from embedq.core.backoff import compute_backoff
    from embedq.queue.connection import connect, translated

    limit_s = settings.connect_timeout_s
    deadline = time.monotonic() + limit_s if limit_s else float("inf")
    attempt = 0
    while True:
        try:
            with translated("PING"):
                client = connect(settings.redis_url, block_ms=0, cluster=settings.redis_cluster)
                try:
                    client.ping()
                finally:
                    client.close()
            return
        except QueueUnavailable as exc:
            attempt += 1
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise QueueUnavailable(f"{exc}; gave up after {limit_s:g} s") from None
            if attempt == 1:
                log.warning(
                    "waiting_for_redis",
                    address=settings.redis_address,
                    error=str(exc),
                    connect_timeout_s=limit_s,
                )
            time.sleep(min(compute_backoff(attempt, cap_s=5.0), left_s))


def _where(ctx: click.Context | None, settings: Settings | None, exc: EmbedqError) -> str:
    """The address a connection error is about, and the setting that names it."""
    from embedq.queue.connection import RedisRefused

    if ctx is None or settings is None:
        return ""
    if isinstance(exc, RedisRefused):
        return f" (redis at {settings.redis_address}, {set_by(ctx, 'redis_url')})"
    if isinstance(exc, QueueUnavailable):
        where = f"redis at {settings.redis_address}, {set_by(ctx, 'redis_url')}"
        return f" ({where}: is Redis running there?)"
    if isinstance(exc, SinkUnavailable):
        where = f"milvus at {settings.milvus_address}, {set_by(ctx, 'milvus_uri')}"
        return f" ({where}: is Milvus running there?)"
    return ""


def run_guarded(call: Callable[[], int | None]) -> NoReturn:
    """Run a command body and exit with its code, or with the one its error's kind names.

    ``ConfigError`` (``SettingsError`` included) exits ``USAGE``; an infrastructure error
    that reaches here (Redis or Milvus unreachable while starting, or during a one-shot
    command) exits ``CONNECT``; any other ``EmbedqError`` exits ``CRASHED``. Each prints one
    line, with no traceback and no secret, naming the address a connection error is about
    and the setting that gave it; anything else is a bug and keeps its traceback. Given
    ``--connect-timeout`` (or its variable), and always for ``worker`` and ``reclaim``, the
    body waits up to ``connect_timeout_s`` for Redis first (``wait_for_redis``).
    """
    ctx = click.get_current_context(silent=True)
    settings: Settings | None = ctx.meta.get(_SETTINGS) if ctx is not None else None
    try:
        if ctx is not None and settings is not None and _waits_for_redis(ctx):
            wait_for_redis(settings)
        code = call()
    except EmbedqError as exc:
        code = exit_code_for(exc)
        message = logs.redact(str(exc) + _where(ctx, settings, exc))
        event = "config_error" if code == ExitCode.USAGE else "failed"
        if not logs.for_a_person():  # a person reads the line below; a collector the event
            log.error(event, error=message, kind=type(exc).__name__, exit_code=int(code))
        click.echo(f"embedq: {message}", err=True)
    sys.exit(int(ExitCode.OK if code is None else code))
