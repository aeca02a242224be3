"""Producing: ``enqueue`` sends a source as one job; ``jobs``/``job`` follow jobs;
``trim`` drops acknowledged entries from the stream."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import build_settings, common, log, run_guarded, setting
from embedq.errors import ConfigError, EmbedqError, ExitCode

if TYPE_CHECKING:
    from embedq.config import Settings
    from embedq.producer import Counts
    from embedq.sources import Fields, Rejected, Source
    from embedq.sync import Cleanup


@click.command()
@click.argument("source", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "jsonl", "csv", "parquet", "text"]),
    default="auto",
    show_default=True,
    help="Source format; auto goes by the extension (a directory is text).",
)
@click.option("--id-field", default="id", show_default=True, help="Field/column holding the id.")
@click.option(
    "--text-field", default="text", show_default=True, help="Field/column holding the text."
)
@click.option(
    "--meta-field", default="meta", show_default=True, help="JSONL: a JSON object field as meta."
)
@click.option("--meta-fields", default="", help="Comma-separated fields/columns copied into meta.")
@click.option(
    "--id-prefix",
    default=None,
    help="Text format: ids are <prefix>:<line> for a file (default prefix: the file name) and "
    "<prefix>:<path> for a directory's files (default: no prefix, the path relative to the "
    "directory; two directories with the same file names need different prefixes).",
)
@click.option("--sql", default=None, help="Enqueue the rows of this PostgreSQL query (--dsn).")
@setting("dsn", help="PostgreSQL DSN for --sql (postgresql://user@host/db).", show_default=False)
@click.option(
    "--job",
    "job_id",
    envvar="EMBEDQ_JOB",
    show_envvar=True,
    default=None,
    help="Job id (default: generated). Re-run with the same id to resume after a stop.",
)
@click.option(
    "--dedup",
    is_flag=True,
    help="Skip a record whose id already holds this text and meta in --collection "
    "(or that repeats one sent earlier in this run). Another id with the same text still "
    "gets its row; the worker reuses the vector.",
)
@click.option(
    "--doc-field",
    default=None,
    help="Meta field naming each record's document, for --cleanup.",
)
@click.option(
    "--cleanup",
    type=click.Choice(["incremental", "full"]),
    default=None,
    help="With --doc-field: delete ids a document no longer has (incremental), and also "
    "every id of documents missing from this run (full: the source is a snapshot).",
)
@setting("collection", help="The collection whose index --dedup and --cleanup consult.")
@setting("max_text_bytes", help="Reject a record whose text is longer (the workers' limit).")
@setting(
    "wait_replicas",
    help="Wait until this many Redis replicas have each batch (WAIT), so a failover loses "
    "nothing the producer saw succeed (0: no wait).",
)
@setting("max_lag", help="Pause while the group's backlog exceeds this (0: never).")
@setting("enqueue_chunk", "--chunk", help="Entries per atomic XADD batch.")
@click.option(
    "--progress-every",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds between progress log lines when stderr is not a terminal.",
)
@common
def enqueue(source: str | None, **options: Any) -> None:
    """Send records from SOURCE (a file, a directory, - for stdin, or --sql) as one job."""
    from embedq.jobs import check_job_id, new_job_id
    from embedq.sources import first_or_none, open_source

    fmt, id_prefix, sql = options.pop("fmt"), options.pop("id_prefix"), options.pop("sql")
    job_id, progress_every = options.pop("job_id"), options.pop("progress_every")
    plan = _Plan(options.pop("dedup"), options.pop("doc_field"), options.pop("cleanup"))
    fields = _fields(options)
    settings = build_settings(options)
    path = _source_path(source, sql)

    def body() -> int:
        opened = open_source(
            path, fmt=fmt, fields=fields, id_prefix=id_prefix, sql=sql, dsn=settings.dsn
        )
        where = first_or_none(opened)
        if where is None:  # no job for nothing: it would stay in `embedq jobs` (issue 18)
            shown = "the query" if sql else "standard input" if path == "-" else path
            click.echo(f"nothing to enqueue: {shown} has no records")
            return ExitCode.OK
        plan.check()
        job = job_id or new_job_id()
        check_job_id(job)
        log.info("enqueue_started", job=job, source=where.name, total=where.total)
        # SIGTERM (a pod stopping) ends the run like Ctrl-C: the job is recorded as
        # interrupted, with everything sent so far, instead of staying "sending" forever.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            counts = _send(settings, where, job, plan, progress_every)
        except KeyboardInterrupt:
            return ExitCode.INTERRUPTED
        summary = counts.as_dict()
        log.info("enqueued", job=job, stream=settings.stream, **summary)
        click.echo(
            f"enqueued {counts.sent} records to {settings.stream} ({counts.rejected} rejected)"
            f"; {counts.unchanged} unchanged, {counts.deleted} deleted"
            + (f", {counts.resumed} sent before" if counts.resumed else "")
            + f"; job {job}, {summary['elapsed_s']} s, {summary['records_per_s']:.0f}/s"
        )
        return ExitCode.OK

    run_guarded(body)


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
        from embedq.producer import Producer

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


def _source_path(source: str | None, sql: str | None) -> str:
    """SOURCE, or ``-`` (standard input) when it was left out of a pipe. Without it on a
    terminal, a usage error rather than a silent wait for typed input (issue 18)."""
    import sys

    if source is None and not sql and sys.stdin.isatty():
        raise click.UsageError("give a SOURCE: a file, a directory, or - to type records in")
    path = source or "-"
    if path == "-" and not sql and sys.stdin.isatty():
        click.echo("embedq: reading records from standard input; Ctrl-D ends them", err=True)
    return path


def _fields(options: dict[str, Any]) -> Fields:
    """The source's field mapping, taken out of ``options`` (they are not settings)."""
    from embedq.sources import Fields

    return Fields(
        id=options.pop("id_field"),
        text=options.pop("text_field"),
        meta=options.pop("meta_field") or None,
        meta_fields=tuple(f.strip() for f in options.pop("meta_fields").split(",") if f.strip()),
    )


@dataclass(frozen=True)
class _Plan:
    """What ``enqueue`` does beyond sending: dedup and document sync."""

    dedup: bool
    doc_field: str | None
    cleanup: Cleanup | None

    def check(self) -> None:
        if (self.doc_field is None) != (self.cleanup is None):
            raise ConfigError("--doc-field and --cleanup go together: give both, or neither")


def _send(
    settings: Settings, where: Source, job: str, plan: _Plan, progress_every: float
) -> Counts:
    """Run the producer over ``where`` as ``job``, with progress.

    A stop (an error or Ctrl-C) says how to resume: everything sent so far is recorded with
    the job. A source that cannot be read is a ``ConfigError``.
    """
    from embedq.producer import Producer
    from embedq.progress import Progress
    from embedq.redis_connection import connect
    from embedq.sync import DocSync

    def rejected(item: Rejected) -> None:
        log.warning("record_rejected", where=item.where, reason=item.reason)

    progress = Progress(where.total, every_s=progress_every)
    producer = Producer(
        connect(settings.redis_url, cluster=settings.redis_cluster),
        settings.stream,
        chunk=settings.enqueue_chunk,
        partitions=settings.partitions,
        group=settings.group,
        collection=settings.collection,
        max_text_bytes=settings.max_text_bytes,
        wait_replicas=settings.wait_replicas,
    )
    sync = None
    if plan.doc_field and plan.cleanup:
        sync = DocSync(
            producer.client, settings.stream, settings.collection, plan.doc_field, plan.cleanup
        )
    with producer:
        try:
            return producer.run(
                where,
                job=job,
                source=where.name,
                total=where.total,
                dedup=plan.dedup,
                sync=sync,
                max_lag=settings.max_lag,
                on_rejected=rejected,
                on_progress=progress,
            )
        except OSError as exc:
            _stopped(job, producer.counts.sent, exc)
            raise ConfigError(f"cannot read {where.name}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            _stopped(job, producer.counts.sent, exc)
            raise ConfigError(f"{where.name} is not UTF-8 text: {exc.reason}") from None
        except (EmbedqError, KeyboardInterrupt) as exc:
            _stopped(job, producer.counts.sent, exc)
            raise
        finally:
            progress.close()


def _stopped(job: str, sent: int, exc: BaseException) -> None:
    log.warning("enqueue_stopped", job=job, sent=sent, error=str(exc) or "interrupted")
    if sent:  # only then can a resume help: it skips what was sent
        click.echo(f"embedq: stopped after {sent} sent; resume with --job {job}", err=True)


def _print_jobs(views: list[Any]) -> None:
    from embedq.progress import format_duration

    header = f"{'job':<28} {'state':<8} {'enqueued':>9} {'embedded':>9} {'dead':>6} {'eta':>8}"
    click.echo(header + "  source")
    for v in views:
        eta = format_duration(v.eta_s)
        click.echo(
            f"{v.job:<28} {v.state:<8} {v.enqueued:>9} {v.embedded:>9} {v.dead_lettered:>6} "
            f"{eta:>8}  {v.source}"
        )


@click.command()
@common
@click.option("--json", "as_json", is_flag=True, help="One JSON array of jobs.")
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
    """List enqueue jobs: state, enqueued, embedded and dead-lettered counts, ETA."""
    from embedq.jobs import list_jobs, open_ledger

    settings = build_settings(options)

    def body() -> int:
        if prune:
            gone = open_ledger(settings).prune(older_than)
            log.info("jobs_pruned", count=len(gone))
            click.echo(f"pruned {len(gone)} jobs" + (": " + " ".join(gone[:20]) if gone else ""))
            return ExitCode.OK
        views = list_jobs(open_ledger(settings))
        if as_json:
            click.echo(json.dumps([v.as_dict() for v in views], sort_keys=True))
        elif views:
            _print_jobs(views)
        else:
            click.echo(f"no jobs on {settings.stream}")
        return ExitCode.OK

    run_guarded(body)


@click.command()
@click.argument("job_id")
@common
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def job(job_id: str, as_json: bool, **options: Any) -> None:
    """Show one enqueue job (exit 1 when there is no such job)."""
    from embedq.jobs import get_job, open_ledger

    settings = build_settings(options)

    def body() -> int:
        view = get_job(open_ledger(settings), job_id)
        if view is None:
            click.echo(f"embedq: no job {job_id!r} on {settings.stream}", err=True)
            return ExitCode.NOT_FOUND
        if as_json:
            click.echo(json.dumps(view.as_dict(), sort_keys=True))
        else:
            for name, value in view.as_dict().items():
                click.echo(f"{name:<16} {_shown(name, value)}")
        return ExitCode.OK

    run_guarded(body)


def _shown(name: str, value: Any) -> str:
    """A job field for a person: times as UTC dates, the ETA as a duration."""
    from embedq.progress import format_duration, format_time_ms

    if value is None:
        return ""
    if name.endswith("_ms") and isinstance(value, int):
        return format_time_ms(value)
    if name == "eta_s":
        return format_duration(value)
    return str(value)


@click.command()
@common
@click.option("--json", "as_json", is_flag=True, help="One JSON object per stream, in an array.")
def trim(as_json: bool, **options: Any) -> None:
    """Drop entries every consumer group has acknowledged (XTRIM MINID); never others."""
    from embedq.stream import open_streams

    settings = build_settings(options)

    def body() -> int:
        results = []
        for stream in open_streams(settings):
            name = stream.keys.stream
            trimmed, minid = stream.trim()
            log.info("trimmed", stream=name, trimmed=trimmed, minid=minid)
            results.append({"stream": name, "trimmed": trimmed, "minid": minid})
        if as_json:
            click.echo(json.dumps(results, sort_keys=True))
        else:
            for r in results:
                kept = f"kept from {r['minid']}" if r["minid"] else "no consumer group: kept all"
                click.echo(f"{r['stream']}: trimmed {r['trimmed']} ({kept})")
        return ExitCode.OK

    run_guarded(body)
