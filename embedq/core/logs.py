"""structlog set-up: JSON lines off a terminal, key=value on one, secrets scrubbed."""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "***"


class SecretScrubber:
    """Replace every known secret value wherever it appears in an event's values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self.secrets:
            return event
        for key, value in list(event.items()):
            event[key] = self.scrub(value)
        return event


# The scrubber of the last ``configure``: ``redact`` applies it to text printed outside logs.
_scrubber = SecretScrubber(())
# Whether the last ``configure`` chose key=value lines for a person (stderr a terminal).
_for_a_person = False


def for_a_person() -> bool:
    """True when logs are key=value lines on a terminal rather than JSON for a collector:
    the CLI then prints a failure once, as its ``embedq: ...`` line, not also as an event."""
    return _for_a_person


def redact(text: str) -> str:
    """``text`` with every secret ``configure`` was given replaced by ``***``."""
    return str(_scrubber.scrub(text))


def configure(level: str = "info", json: bool | None = None, secrets: Iterable[str] = ()) -> None:
    """Logs go to stderr (stdout is for command output such as ``lag --json``)."""
    global _scrubber, _for_a_person  # noqa: PLW0603 -- one process, set at the entry point
    _scrubber = SecretScrubber(secrets)
    if json is None:
        json = not sys.stderr.isatty()
    _for_a_person = not json
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrubber,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    route_foreign_output(renderer, json)
    # Milvus Lite logs a traceback for a locked database file and its in-process gRPC
    # server logs every unimplemented call (AllocTimestamp on upsert); embedq reports the
    # first as one line of its own and the second is harmless.
    for noisy in ("milvus_lite", "grpc._server"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


# The stdlib handler ``configure`` installed last (replaced, never stacked, on a reconfigure).
_stdlib_handler: logging.Handler | None = None


def route_foreign_output(renderer: Any, json: bool) -> None:
    """Everything else that writes to stderr goes through the same renderer, so a worker's
    log stays one JSON object per line (issue 17: 441 of 473 lines were not): stdlib logging
    (transformers, pymilvus, at warning and above), Python warnings, exceptions that end a
    thread or the process (their traceback inside the event), and gRPC's C core, which
    writes straight to the file descriptor and is silenced unless GRPC_VERBOSITY says
    otherwise (its keepalive notices, such as GOAWAY too_many_pings, are not actionable;
    embedq reports Milvus failures itself)."""
    global _stdlib_handler  # noqa: PLW0603 -- one process, set at the entry point
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # read when grpc loads, after this
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                _scrubber,
            ],
        )
    )
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _stdlib_handler = handler
    logging.captureWarnings(True)  # warnings.warn(...) becomes a py.warnings event
    if json:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_exception


def _log_uncaught(
    kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    structlog.get_logger("embedq").critical("uncaught_exception", exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("embedq").error(
        "thread_crashed",
        thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
