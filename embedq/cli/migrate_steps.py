"""``embedq migrate``'s steps around the switch: --follow, --rollback, --drop-old and
--status (embedq.ops.migrate, embedq.ops.rollout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from embedq.core.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from embedq.ops.migrate import Migration
    from embedq.ops.rollout import Record, Rollout
    from embedq.queue.stream import Stream


def follow(rollout: Rollout, record: Record, interval_s: float) -> None:
    """The groups' lag every ``interval_s`` until SIGINT/SIGTERM: the new model's workers
    keep its collection current; this shows that they do."""
    import signal
    import threading

    from embedq.ops.rollout import group_line

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.is_set():
        click.echo("migrate: " + group_line("new", rollout.lag(record.group)), err=True)
        click.echo("migrate: " + group_line("live", rollout.lag(record.source_group)), err=True)
        stop.wait(interval_s)


def undo(
    migration: Migration, streams: list[Stream], *, rollback: bool, accepted: list[str]
) -> int:
    """--rollback or --drop-old; ``accepted``: collections whose Redis data loss the
    operator accepted (--accept-redis-loss)."""
    from embedq.ops.rollout import ROLLED_BACK, Rollout, backlog_of, group_line

    current, before = migration.previous()
    rollout = Rollout(streams, current)
    record = rollout.load()
    if rollback:
        migration.move_alias(before)
        click.echo(f"migrate: {migration.name} now points at {before} again (was {current})")
        if before in accepted:
            click.echo(
                f"migrate: {before} outlived Redis's data: run `embedq verify --adopt` for "
                f"{migration.name} now (it rebuilds the index of {before})"
            )
        if record is not None:
            rollout.save(record, phase=ROLLED_BACK)
            old = rollout.lag(record.source_group)
            click.echo("migrate: " + group_line("live", old))
            if backlog_of(old):
                click.echo(
                    f"migrate: {before} has {backlog_of(old):,} entries to catch up: run "
                    "workers with its model until that is 0"
                )
        return ExitCode.OK
    return _drop_old(migration, rollout, record, current, before)


def _drop_old(
    migration: Migration, rollout: Rollout, record: Record | None, current: str, before: str
) -> int:
    from embedq.ops.rollout import ACTIVE_S, OLD_DROPPED, active_consumers

    old = migration.open(before)
    old.ensure_collection(None, "", create=False)
    group = record.source_group if record is not None else ""
    if group:
        running = active_consumers(rollout.lag(group), ACTIVE_S)
        if running:
            raise ConfigError(
                f"workers still read group {group} for {before} ({', '.join(running[:5])}): "
                "stop the old-model workers first; nothing was dropped"
            )
    migration.drop(before)
    done = [f"dropped {before}"]
    if group:
        rollout.destroy_group(group)
        done.append(f"destroyed group {group}")
    rollout.forget_index(old.index_name)
    type(rollout)(rollout.streams, before).forget()  # its own migration's record, if any
    if record is not None:
        rollout.save(record, phase=OLD_DROPPED)
    click.echo(
        f"migrate: {', '.join(done)}, forgot its index; {migration.name} points at {current}"
    )
    click.echo("migrate: " + _scaler_line(migration, current, record))
    return ExitCode.OK


def _scaler_line(migration: Migration, live: str, record: Record | None) -> str:
    """Which group feeds the live collection: what KEDA's trigger must watch."""
    from embedq.sink.milvus import GROUP_PROPERTY

    group = migration.properties(live).get(GROUP_PROPERTY) or (record.group if record else "")
    if not group:
        return f"{live} is fed by the deployment's group (--group)"
    return (
        f"{live} is fed by group {group}: set the Helm chart's stream.group (KEDA's "
        f"consumerGroup, the workers' --group) to {group}"
    )


def status(migration: Migration, streams: list[Stream]) -> int:
    import json

    from embedq.ops.evaluate import recorded_evaluation
    from embedq.ops.migrate_guard import RUNBOOK, losses
    from embedq.ops.rollout import Rollout, group_line, next_step, records

    live = migration.live()
    click.echo(f"migrate: {migration.name} points at {live}")
    lost = losses(migration, streams)
    for loss in lost:
        click.echo(f"migrate: {loss.line()}")
    found = records(streams, migration.name)
    if lost:
        click.echo(f"migrate: next: recover as {RUNBOOK} says; other steps refuse until then")
        return ExitCode.OK
    if not found:
        click.echo("migrate: no migration recorded; next: --model NEW --backfill")
        return ExitCode.OK
    click.echo("migrate: " + _scaler_line(migration, live, None))
    for record in found:
        rollout_ = Rollout(streams, record.target)
        new = rollout_.lag(record.group)
        old = rollout_.lag(record.source_group) if record.phase != "old dropped" else None
        click.echo(
            f"migrate: {record.source} -> {record.target}: {record.phase}, {record.copied:,} "
            f"rows copied, {record.failed:,} failed"
        )
        click.echo("migrate:   " + group_line("new", new))
        if old is not None:
            click.echo("migrate:   " + group_line("live", old))
        evaluation = None
        if migration.exists(record.target):
            evaluation = recorded_evaluation(migration.open(record.target))
        shown = json.dumps(evaluation, sort_keys=True) if evaluation else "none recorded"
        click.echo(f"migrate:   evaluation {shown}")
        click.echo(f"migrate:   next: {next_step(record, live, new, old)}")
    return ExitCode.OK
