"""A small error hierarchy that says what to do with a failure.

* ``PoisonInput``: the entry itself is bad; dead-letter it with ``reason``, never retry.
* ``InfrastructureError``: Redis or Milvus is unreachable or slow; ack nothing, back off, retry.
* ``ConfigError``: the operator must change something (model path, dimension, a locked
  Milvus Lite file); the process stops with a one-line message.

Library exceptions (redis, pymilvus, torch) are translated where they enter embedq.
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base class for every error embedq raises on purpose."""


class ConfigError(EmbedqError):
    """Something the operator must fix; the message says what."""


class InfrastructureError(EmbedqError):
    """A dependency failed in a way that retrying later can fix."""


class QueueUnavailable(InfrastructureError):
    """Redis is unreachable, restarting or timing out."""


class SinkUnavailable(InfrastructureError):
    """Milvus is unreachable, timing out or refusing writes for now."""


class PoisonInput(EmbedqError):
    """One entry can never be processed; it goes to the dead-letter stream with a reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class EncodeFailed(EmbedqError):
    """The tokenizer or model raised on a batch; the batch is split to find the culprit."""


class SinkRejected(EmbedqError):
    """Milvus answered but refused the write (bad data, schema mismatch); not retryable as is."""


class StageCrashed(EmbedqError):
    """A worker pipeline thread died on an unexpected error; the worker stops (exit 1)."""
