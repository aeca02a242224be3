"""Operating a fleet: ``lag`` and ``top`` show the backlog, ``exporter`` serves it to
Prometheus, ``search`` queries what was stored."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import (
    LOG_LEVEL,
    build_settings,
    common,
    log,
    milvus_reading,
    model,
    run_guarded,
    setting,
)
from embedq.core.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from embedq.queue.lag import LagInfo
    from embedq.queue.stream import Stream


def _partition_hint(streams: Sequence[Stream], parts: Sequence[LagInfo]) -> list[str]:
    """A note when one stream was asked for, it does not exist, and partition streams of it
    do: the command probably lacks --partitions."""
    from embedq.queue.lag import partitions_found, partitions_hint

    if len(parts) != 1 or parts[0].group_exists or parts[0].length:
        return []
    found = partitions_found(streams[0].client, parts[0].stream)
    return [partitions_hint(parts[0].stream, found)] if found else []


@click.command()
@common
@milvus_reading
@click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/operations.md).")
def lag(as_json: bool, **options: Any) -> None:
    """Show stream length, group lag, pending entries, consumers and dead letters, and
    whether Redis lost its data since the collection recorded the deployment's epoch
    (checked when the collection can be read: --milvus-uri, --collection)."""
    from embedq.queue.lag import (
        consumer_table,
        describe,
        lag_json,
        loss_fields,
        loss_lines,
        merge_partitions,
        partition_table,
    )
    from embedq.queue.stream import open_streams
    from embedq.sink.epoch import check_if_reachable

    settings = build_settings(options)

    def body() -> int:
        streams = open_streams(settings.replace(block_ms=0))
        parts = [s.lag() for s in streams]
        hint = _partition_hint(streams, parts)
        standing = check_if_reachable(settings, streams)
        if as_json:
            found = lag_json(settings.stream, settings.group, parts) | loss_fields(standing)
            click.echo(json.dumps(found, sort_keys=True))
            for line in hint:
                click.echo("embedq: " + " ".join(line.split()[1:]), err=True)
            return ExitCode.OK
        info = merge_partitions(settings.stream, settings.group, parts)
        lines = loss_lines(standing) + describe(info) + hint
        for line in lines + partition_table(parts) + consumer_table(info):
            click.echo(line)
        return ExitCode.OK

    run_guarded(body)


@click.command()
@click.argument("query")
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit, one a line.")
@click.option(
    "--mode",
    type=click.Choice(["auto", "dense", "sparse", "hybrid"]),
    default="auto",
    show_default=True,
    help="Dense, sparse or both fused; auto uses every vector field the collection has.",
)
@click.option(
    "--ranker",
    type=click.Choice(["rrf", "weighted"]),
    default="rrf",
    show_default=True,
    help="How hybrid fuses the two lists: reciprocal rank (k=60) or weighted scores.",
)
@click.option(
    "--weights",
    default="0.5,0.5",
    show_default=True,
    help="DENSE,SPARSE weights for --ranker weighted.",
)
@milvus_reading
@model
@LOG_LEVEL
def search(query: str, top_k: int, as_json: bool, **options: Any) -> None:
    """Embed QUERY with the worker's model and print the nearest stored entries (dense,
    sparse or hybrid, by what the collection holds: --mode)."""
    from embedq.model.encoder import resolve_model_dir
    from embedq.sink import retrieval
    from embedq.sink.milvus import open_sink
    from embedq.worker.launch import encoder_for

    mode = options.pop("mode")
    fusion = _fusion(options.pop("ranker"), options.pop("weights"))
    settings = build_settings(options)

    def body() -> int:
        resolve_model_dir(settings.model)  # the cheap checks first, then the model loads
        sink = open_sink(settings, create=False)
        sink.ping()
        encoder = encoder_for(settings)
        sink.ensure_for(encoder, create=False)
        hits = retrieval.search(sink, encoder, query, top_k, mode=mode, fusion=fusion)
        if as_json:
            for hit in hits:  # JSON Lines, as every list --json prints
                click.echo(json.dumps(dataclasses.asdict(hit), ensure_ascii=False))
            return ExitCode.OK
        for hit in hits:
            shown = hit.text if hit.text else json.dumps(hit.meta, ensure_ascii=False)
            click.echo(f"{hit.score:.4f}  {hit.id}  {shown[:120]}")
        if not hits:
            click.echo("no results (is the collection empty?)")
        return ExitCode.OK

    run_guarded(body)


def _fusion(ranker: str, weights: str) -> Any:
    from embedq.sink.retrieval import Fusion

    try:
        dense, sparse = (float(w) for w in weights.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{weights!r}: give two numbers, DENSE,SPARSE (e.g. 0.7,0.3)", param_hint="--weights"
        ) from None
    return Fusion(ranker=ranker, dense_weight=dense, sparse_weight=sparse)  # type: ignore[arg-type]


@click.command()
@common
@milvus_reading
@setting("metrics_port", help="Port for /metrics, /healthz and /readyz (required).")
@setting("metrics_host", help="Address the metrics port binds (127.0.0.1: this machine only).")
@setting("metrics_backlog", help="Listen backlog of the metrics port.")
def exporter(**options: Any) -> None:
    """Serve the stream's gauges (backlog, lag, pending, consumers, dead letters, the age of
    the oldest waiting and pending entries) and probes.

    The one source of the stream gauges: workers export only their own counters. No model
    is loaded; run exactly one per deployment (the Helm chart does), so the gauges stay
    visible with no worker running. Redis is sampled in the background with a short
    timeout: a scrape never waits on it. Every 30 s it also compares the deployment's epoch
    with the collection's (--milvus-uri, --collection): embedq_redis_data_lost is 1 when
    Redis lost its data. Stops on SIGINT/SIGTERM.
    """
    import signal
    import threading

    from embedq.ops.exporter import serve_exporter

    settings = build_settings(options)
    if not settings.metrics_port:
        raise click.UsageError("embedq exporter needs --metrics-port (or EMBEDQ_METRICS_PORT)")

    def body() -> int:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            server, sampler = serve_exporter(settings)
        except OSError as exc:
            raise ConfigError(f"cannot listen on port {settings.metrics_port}: {exc}") from None
        log.info("exporter_started", stream=settings.stream, group=settings.group)
        stop.wait()
        server.close()
        sampler.stop()
        log.info("exporter_stopped")
        return ExitCode.OK

    run_guarded(body)


@click.command()
@common
@milvus_reading
@click.option(
    "--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds."
)
@click.option(
    "--iterations", default=0, type=click.IntRange(min=0), help="Stop after N (0: never)."
)
@click.option(
    "--window",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Rate window (s).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per sample (lag --json + rates)."
)
def top(interval: float, iterations: int, window: float, as_json: bool, **options: Any) -> None:
    """A refreshing view: lag, pending, throughput, ETA to drain, consumers, dead letters;
    and, checked once at start, whether Redis lost its data (as ``lag``)."""
    import time

    from embedq.ops.top import Window, render
    from embedq.queue.lag import loss_fields, loss_lines, merge_partitions
    from embedq.queue.stream import open_streams
    from embedq.sink.epoch import check_if_reachable

    settings = build_settings(options)
    clear = sys.stdout.isatty() and not as_json

    def body() -> int:
        streams = open_streams(settings.replace(block_ms=0))
        samples = Window(window)
        shown = 0
        standing = check_if_reachable(settings, streams)
        try:
            while True:
                parts = [s.lag() for s in streams]
                info = merge_partitions(settings.stream, settings.group, parts)
                rates = samples.add(info)
                if as_json:
                    found = {**info.as_dict(), **rates.as_dict(), **loss_fields(standing)}
                    click.echo(json.dumps(found, sort_keys=True))
                else:
                    # Home and clear on a terminal; frames one after another in a pipe or log.
                    hints = [*loss_lines(standing), *_partition_hint(streams, parts)]
                    screen = "\n".join([render(info, rates), *hints])
                    click.echo(("\x1b[H\x1b[2J" if clear else "") + screen + "\n")
                shown += 1
                if iterations and shown >= iterations:
                    return ExitCode.OK
                time.sleep(interval)
        except KeyboardInterrupt:
            return ExitCode.OK

    run_guarded(body)
