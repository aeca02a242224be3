"""Shared option machinery for the ``embedq`` commands.

Every option is a flag that also reads ``EMBEDQ_<NAME>`` (e.g. ``--redis-url`` and
``EMBEDQ_REDIS_URL``); defaults come from ``embedq.config.Settings``. Commands declare
their options with ``setting(...)`` and the ``common``/``milvus``/``model`` groups, build
their Settings with ``build_settings`` and run their body under ``run_guarded``, which
turns the body's return value or error into an ``embedq.errors.ExitCode``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
import structlog

from embedq import logs
from embedq.config import Settings, SettingsError
from embedq.errors import EmbedqError, ExitCode, exit_code_for

log = structlog.get_logger("embedq.cli")

_DEFAULTS = Settings(consumer="<hostname>-<pid>")

F = Callable[..., Any]


def setting(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option for ``Settings.<name>`` with its env var and documented default."""
    flag = "--" + name.replace("_", "-")
    default = getattr(_DEFAULTS, name)
    kwargs.setdefault("show_default", str(default) if default not in ("", None) else False)
    # A bool setting, or one whose "not given" (None) means "decide for me", is an on/off pair.
    boolean = kwargs.pop("boolean", isinstance(default, bool))
    if boolean and "is_flag" not in kwargs and not decls:
        flag = f"{flag}/--no-{name.replace('_', '-')}"
    elif "type" not in kwargs and default is not None and not isinstance(default, bool):
        kwargs["type"] = type(default)
    return click.option(flag, *decls, name, envvar=f"EMBEDQ_{name.upper()}", default=None, **kwargs)


def common(func: F) -> F:
    for decorate in reversed(
        [
            setting("redis_url", help="Redis URL (redis:// or rediss://, password allowed)."),
            setting("redis_cluster", help="The URL names a node of a Redis Cluster."),
            setting("stream", help="Tasks stream key."),
            setting("group", help="Consumer group."),
            setting(
                "partitions",
                help="Tasks streams <stream>:{p<i>}, entries spread by a hash of their id; "
                "every command of one deployment must agree.",
            ),
            setting("log_level", type=click.Choice(["debug", "info", "warning", "error"])),
            setting(
                "log_json",
                boolean=True,
                help="JSON log lines (default: when stderr is not a terminal).",
            ),
        ]
    ):
        func = decorate(func)
    return func


def milvus(func: F) -> F:
    for decorate in reversed(
        [
            setting("milvus_uri", help="Milvus Lite file, or http(s)://host:19530 for a server."),
            setting(
                "milvus_token", help="Milvus token (user:password or API key).", show_default=False
            ),
            setting("collection", help="Milvus collection."),
            setting(
                "milvus_timeout_s",
                "--milvus-timeout",
                type=float,
                help="Seconds per Milvus call (must be below --min-idle).",
            ),
            setting("store_text", help="Store the text (cut at 64 KB) next to the vector."),
        ]
    ):
        func = decorate(func)
    return func


def model(func: F) -> F:
    for decorate in reversed(
        [
            setting(
                "model", help="Local model directory (default: the packaged all-MiniLM-L6-v2)."
            ),
            setting("device", help="auto, cpu, cuda or cuda:N."),
            setting(
                "dtype",
                type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                help="auto is fp16 on CUDA, fp32 on CPU.",
            ),
        ]
    ):
        func = decorate(func)
    return func


def processing(func: F) -> F:
    """Options of every command that processes entries (``worker`` and ``reclaim``)."""
    for decorate in reversed(
        [
            setting("consumer", help="Consumer name in the group."),
            setting(
                "max_batch_tokens", help="Padded tokens per forward pass (0: auto per device)."
            ),
            setting("max_batch_rows", help="Texts per forward pass at most (0: auto per device)."),
            setting(
                "min_idle_s", "--min-idle", type=float, help="Reclaim entries idle this long (s)."
            ),
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
            setting(
                "grace_s", "--grace", type=float, help="Seconds to finish the batch after SIGTERM."
            ),
            setting(
                "consumer_idle_delete_s",
                "--consumer-idle-delete",
                type=float,
                help="Remove consumers idle this long (s) with nothing pending.",
            ),
        ]
    ):
        func = decorate(func)
    return func


def build_settings(options: dict[str, Any]) -> Settings:
    try:
        settings = Settings.from_options(**options)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(settings.log_level, settings.log_json, settings.secrets)
    return settings


def run_guarded(call: Callable[[], int | None]) -> NoReturn:
    """Run a command body and exit with its code, or with the one its error's kind names.

    ``ConfigError`` (``SettingsError`` included) exits ``USAGE``; an infrastructure error
    that reaches here (Redis or Milvus unreachable while starting, or during a one-shot
    command) exits ``CONNECT``; any other ``EmbedqError`` exits ``CRASHED``. Each prints one
    line, with no traceback and no secret; anything else is a bug and keeps its traceback.
    """
    try:
        code = call()
    except EmbedqError as exc:
        code = exit_code_for(exc)
        message = logs.redact(str(exc))
        event = "config_error" if code == ExitCode.USAGE else "failed"
        log.error(event, error=message, kind=type(exc).__name__, exit_code=int(code))
        click.echo(f"embedq: {message}", err=True)
    sys.exit(int(ExitCode.OK if code is None else code))
