"""Producing: ``enqueue`` sends a source as one job (``embedq.cli.enqueue``); ``delete``
sends deletes; ``jobs``/``job`` follow jobs; ``trim`` drops acknowledged entries from the
stream."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.enqueue import enqueue
from embedq.cli.options import build_settings, common, log, milvus_reading, run_guarded, setting
from embedq.core.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from embedq.core.config import Settings

__all__ = ["delete", "enqueue", "job", "jobs", "trim"]  # cli/__init__ registers them


@click.command()
@click.argument("ids", nargs=-1)
@click.option(
    "--from",
    "from_file",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Read ids from this file, one per line (- for stdin).",
)
@setting("enqueue_chunk", "--chunk", help="Entries per pipelined XADD batch.")
@common
def delete(ids: tuple[str, ...], from_file: str | None, **options: Any) -> None:
    """Remove these ids' rows: op=delete entries, ordered with the ids' writes."""
    settings = build_settings(options)

    def body() -> int:
        from embedq.producer.client import Producer

        wanted = list(ids)
        if from_file is not None:
            with click.open_file(from_file, encoding="utf-8") as f:
                wanted += [line.strip() for line in f if line.strip()]
        if not wanted:
            raise ConfigError("give ids to delete, or --from FILE")
        with Producer.connect(
            settings.redis_url,
            settings.stream,
            chunk=settings.enqueue_chunk,
            partitions=settings.partitions,
            cluster=settings.redis_cluster,
        ) as producer:
            sent = producer.delete(wanted)
        log.info("deletes_sent", count=sent, stream=settings.stream)
        click.echo(f"sent {sent} deletes to {settings.stream}")
        return ExitCode.OK

    run_guarded(body)


def _print_jobs(views: list[Any]) -> None:
    from embedq.core.progress import format_duration

    # Each column as wide as its widest cell (a state such as "interrupted" included).
    header = ("job", "state", "enqueued", "embedded", "dead", "tokens", "eta", "source")
    rows = [
        (
            *(v.job, v.state, str(v.enqueued), str(v.embedded), str(v.dead_lettered)),
            *(str(v.tokens), format_duration(v.eta_s), v.source),
        )
        for v in views
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        click.echo("  ".join(cells) + "  " + row[-1])


@click.command()
@common
@milvus_reading
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job, one a line.")
@click.option(
    "--prune",
    is_flag=True,
    help="Forget the jobs that ended (done, failed, interrupted); their keys also expire "
    "a week after they end.",
)
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="With --prune: only jobs that ended at least this many seconds ago.",
)
def jobs(as_json: bool, prune: bool, older_than: float, **options: Any) -> None:
    """List enqueue jobs: state, enqueued, embedded and dead-lettered counts, the tokens
    embedded, ETA."""
    from embedq.queue.jobs import list_jobs, open_ledger

    settings = build_settings(options)

    def body() -> int:
        if prune:
            gone = open_ledger(settings).prune(older_than)
            log.info("jobs_pruned", count=len(gone))
            click.echo(f"pruned {len(gone)} jobs" + (": " + " ".join(gone[:20]) if gone else ""))
            return ExitCode.OK
        views = list_jobs(open_ledger(settings))
        _say_if_redis_lost(settings)
        if as_json:
            for view in views:  # JSON Lines, as every list --json prints (docs/reference)
                click.echo(json.dumps(view.as_dict(), sort_keys=True))
        elif views:
            _print_jobs(views)
        else:
            click.echo(f"no jobs on {settings.stream}")
        return ExitCode.OK

    run_guarded(body)


@click.command()
@click.argument("job_id")
@common
@milvus_reading
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def job(job_id: str, as_json: bool, **options: Any) -> None:
    """Show one enqueue job (exit 1 when there is no such job)."""
    from embedq.queue.jobs import get_job, open_ledger

    settings = build_settings(options)

    def body() -> int:
        view = get_job(open_ledger(settings), job_id)
        _say_if_redis_lost(settings)
        if view is None:
            click.echo(f"embedq: no job {job_id!r} on {settings.stream}", err=True)
            return ExitCode.NOT_FOUND
        if as_json:
            click.echo(json.dumps(view.as_dict(), sort_keys=True))
        else:
            for name, value in view.as_dict().items():
                # A date is labelled as one ("started", UTC), not by its JSON field's unit.
                label = name.removesuffix("_ms") if name.endswith("_ms") else name
                click.echo(f"{label:<16} {_shown(name, value)}")
        return ExitCode.OK

    run_guarded(body)


def _say_if_redis_lost(settings: Settings) -> None:
    """The one line (on stderr, so ``--json`` stays parseable) when Redis lost its data since
    the collection recorded the deployment's epoch: jobs it held are gone or partial."""
    from embedq.queue.stream import open_streams
    from embedq.sink.epoch import check_if_reachable

    standing = check_if_reachable(settings, open_streams(settings.replace(block_ms=0)))
    if standing is not None and standing.lost:
        click.echo(f"embedq: {standing.line()}", err=True)


def _shown(name: str, value: Any) -> str:
    """A job field for a person: times as UTC dates, the ETA as a duration."""
    from embedq.core.progress import format_duration, format_time_ms

    if value is None:  # not known (yet): a rate before anything was embedded, a lost job
        return "-"
    if name.endswith("_ms") and isinstance(value, int):
        return format_time_ms(value)
    if name == "eta_s":
        return format_duration(value)
    return str(value)


@click.command()
@common
@click.option("--json", "as_json", is_flag=True, help="One JSON object per stream, one a line.")
def trim(as_json: bool, **options: Any) -> None:
    """Drop entries every consumer group has acknowledged (XTRIM MINID); never others."""
    from embedq.queue.stream import open_streams

    settings = build_settings(options)

    def body() -> int:
        results = []
        for stream in open_streams(settings):
            name = stream.keys.stream
            trimmed, minid = stream.trim()
            log.info("trimmed", stream=name, trimmed=trimmed, minid=minid)
            results.append({"stream": name, "trimmed": trimmed, "minid": minid})
        if as_json:
            for r in results:
                click.echo(json.dumps(r, sort_keys=True))
        else:
            for r in results:
                kept = f"kept from {r['minid']}" if r["minid"] else "no consumer group: kept all"
                click.echo(f"{r['stream']}: trimmed {r['trimmed']} ({kept})")
        return ExitCode.OK

    run_guarded(body)
