"""``embedq migrate``: move the readers' alias to a new model's collection (embedq.ops.migrate)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import F, build_settings, common, milvus, model, run_guarded
from embedq.core.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from embedq.core.config import Settings
    from embedq.model.encoder import Encoder
    from embedq.ops.migrate import BackfillReport, Migration
    from embedq.ops.quality_gate import Gate
    from embedq.ops.rollout import Record, Rollout
    from embedq.queue.stream import Stream
    from embedq.sink.milvus import Sink


class Reporter:
    """Progress lines on stderr, at most one a second: done/todo, rate and ETA."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, done: int, todo: int, elapsed_s: float) -> None:
        from embedq.core.progress import eta_s, format_duration

        now = time.monotonic()
        if now - self.last < self.every_s and done < todo:
            return
        self.last = now
        rate = done / elapsed_s if elapsed_s > 0 else None
        eta = format_duration(eta_s(todo - done, rate))
        shown = f"{rate:,.0f} rows/s" if rate else "? rows/s"
        click.echo(f"migrate: {done:,}/{todo:,} rows embedded, {shown}, ETA {eta}", err=True)


def _said(result: BackfillReport) -> None:
    click.echo(
        f"migrate: backfill: {result.total:,} ids in the live collection, {result.copied:,} "
        f"copied, {result.stale:,} already newer there, {result.missing:,} deleted since, "
        f"{len(result.failed):,} failed ({result.elapsed_s:.1f}s)",
        err=True,
    )


def _backfilled(
    migration: Migration,
    streams: list[Stream],
    encoder: Encoder,
    settings: Settings,
    *,
    adopt: bool,
    wait_s: float,
) -> tuple[Rollout, Record, Sink]:
    """The migration toward ``encoder``'s model started (its group, its collection) and its
    backfill done: now, or by an earlier run."""
    from embedq.ops.migrate import backfill, begin
    from embedq.ops.rollout import BACKFILLED, BACKFILLING
    from embedq.worker.launch import Timing

    source, shadow, rollout, record = begin(
        migration, streams, encoder, group=settings.group, adopt=adopt
    )
    first = min(record.starts.values()) if record.starts else "?"
    click.echo(
        f"migrate: {record.target} is fed by group {record.group} from {first} on "
        f"({len(record.starts)} stream(s))",
        err=True,
    )
    if record.phase != BACKFILLING:
        return rollout, record, shadow

    def waiting(left: int) -> None:
        click.echo(
            f"migrate: waiting for group {record.source_group} to write {left:,} entries from "
            f"before the start into {record.source}",
            err=True,
        )

    rollout.wait_drained(record.source_group, record.starts, wait_s=wait_s, said=waiting)
    lease_ms = Timing(settings.min_idle_s).lease_ms
    result = backfill(source, shadow, encoder, streams, lease_ms=lease_ms, report=Reporter())
    _said(result)
    record = rollout.save(record, phase=BACKFILLED, copied=result.copied, failed=len(result.failed))
    if result.failed:
        click.echo(
            f"migrate: the new model fails on the text of {len(result.failed)} row(s) "
            f"({', '.join(result.failed[:5])}{', …' if len(result.failed) > 5 else ''}): "
            "they are not in the new collection (the log has each error)",
            err=True,
        )
    return rollout, record, shadow


def _promote(migration: Migration, rollout: Rollout, record: Record, max_backlog: int) -> None:
    """Move the alias to the new collection once its workers run and its group is caught
    up: readers then see a collection as current as the one they leave."""
    from embedq.ops.rollout import ACTIVE_S, PROMOTED, active_consumers, backlog_of

    info = rollout.lag(record.group)
    if not active_consumers(info, ACTIVE_S):
        raise ConfigError(
            f"no worker of the new model reads group {record.group}: start workers with this "
            f"--model (they write {record.target}), then promote; the alias was not moved"
        )
    backlog = backlog_of(info)
    if backlog > max_backlog:
        raise ConfigError(
            f"group {record.group} has {backlog:,} entries to write into {record.target} "
            f"(more than --max-backlog {max_backlog:,}): promote once its workers caught up"
        )
    live = migration.live()
    migration.move_alias(record.target)
    rollout.save(record, phase=PROMOTED)
    click.echo(
        f"migrate: {migration.name} now points at {record.target} (was {live}); group "
        f"{record.group} had {backlog:,} entries to write"
    )
    click.echo(
        f"migrate: next: replace the old-model workers (group {record.source_group} keeps "
        f"{record.source} complete for --rollback), then --drop-old; the new-model workers "
        f"scale on group {record.group}"
    )


def _evaluation(func: F) -> F:
    """--evaluate and the promote's quality gate (embedq.ops.quality_gate)."""
    existing = click.Path(exists=True, dir_okay=False, path_type=Path)
    for decorate in reversed(
        [
            click.option(
                "--evaluate",
                "queries",
                type=existing,
                help="A query set (JSONL, or text: a query a line): top-k overlap, recall@k "
                "and nDCG@10 of the live and --model's collections, recorded on the new one; "
                "alone, or after --backfill / before --promote.",
            ),
            click.option("--qrels", type=existing, help="TREC qrels for --evaluate's queries."),
            click.option(
                "--k", "top_k", default=10, show_default=True, type=click.IntRange(1, 1000)
            ),
            click.option(
                "--min-overlap",
                type=click.FloatRange(0, 1),
                help="--promote refuses (exit 4) below this overlap@k of the two models.",
            ),
            click.option(
                "--min-recall",
                type=click.FloatRange(0, 1),
                help="--promote refuses (exit 4) below this recall@k of the new model.",
            ),
            click.option(
                "--old-model",
                default="",
                help="The live collection's model for --evaluate (default: the packaged one).",
            ),
            click.option("--json", "as_json", is_flag=True, help="--evaluate: JSON Lines."),
        ]
    ):
        func = decorate(func)
    return func


def _with_gate(options: dict[str, Any]) -> tuple[Settings, Gate]:
    """The settings, and the quality gate the evaluation options describe."""
    from embedq.ops.evaluate import json_lines, table_lines
    from embedq.ops.quality_gate import Bar, Gate, old_encoder

    bar = Bar(options.pop("min_overlap"), options.pop("min_recall"))
    queries, qrels, as_json = options.pop("queries"), options.pop("qrels"), options.pop("as_json")
    k, old_model = options.pop("top_k"), options.pop("old_model")
    settings = build_settings(options)
    gate = Gate(
        bar,
        queries,
        qrels,
        k,
        old_encoder(settings, old_model),
        show=lambda e: click.echo("\n".join(json_lines(e) if as_json else table_lines(e))),
        say=lambda line: click.echo(f"migrate: {line}", err=True),
    )
    return settings, gate


def _plan(migration: Migration, encoder: Encoder, gate: Gate) -> int:
    """No action flag: evaluate (--evaluate), or print the plan; nothing else changes."""
    from embedq.ops.migrate import plan
    from embedq.sink.schema import model_fingerprint

    if gate.queries is not None:
        gate.evaluate_now(migration, encoder)
        return ExitCode.OK
    for line in plan(migration, model_fingerprint(encoder)):
        click.echo(f"migrate: {line}")
    return ExitCode.OK


@dataclass(frozen=True)
class _Steps:
    """What --backfill, --follow or --promote asked for."""

    promote: bool
    follow: bool
    adopt: bool
    interval_s: float
    max_backlog: int
    wait_s: float
    restart: bool  # --accept-redis-loss: drop a new-model collection no record made


def _before_begin(
    migration: Migration, streams: list[Stream], target: str, group: str, steps: _Steps
) -> None:
    """--adopt only on a quiet stream; --accept-redis-loss drops a new-model collection that
    no recorded migration made (Redis lost its data), for the migration to start again."""
    from embedq.ops.migrate_guard import refuse_unless_quiet
    from embedq.ops.rollout import Rollout

    if steps.adopt and migration.live() == migration.name:
        refuse_unless_quiet(streams, group, migration.name)
    if steps.restart and migration.exists(target) and Rollout(streams, target).load() is None:
        migration.drop(target)
        click.echo(
            f"migrate: dropped {target}: no recorded migration made it (Redis lost its "
            "data); the migration starts again",
            err=True,
        )


def _toward(
    migration: Migration,
    streams: list[Stream],
    encoder: Encoder,
    *,
    settings: Settings,
    gate: Gate,
    steps: _Steps,
) -> int:
    """--backfill, --follow or --promote toward ``encoder``'s collection."""
    from embedq.cli.migrate_steps import follow as follow_lag
    from embedq.ops.migrate import shadow_name
    from embedq.sink.schema import model_fingerprint

    target = shadow_name(migration.name, model_fingerprint(encoder))
    if migration.target() == target:
        click.echo(f"migrate: {migration.name} already serves this model ({target})")
        return ExitCode.OK
    _before_begin(migration, streams, target, settings.group, steps)
    rollout, record, shadow = _backfilled(
        migration, streams, encoder, settings, adopt=steps.adopt, wait_s=steps.wait_s
    )
    gate.check(migration.open(record.source), shadow, encoder, promoting=steps.promote)
    if steps.promote:
        _promote(migration, rollout, record, steps.max_backlog)
    elif steps.follow:
        follow_lag(rollout, record, steps.interval_s)
    else:
        click.echo(
            f"migrate: next: start workers with this --model (group {record.group}, "
            f"collection {record.target}), then --promote"
        )
    return ExitCode.OK


@click.command()
@click.option(
    "--promote", is_flag=True, help="Move the alias to --model's collection once it is caught up."
)
@click.option("--rollback", is_flag=True, help="Move the alias back to the collection it replaced.")
@click.option(
    "--drop-old",
    is_flag=True,
    help="Drop the collection the live one replaced, its consumer group and its index.",
)
@click.option(
    "--follow", is_flag=True, help="--backfill, then show both groups' lag every --interval s."
)
@click.option(
    "--backfill",
    is_flag=True,
    help="Create --model's collection and consumer group, and copy the live collection.",
)
@click.option("--status", is_flag=True, help="Phase, rows copied, each group's lag, next step.")
@click.option(
    "--adopt",
    is_flag=True,
    help="Allow renaming --collection (not yet an alias) and creating the alias on it.",
)
@click.option(
    "--accept-redis-loss",
    "accept_loss",
    is_flag=True,
    help="After Redis lost its data and `embedq verify --adopt` recovered the live "
    "collection: go on (--backfill starts the migration again; README runbook).",
)
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option(
    "--max-backlog",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="--promote waits for the new collection's group to have at most this many entries left.",
)
@click.option(
    "--wait",
    "wait_s",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds the backfill waits for the live collection's group to reach the start.",
)
@_evaluation
@common
@milvus
@model
def migrate(
    *,
    promote: bool,
    rollback: bool,
    drop_old: bool,
    follow: bool,
    backfill: bool,
    status: bool,
    adopt: bool,
    accept_loss: bool,
    interval: float,
    max_backlog: int,
    wait_s: float,
    **options: Any,
) -> None:
    """Move the collection (an alias for readers) to another model without a pause in search.

    With --model NEW and no action flag: print the plan, change nothing. --backfill creates
    NEW's collection and its own consumer group (every write from now on reaches it) and
    copies the live collection, re-embedded; then start workers with --model NEW. --promote
    --model NEW moves the alias once they caught up; --rollback moves it back (the old
    collection kept receiving every write); --drop-old drops the replaced collection and
    its group. --status shows where it stands. A collection not yet behind an alias is
    adopted only with --adopt, with the writers paused. After Redis lost its data every step
    that changes something refuses (exit 4) until the README runbook's recovery.
    """
    from embedq.cli.migrate_steps import status as status_lines
    from embedq.cli.migrate_steps import undo
    from embedq.model.encoder import encoder_for, resolve_model_dir
    from embedq.ops.migrate import Migration
    from embedq.ops.migrate_guard import refuse_if_lost
    from embedq.queue.stream import open_streams
    from embedq.sink.milvus import open_sink

    if promote + rollback + drop_old + follow + backfill + status > 1:
        raise click.UsageError(
            "give one of --promote, --rollback, --drop-old, --follow, --backfill, --status"
        )
    settings, gate = _with_gate(options)

    def body() -> int:
        migration = Migration(open_sink(settings, create=False))
        streams = open_streams(settings.replace(block_ms=0))
        if status:
            return status_lines(migration, streams)
        changes = rollback or drop_old or promote or follow or backfill
        accepted = refuse_if_lost(migration, streams, accept=accept_loss) if changes else []
        if rollback or drop_old:
            return undo(migration, streams, rollback=rollback, accepted=accepted)
        resolve_model_dir(settings.model)
        encoder = encoder_for(settings)
        if not (promote or follow or backfill):
            return _plan(migration, encoder, gate)
        steps = _Steps(promote, follow, adopt, interval, max_backlog, wait_s, accept_loss)
        return _toward(migration, streams, encoder, settings=settings, gate=gate, steps=steps)

    run_guarded(body)
