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
from embedq.config import Settings


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
    from embedq.stream import open_streams

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
            from embedq.encoder import Encoder
            from embedq.sink import open_sink

            encoder = Encoder(settings.model, settings.device, settings.dtype)
            made = open_sink(settings).ensure_collection(encoder.dimension, encoder.name)
            click.echo(
                f"collection {settings.collection}: "
                + ("created" if made else "already there")
                + f" ({encoder.dimension} dimensions, {encoder.name})"
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
    "replicas",
    help="Model replicas per device, each on its own thread/CUDA stream "
    "(0: auto, 2 on a CPU, 1 on CUDA).",
)
@setting("devices", help="One worker process per device: all, or a list such as 0,1.")
@setting("block_ms", help="XREADGROUP BLOCK in milliseconds.")
@setting("drain", is_flag=True, help="Exit 0 once nothing is left to read or pending.")
@setting("fault_point", hidden=True)
@setting(
    "trim_interval_s",
    "--trim-interval",
    type=float,
    help="Seconds between trims of fully acknowledged entries (0: never).",
)
@setting("metrics_port", help="Serve /metrics, /healthz and /readyz on this port (0: off).")
def worker(**options: Any) -> None:
    """Embed entries from the stream into Milvus until stopped."""
    settings = build_settings(options)

    def body() -> int:
        from embedq.health import reachable
        from embedq.metrics import WorkerMetrics
        from embedq.worker import Worker, build_worker

        if settings.devices:
            return run_device_workers(settings)
        metrics, booted = WorkerMetrics(), list[Worker]()
        server = _worker_metrics_server(settings, metrics, booted)
        work = build_worker(settings, metrics)
        booted.append(work)
        if server is not None:
            server.require("milvus", reachable(work.sink.ping))
            enc = work.encoder
            metrics.describe_model(enc.name, enc.device, _dtype(enc.dtype), enc.dimension)
        work.install_signal_handlers()
        stats = work.run()
        summary = stats.as_dict()
        click.echo(
            f"embedded {summary['texts']} texts in {summary['elapsed_s']} s "
            f"({summary['texts_per_s']} texts/s), {summary['dead_lettered']} dead-lettered"
        )
        return 0

    run_guarded(body)


def run_device_workers(settings: Settings) -> int:
    """``--devices``: one worker process per listed device, supervised here."""
    from embedq.replicas import parse_devices, run_per_device, settings_per_device, worker_process

    per_device = settings_per_device(settings, parse_devices(settings.devices))
    return run_per_device(per_device, worker_process, grace_s=settings.grace_s + 5)


def _dtype(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def _worker_metrics_server(settings: Settings, metrics: Any, booted: list[Any]) -> Any:
    """Start the worker's /metrics, /healthz, /readyz before the model loads (0: none).

    /readyz stays 503 until ``booted`` holds the worker, and again once it is stopping.
    """
    if not settings.metrics_port:
        return None
    from embedq.health import serve_worker_metrics
    from embedq.stream import open_streams

    return serve_worker_metrics(
        metrics,
        settings.metrics_port,
        # Ready while the pipeline runs: not while loading, stopping, or after a stage crashed.
        ready=lambda: bool(booted) and booted[0].ready,
        # Its own client: a scrape must not queue behind the worker's blocked XREADGROUP.
        streams=open_streams(settings.replace(block_ms=0)),
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
        from embedq.reclaimer import run_reclaim_all
        from embedq.worker import build_worker

        # One model: reclaimed entries are processed in this thread, one batch at a time.
        work = build_worker(settings.replace(replicas=1))
        work.install_signal_handlers()
        work.prepare()
        work.heartbeat.start()  # keeps what this process took while it works on it
        try:
            summary = run_reclaim_all(
                [
                    (work.reclaimers[lane.keys.stream], partial(work.process, lane=lane))
                    for lane in work.lanes
                ],
                once=once,
                interval_s=settings.reclaim_interval_s,
                stop=work.stop_requested,
            )
        finally:
            work.heartbeat.stop()
        log.info("reclaim_done", **dataclasses.asdict(summary))
        click.echo(
            f"reclaimed {summary.claimed} entries ({summary.dead_lettered} dead-lettered, "
            f"{summary.deleted} with deleted payloads), "
            f"removed {summary.consumers_removed} idle consumers"
        )
        return 0

    run_guarded(body)
