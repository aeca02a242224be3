"""``embedq dlq``: list, show, retry and purge dead-letter entries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import build_settings, common, log, run_guarded
from embedq.core.errors import ExitCode

if TYPE_CHECKING:
    from embedq.queue.dlq import DeadLetterQueue


@click.group()
def dlq() -> None:
    """Inspect and repair the dead-letter stream (<stream>:dlq, one per partition).

    With --partitions N, dead letters are named <partition>/<id>, as `dlq list` shows them.
    """


def _open_partitions(options: dict[str, Any]) -> list[DeadLetterQueue]:
    from embedq.queue.stream import open_streams

    return [stream.dlq for stream in open_streams(build_settings(options))]


def _where(partitions: Sequence[DeadLetterQueue]) -> str:
    """The dead-letter stream(s), for a closing line."""
    return (
        partitions[0].keys.dlq
        if len(partitions) == 1
        else f"{len(partitions)} partition dead-letter streams"
    )


@dlq.command("list")
@common
@click.option("--reason", default=None, help="Only entries with this reason.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="At most.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def dlq_list(reason: str | None, limit: int, as_json: bool, **options: Any) -> None:
    """Dead-letter entries, oldest first: id, reason, deliveries, age."""
    from itertools import islice

    from embedq.queue.dlq import iter_dead_letters

    partitions = _open_partitions(options)

    def body() -> int:
        letters = list(islice(iter_dead_letters(partitions, reason), limit))
        if as_json:
            for letter in letters:
                click.echo(json.dumps(letter.summary(), ensure_ascii=False))
            return ExitCode.OK
        width = 20 if len(partitions) == 1 else 24
        click.echo(f"{'dlq id':<{width}} {'reason':<16} {'deliv':>5} {'age':>9}  id")
        for letter in letters:
            click.echo(
                f"{letter.ref:<{width}} {letter.reason:<16} {letter.deliveries:>5} "
                f"{letter.age_s():>8.0f}s  {letter.doc_id[:60]}"
            )
        total = sum(partition.length() for partition in partitions)
        click.echo(f"{len(letters)} shown, {total} in {_where(partitions)}")
        return ExitCode.OK

    run_guarded(body)


@dlq.command("show")
@common
@click.argument("dlq_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def dlq_show(dlq_id: str, as_json: bool, **options: Any) -> None:
    """Every field of one dead-letter entry, with the reason and the last error."""
    from embedq.queue.dlq import show

    partitions = _open_partitions(options)

    def body() -> int:
        letter = show(partitions, dlq_id)
        if letter is None:
            click.echo(f"embedq: no entry {dlq_id} in {_where(partitions)}", err=True)
            return ExitCode.NOT_FOUND
        data = letter.as_dict()
        if as_json:
            click.echo(json.dumps(data, ensure_ascii=False))
            return ExitCode.OK
        for key, value in data.items():
            if key != "fields":
                click.echo(f"{key:<12} {value}")
        for key, value in data["fields"].items():
            click.echo(f"field {key:<6} {value[:2000]}")
        return ExitCode.OK

    run_guarded(body)


@dlq.command("retry")
@common
@click.argument("dlq_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Every entry (with --reason: those).")
@click.option("--reason", default=None, help="With --all: only entries with this reason.")
def dlq_retry(
    dlq_ids: tuple[str, ...], retry_all: bool, reason: str | None, **options: Any
) -> None:
    """Re-enqueue dead-letter entries (their original fields) and remove them from the DLQ."""
    from embedq.queue.dlq import iter_dead_letters, retry

    if reason is not None and not retry_all:
        raise click.UsageError("--reason needs --all (retry every entry with that reason)")
    if bool(dlq_ids) == retry_all:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    partitions = _open_partitions(options)

    def body() -> int:
        ids = list(dlq_ids) or [d.ref for d in iter_dead_letters(partitions, reason)]
        sent = retry(partitions, ids)
        log.info("dlq_retried", sent=len(sent), asked=len(ids))
        for old, (stream, new) in sent.items():
            click.echo(f"{old} -> {stream} {new}")
        skipped = [i for i in ids if i not in sent]
        if skipped:
            click.echo(
                f"embedq: {len(skipped)} not sent back (not found, or no original fields): "
                + " ".join(skipped[:20]),
                err=True,
            )
        click.echo(f"retried {len(sent)} of {len(ids)}")
        # Named ids that were not sent back: the caller asked for something that is not there.
        return ExitCode.NOT_FOUND if dlq_ids and skipped else ExitCode.OK

    run_guarded(body)


@dlq.command("purge")
@common
@click.argument("dlq_ids", nargs=-1)
@click.option("--all", "purge_all", is_flag=True, help="Delete the whole dead-letter stream.")
def dlq_purge(dlq_ids: tuple[str, ...], purge_all: bool, **options: Any) -> None:
    """Delete dead-letter entries for good."""
    from embedq.queue.dlq import purge

    if bool(dlq_ids) == purge_all:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    partitions = _open_partitions(options)

    def body() -> int:
        removed = purge(partitions, None if purge_all else list(dlq_ids))
        log.info("dlq_purged", removed=removed)
        click.echo(f"purged {removed} from {_where(partitions)}")
        return ExitCode.OK

    run_guarded(body)
