"""Working the stream: ``init`` creates the group, ``worker`` embeds into Milvus,
``reclaim`` takes over entries dead workers left pending."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import click

from embedq.cli.options import (
    build_settings,
    common,
    log,
    milvus,
    model,
    processing,
    run_guarded,
    setting,
)
from embedq.cli.progress import loading


@click.command()
@common
@milvus
@model
@click.option(
    "--with-collection",
    is_flag=True,
    help="Also create the Milvus collection (loads the model to learn its dimension).",
)
def init(with_collection: bool, **options: Any) -> None:
    """Create the stream and the consumer group at 0 (MKSTREAM), idempotently.

    Run it before anything scales on the group (the Helm hook Job, the compose init
    service): KEDA reads a missing group as no lag.
    """
    from embedq.queue.stream import open_streams

    settings = build_settings(options)

    def body() -> int:
        for stream in open_streams(settings.replace(block_ms=0)):
            created = stream.ensure_group()
            name = stream.keys.stream
            log.info("group_ready", stream=name, group=settings.group, created=created)
            click.echo(
                f"group {settings.group} on {name}: "
                + ("created at 0" if created else "already there")
            )
        if with_collection:
            from embedq.model.encoder import encoder_for
            from embedq.sink.milvus import open_sink

            encoder = encoder_for(settings)
            made = open_sink(settings).ensure_for(encoder)
            click.echo(
                f"collection {settings.collection}: "
                + ("created" if made else "already there")
                + f" ({encoder.width} dimensions, {encoder.name})"
            )
        return 0

    run_guarded(body)


@click.command()
@common
@milvus
@model
@processing
@setting("read_count", help="Entries read per XREADGROUP (the batching window).")
@setting(
    "read_hold_s",
    "--read-hold",
    help="Seconds of work (at the measured rate) one read may take, at most --read-count "
    "entries, so that workers share a backlog; 0: always --read-count.",
)
@setting(
    "replicas",
    help="Model replicas per device, each on its own thread/CUDA stream "
    "(0: auto, 2 on a CPU, 1 on CUDA).",
)
@setting("devices", help="One worker process per device: all, or a list such as 0,1.")
@setting(
    "procs_per_device",
    help="Worker processes per device, each its own consumer sharing the device (a fast GPU "
    "needs more than one Python process to feed it); supervised like --devices.",
)
@setting("block_ms", help="XREADGROUP BLOCK in milliseconds.")
@setting("drain", is_flag=True, help="Exit 0 once nothing is left to read or pending.")
@setting("fault_point", hidden=True)
@setting(
    "trim_interval_s",
    "--trim-interval",
    type=float,
    help="Seconds between trims of fully acknowledged entries (0: never).",
)
@setting(
    "vector_cache_size",
    help="Vectors kept by text hash so a repeated text skips the model (0: off).",
)
@setting(
    "stage_timeout_s",
    "--stage-timeout",
    type=float,
    help="Seconds a stage may spend on one batch (retries count as progress) before it is "
    "stuck: its entries are let go for another worker and /healthz fails.",
)
@setting("metrics_port", help="Serve /metrics, /healthz and /readyz on this port (0: off).")
@setting("metrics_host", help="Address the metrics port binds (127.0.0.1: this machine only).")
@setting("metrics_backlog", help="Listen backlog of the metrics port.")
@setting(
    "online",
    help="Also answer online requests (embedq serve): the interactive lane is read first.",
)
@setting(
    "api_timeout_s",
    "--request-timeout",
    type=float,
    help="The gateways' --request-timeout: how long answers are kept for them.",
)
def worker(**options: Any) -> None:
    """Embed entries from the stream into Milvus until stopped."""
    settings = build_settings(options)

    def body() -> int:
        def echo_summary(stats: Any, released: bool = False) -> None:
            click.echo(summary_line(stats.as_dict(), released=released))

        stats = None
        # A first line at once (before torch is imported), then one every 10 s until the
        # model is loaded: a worker used to say nothing for 15-45 s (issue 28).
        with loading(settings) as loaded:
            from embedq.worker import launch

            if not (settings.devices or settings.procs_per_device > 1):
                released = partial(echo_summary, released=True)
                stats = launch.run_worker(settings, released, on_loaded=loaded)
        if stats is None:  # each device's process loads its own model, and says so
            return launch.run_device_workers(settings)
        echo_summary(stats)
        return 0

    run_guarded(body)


def summary_line(summary: dict[str, Any], *, released: bool = False) -> str:
    """A worker's exit line (``Stats.as_dict``): what it embedded, deleted and
    dead-lettered; ``released``: it let the batches in hand go when --grace ran out."""
    return (
        f"embedded {summary['texts']} texts in {summary['elapsed_s']} s "
        f"({summary['working_s']} s working, {summary['texts_per_s']} texts/s), "
        f"{summary['deleted']} deleted, {summary['dead_lettered']} dead-lettered"
        + ("; the batches in hand past --grace stay pending" if released else "")
    )


@click.command()
@common
@milvus
@model
@processing
@setting("read_count", help="Entries claimed per XAUTOCLAIM.")
@click.option("--once", is_flag=True, help="One pass over the pending list, then exit.")
def reclaim(once: bool, **options: Any) -> None:
    """Take over entries idle past --min-idle (dead workers' leftovers) and process them."""
    settings = build_settings(options)

    def body() -> int:
        from embedq.worker.launch import run_reclaim

        summary = run_reclaim(settings, once=once)
        log.info("reclaim_done", **dataclasses.asdict(summary))
        click.echo(
            f"reclaimed {summary.claimed} entries ({summary.dead_lettered} dead-lettered, "
            f"{summary.deleted} with deleted payloads), "
            f"removed {summary.consumers_removed} idle consumers"
        )
        return 0

    run_guarded(body)
