"""A small error hierarchy that says what to do with a failure, and the exit codes it maps to.

* ``PoisonInput``: the entry itself is bad; dead-letter it with ``reason``, never retry.
* ``InfrastructureError``: Redis or Milvus is unreachable or slow; ack nothing, back off, retry.
* ``ConfigError``: the operator must change something (model path, dimension, a locked
  Milvus Lite file, a setting: ``SettingsError``); the process stops with a one-line message.

Library exceptions (redis, pymilvus, torch) are translated where they enter embedq, by their
type or error code (``embedq.queue.connection.translated``, ``embedq.sink.error_codes.translated``).
A command body that fails with one of these exits with the ``ExitCode`` its kind names
(``embedq.cli.options.run_guarded``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What an ``embedq`` process's exit status means; docs/concepts.md's "Exit codes" lists them.

    Kubernetes and scripts tell "misconfigured" (2: fix the settings, restarting will not
    help) from "cannot connect" (3: a dependency is down, a restart later may) from
    "crashed" (1) by these alone, as with dramatiq's ``RET_CONNECT``.
    """

    OK = 0  # done: the command did its work (`worker --drain`: nothing left to do)
    CRASHED = 1  # an unexpected error or a dead pipeline stage; the worker stopped
    NOT_FOUND = 1  # `job ID`, `dlq show`, `dlq retry IDS`: what was asked for is not there
    USAGE = 2  # bad flags or settings, or something else the operator must fix (ConfigError)
    CONNECT = 3  # Redis or Milvus cannot be reached (at start: the worker retries once running)
    REFUSED = 4  # a bulk delete (repair, sync cleanup) was refused as unproven: nothing deleted;
    # or `migrate --promote` below its --min-overlap / --min-recall bar: the alias not moved;
    # or a `migrate` step it cannot prove safe (MigrationRefused): nothing changed
    NOTHING_SENT = 5  # `enqueue` sent nothing and rejected something (a typo in a field?)
    INTERRUPTED = 130  # `enqueue` stopped by Ctrl-C (128 + SIGINT, the shell's convention)


class EmbedqError(Exception):
    """Base class for every error embedq raises on purpose."""


class ConfigError(EmbedqError):
    """Something the operator must fix; the message says what."""


class SettingsError(ConfigError, ValueError):
    """A setting has a value that cannot work; the message says which and why.

    Also a ``ValueError``, which is what an invalid value is to Python callers.
    """


class ModelMismatch(ConfigError):
    """The collection records another model's fingerprint: this model's vectors must not be
    written into it (nor searched with it)."""


class InfrastructureError(EmbedqError):
    """A dependency failed in a way that retrying later can fix."""


class QueueUnavailable(InfrastructureError):
    """Redis is unreachable, restarting or timing out."""


class QueueFull(QueueUnavailable):
    """Redis is out of memory (``maxmemory`` with ``noeviction``): it refuses writes that
    would grow it until memory is freed. Nothing is lost; retry later."""


class SinkUnavailable(InfrastructureError):
    """Milvus is unreachable, timing out, over a rate limit or quota, or refusing writes
    for now."""


class GatewayUnavailable(InfrastructureError):
    """A gateway (``embedq serve``) a client command was pointed at does not answer, or
    answers 5xx (``embedq search --gateway``)."""


class PoisonInput(EmbedqError):
    """One entry can never be processed; it goes to the dead-letter stream with a reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class EncodeFailed(EmbedqError):
    """The tokenizer or model raised on a batch; the batch is split to find the culprit."""


class ModelOutOfMemory(EncodeFailed):
    """The device ran out of memory on a batch: a smaller batch may fit (the batch is split);
    one text alone that does not fit is a ``DeviceFailed``, not poison."""


class CollectionMissing(EmbedqError):
    """The collection was dropped behind the workers' backs. Recreating it in the middle of
    a run would leave an empty collection the index says is full, so the worker stops
    (exit 1, entries pending); a restarted worker creates it again and clears the index,
    and the producers re-send what it held."""


class DeviceFailed(EmbedqError):
    """The model's device is broken (a sticky CUDA error, memory exhausted for a single
    text): no input is to blame. The worker stops (exit 1, readiness false) and leaves its
    entries pending for a healthy worker instead of dead-lettering them."""


class SinkRejected(EmbedqError):
    """Milvus answered but refused the write (bad data, schema mismatch); not retryable as is."""


class DeletesRefused(EmbedqError):
    """A tool would delete rows in bulk on evidence it cannot trust (an empty or lost
    index, more than ``--max-delete`` allows); nothing was deleted, the message says why."""


class PromoteRefused(EmbedqError):
    """``migrate --promote`` would switch readers to a model whose evaluation is below the
    bar given (``--min-overlap``, ``--min-recall``) or not recorded; the alias was not
    moved, the message gives the figures."""


class MigrationRefused(EmbedqError):
    """``embedq migrate`` cannot prove the step safe (Redis lost the migration's data, or
    writers are active during ``--adopt``); nothing was changed, the message says why."""


class StageCrashed(EmbedqError):
    """A worker pipeline thread died on an unexpected error; the worker stops
    (``ExitCode.CRASHED``)."""


def exit_code_for(exc: EmbedqError) -> ExitCode:
    """The exit status of a command that stopped on ``exc``."""
    if isinstance(exc, ConfigError):
        return ExitCode.USAGE
    if isinstance(exc, (DeletesRefused, PromoteRefused, MigrationRefused)):
        return ExitCode.REFUSED
    if isinstance(exc, InfrastructureError):
        return ExitCode.CONNECT
    return ExitCode.CRASHED
