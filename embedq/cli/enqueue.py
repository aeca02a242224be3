"""``embedq enqueue``: send a source as one job, with dedup and document sync."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import build_settings, common, log, run_guarded, setting
from embedq.core.deletes import DEFAULT as DEFAULT_MAX_DELETE
from embedq.core.deletes import MaxDelete
from embedq.core.errors import ConfigError, DeletesRefused, EmbedqError, ExitCode

if TYPE_CHECKING:
    import redis

    from embedq.core.config import Settings
    from embedq.core.records import Rejected
    from embedq.producer.client import Counts
    from embedq.producer.sources import Fields, Source
    from embedq.producer.sync import Cleanup, DocSync

_SHOWN_REJECTED = 5  # the reasons an enqueue that sent nothing prints


@click.command()
@click.argument("source", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "jsonl", "csv", "parquet", "text"]),
    default="auto",
    show_default=True,
    help="Source format; auto goes by the extension (in a directory, each file by its own; "
    "text reads every file of a directory as one document).",
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
@click.option(
    "--max-delete",
    default=DEFAULT_MAX_DELETE,
    show_default=True,
    help="With --cleanup: delete at most N ids, P% of the ids the document ledger holds, or "
    "all; past it nothing is deleted and enqueue exits 4 (the records are still sent).",
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
    from embedq.producer.sources import first_or_none, open_source
    from embedq.queue.jobs import check_job_id, new_job_id

    fmt, id_prefix, sql = options.pop("fmt"), options.pop("id_prefix"), options.pop("sql")
    job_id, progress_every = options.pop("job_id"), options.pop("progress_every")
    plan = _Plan(
        options.pop("dedup"),
        options.pop("doc_field"),
        options.pop("cleanup"),
        options.pop("max_delete"),
    )
    fields = _fields(options)
    settings = build_settings(options)
    path = _source_path(source, sql)

    def body() -> int:
        opened = open_source(
            path,
            fmt=fmt,
            fields=fields,
            id_prefix=id_prefix,
            sql=sql,
            dsn=settings.dsn,
            max_text_bytes=settings.max_text_bytes,
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
        first_rejected: list[Rejected] = []
        try:
            counts = _send(settings, where, job, plan, progress_every, first_rejected)
        except KeyboardInterrupt:
            return ExitCode.INTERRUPTED
        return _report(settings.stream, job, counts, first_rejected)

    run_guarded(body)


def _report(stream: str, job: str, counts: Counts, first_rejected: list[Rejected]) -> int:
    """The run's one line (and event), and its exit code: ``NOTHING_SENT`` when every record
    was rejected (a typo in a field name, most likely: the first reasons say which)."""
    summary = counts.as_dict()
    log.info("enqueued", job=job, stream=stream, **summary)
    click.echo(
        f"enqueued {counts.sent} records to {stream} ({counts.rejected} rejected)"
        f"; {counts.unchanged} unchanged, {counts.deleted} deleted"
        + (f", {counts.resumed} sent before" if counts.resumed else "")
        + f"; job {job}, {summary['elapsed_s']} s, {summary['records_per_s']:.0f}/s"
    )
    if counts.not_cleaned:
        click.echo(f"embedq: {counts.not_cleaned}", err=True)
    if counts.rejected and not counts.accepted:
        click.echo("embedq: nothing was sent: every record was rejected, e.g.", err=True)
        for item in first_rejected:
            click.echo(f"  {item.where}: {item.reason}", err=True)
        return ExitCode.NOTHING_SENT
    return ExitCode.OK


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
    from embedq.producer.sources import Fields

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
    max_delete: str = DEFAULT_MAX_DELETE

    def check(self) -> None:
        if (self.doc_field is None) != (self.cleanup is None):
            raise ConfigError("--doc-field and --cleanup go together: give both, or neither")
        MaxDelete.parse(self.max_delete)  # a typo is a usage error before anything is sent

    def sync(self, client: redis.Redis, settings: Settings) -> DocSync | None:
        """The document sync this plan asks for, if any."""
        from embedq.producer.sync import DocSync

        if not (self.doc_field and self.cleanup):
            return None
        bound = MaxDelete.parse(self.max_delete)
        stream, collection = settings.stream, settings.collection
        return DocSync(client, stream, collection, self.doc_field, self.cleanup, bound)


def _send(  # noqa: PLR0917 (the parts of one enqueue)
    settings: Settings,
    where: Source,
    job: str,
    plan: _Plan,
    progress_every: float,
    first_rejected: list[Rejected],
) -> Counts:
    """Run the producer over ``where`` as ``job``, with progress, keeping the first few
    rejected records. A stop (an error or Ctrl-C) says how to resume; a source that cannot
    be read is a ``ConfigError``; a refused cleanup says what was sent before it."""
    from embedq.core.progress import Progress
    from embedq.producer.client import Producer
    from embedq.queue.connection import connect

    def rejected(item: Rejected) -> None:
        log.warning("record_rejected", where=item.where, reason=item.reason)
        if len(first_rejected) < _SHOWN_REJECTED:
            first_rejected.append(item)

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
    sync = plan.sync(producer.client, settings)
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
        except DeletesRefused as exc:  # the job is sent: nothing to resume
            sent = producer.counts.sent
            raise DeletesRefused(f"enqueued {sent} records (job {job}), then {exc}") from None
        except (EmbedqError, KeyboardInterrupt) as exc:
            _stopped(job, producer.counts.sent, exc)
            raise
        finally:
            progress.close()


def _stopped(job: str, sent: int, exc: BaseException) -> None:
    log.warning("enqueue_stopped", job=job, sent=sent, error=str(exc) or "interrupted")
    if sent:  # only then can a resume help: it skips what was sent
        click.echo(f"embedq: stopped after {sent} sent; resume with --job {job}", err=True)
