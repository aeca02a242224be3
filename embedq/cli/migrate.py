"""``embedq migrate``: move the readers' alias to a new model's collection (embedq.ops.migrate)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import LOG_LEVEL, build_settings, milvus, model, run_guarded
from embedq.core.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from embedq.model.encoder import Encoder
    from embedq.ops.migrate import Migration, PassReport
    from embedq.sink.milvus import Sink

MAX_PASSES = 20  # catch-up passes before giving up on writes that arrive faster than it copies


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


def _passes(
    source: Sink, shadow: Sink, encoder: Encoder, *, newer_only: bool = False
) -> PassReport:
    """Catch up until a pass finds nothing to do; the last pass's report."""
    from embedq.ops.migrate import catch_up

    for number in range(1, MAX_PASSES + 1):
        result = catch_up(source, shadow, encoder, newer_only=newer_only, report=Reporter())
        _said(number, result)
        if result.idle or newer_only:
            return result
    raise ConfigError(
        f"the shadow collection did not catch up in {MAX_PASSES} passes: writes arrive "
        "faster than it copies them; run `embedq migrate --follow` and promote later"
    )


def _said(number: int, result: PassReport) -> None:
    click.echo(
        f"migrate: pass {number}: {result.total:,} rows in the live collection, "
        f"{result.copied:,} embedded, {result.deleted:,} deleted, {len(result.failed):,} failed "
        f"({result.elapsed_s:.1f}s)",
        err=True,
    )


def _follow(source: Sink, shadow: Sink, encoder: Encoder, interval_s: float) -> None:
    import signal
    import threading

    from embedq.ops.migrate import catch_up

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    number = 0
    while not stop.is_set():
        number += 1
        result = catch_up(source, shadow, encoder, report=Reporter())
        if not result.idle:
            _said(number, result)
        stop.wait(interval_s)


def _undo(migration: Migration, *, rollback: bool) -> int:
    current, before = migration.previous()
    if rollback:
        migration.move_alias(before)
        click.echo(f"migrate: {migration.name} now points at {before} again (was {current})")
    else:
        migration.drop(before)
        click.echo(f"migrate: dropped {before}; {migration.name} points at {current}")
    return ExitCode.OK


def _toward(
    migration: Migration,
    encoder: Encoder,
    *,
    promote: bool,
    follow: bool,
    adopt: bool,
    interval_s: float,
) -> int:
    """--backfill, --follow or --promote toward ``encoder``'s collection."""
    from embedq.ops.migrate import shadow_name, source_sink
    from embedq.sink.schema import model_fingerprint

    live = migration.adopt(allowed=adopt)
    target = shadow_name(migration.name, model_fingerprint(encoder))
    if live == target:
        click.echo(f"migrate: {migration.name} already serves this model ({live})")
        return ExitCode.OK
    source = source_sink(migration, live)
    shadow = migration.shadow(source, encoder)
    failed = _passes(source, shadow, encoder).failed
    if failed and promote:
        raise ConfigError(
            f"the new model fails on the text of {len(failed)} row(s) ({', '.join(failed[:5])}"
            f"{', …' if len(failed) > 5 else ''}): promoting would lose them from search; "
            "fix or delete those rows, then promote (the log has each error)"
        )
    if follow:
        _follow(source, shadow, encoder, interval_s)
    elif promote:
        migration.move_alias(target)
        _passes(source, shadow, encoder, newer_only=True)  # what landed while it moved
        click.echo(f"migrate: {migration.name} now points at {target} (was {live})")
    else:
        click.echo(f"migrate: {target} is caught up; promote with --promote")
    return ExitCode.OK


@click.command()
@click.option(
    "--promote", is_flag=True, help="Catch up, then move the alias to --model's collection."
)
@click.option("--rollback", is_flag=True, help="Move the alias back to the collection it replaced.")
@click.option("--drop-old", is_flag=True, help="Drop the collection the live one replaced.")
@click.option("--follow", is_flag=True, help="Keep catching up every --interval s until stopped.")
@click.option("--backfill", is_flag=True, help="Create --model's collection and catch up once.")
@click.option(
    "--adopt",
    is_flag=True,
    help="Allow renaming --collection (not yet an alias) and creating the alias on it.",
)
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@milvus
@model
@LOG_LEVEL
def migrate(
    *,
    promote: bool,
    rollback: bool,
    drop_old: bool,
    follow: bool,
    backfill: bool,
    adopt: bool,
    interval: float,
    **options: Any,
) -> None:
    """Move the collection (an alias for readers) to another model without a pause in search.

    With --model NEW and no action flag: print the plan, change nothing. --backfill creates
    NEW's shadow collection and backfills it from the stored text (--follow: and keeps
    catching up with the writes that arrive, until stopped). Then --promote --model NEW moves
    the alias atomically; --rollback moves it back; --drop-old drops the replaced
    collection. A collection not yet behind an alias is adopted only with --adopt.
    """
    from embedq.model.encoder import resolve_model_dir
    from embedq.ops.migrate import Migration, plan
    from embedq.sink.milvus import open_sink
    from embedq.sink.schema import model_fingerprint
    from embedq.worker.launch import encoder_for

    if promote + rollback + drop_old + follow + backfill > 1:
        raise click.UsageError(
            "give one of --promote, --rollback, --drop-old, --follow, --backfill"
        )
    settings = build_settings(options)

    def body() -> int:
        sink = open_sink(settings, create=False)
        migration = Migration(sink)
        if rollback or drop_old:
            return _undo(migration, rollback=rollback)
        resolve_model_dir(settings.model)
        encoder = encoder_for(settings)
        if not (promote or follow or backfill):
            for line in plan(migration, model_fingerprint(encoder)):
                click.echo(f"migrate: {line}")
            return ExitCode.OK
        return _toward(
            migration, encoder, promote=promote, follow=follow, adopt=adopt, interval_s=interval
        )

    run_guarded(body)
