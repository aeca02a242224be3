"""structlog set-up: JSON lines off a terminal, key=value on one, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
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


def redact(text: str) -> str:
    """``text`` with every secret ``configure`` was given replaced by ``***``."""
    return str(_scrubber.scrub(text))


def configure(level: str = "info", json: bool | None = None, secrets: Iterable[str] = ()) -> None:
    """Logs go to stderr (stdout is for command output such as ``lag --json``)."""
    global _scrubber  # noqa: PLW0603 -- one process, one set of secrets, set at the entry point
    _scrubber = SecretScrubber(secrets)
    if json is None:
        json = not sys.stderr.isatty()
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
    # transformers and pymilvus log through stdlib logging; keep them quiet below warnings.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    # Milvus Lite logs a traceback for a locked database file and its in-process gRPC
    # server logs every unimplemented call (AllocTimestamp on upsert); embedq reports the
    # first as one line of its own and the second is harmless.
    for noisy in ("milvus_lite", "grpc._server"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
