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
    from embedq.core.config import Settings
    from embedq.queue.lag import LagInfo
    from embedq.queue.stream import Stream
    from embedq.sink.milvus import Hit
    from embedq.sink.retrieval import Fusion, Mode


def _partition_hint(streams: Sequence[Stream], parts: Sequence[LagInfo]) -> list[str]:
    """A note when one stream was asked for, it does not exist, and partition streams of it
    do: the command probably lacks --partitions."""
    from embedq.queue.lag import partitions_found, partitions_hint

    if len(parts) != 1 or parts[0].group_exists or parts[0].length:
        return []
    found = partitions_found(streams[0].client, parts[0].stream)
    return [partitions_hint(parts[0].stream, found)] if found else []


def _groups(streams: Sequence[Stream], base: str, mine: LagInfo) -> list[LagInfo]:
    """Every consumer group's backlog on the streams, ``--group``'s first (a migration adds
    the new collection's group: embedq.ops.rollout)."""
    from embedq.queue.lag import group_names, merge_partitions
    from embedq.queue.stream import Stream

    names = group_names(streams[0].client, [s.keys.stream for s in streams])
    found = [mine]
    for name in names:
        if name != mine.group:
            parts = [Stream(s.client, s.keys.stream, name, s.consumer).lag() for s in streams]
            found.append(merge_partitions(base, name, parts))
    return found


@click.command()
@common
@milvus_reading
@click.option("--json", "as_json", is_flag=True, help="One JSON object (docs/operations.md).")
def lag(as_json: bool, **options: Any) -> None:
    """Show stream length, group lag, pending entries, consumers and dead letters, and
    whether Redis lost its data since the collection recorded the deployment's epoch
    (checked when the collection can be read: --milvus-uri, --collection)."""
    from embedq.ops.migrate_guard import live_group
    from embedq.queue.lag import (
        consumer_table,
        describe,
        group_table,
        lag_json,
        loss_fields,
        loss_lines,
        merge_partitions,
        partition_table,
    )
    from embedq.queue.stream import Stream, open_streams
    from embedq.sink.epoch import check_if_reachable

    settings = build_settings(options)

    def body() -> int:
        streams = open_streams(settings.replace(block_ms=0))
        # After a migration's promote the alias's collection has a group of its own.
        group = live_group(streams, settings.collection, settings.group)
        streams = [Stream(s.client, s.keys.stream, group, s.consumer) for s in streams]
        parts = [s.lag() for s in streams]
        hint = _partition_hint(streams, parts)
        standing = check_if_reachable(settings, streams)
        if as_json:
            found = lag_json(settings.stream, group, parts) | loss_fields(standing)
            info = merge_partitions(settings.stream, group, parts)
            found["groups"] = [g.as_dict() for g in _groups(streams, settings.stream, info)]
            click.echo(json.dumps(found, sort_keys=True))
            for line in hint:
                click.echo("embedq: " + " ".join(line.split()[1:]), err=True)
            return ExitCode.OK
        info = merge_partitions(settings.stream, group, parts)
        lines = loss_lines(standing) + describe(info) + hint
        groups = _groups(streams, settings.stream, info)
        for line in lines + partition_table(parts) + group_table(groups) + consumer_table(info):
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
@setting(
    "gateway_url",
    "--gateway",
    show_default=False,
    help="A running gateway's URL (embedq serve): it embeds and searches, no model loads here.",
)
@setting("gateway_key", show_default=False, help="The API key to send to --gateway.")
@LOG_LEVEL
def search(query: str, top_k: int, as_json: bool, **options: Any) -> None:
    """Embed QUERY with the worker's model and print the nearest stored entries (dense,
    sparse or hybrid, by what the collection holds: --mode). With --gateway, a running
    gateway embeds and searches (dense), and no model loads here."""
    mode = options.pop("mode")
    fusion = _fusion(options.pop("ranker"), options.pop("weights"))
    settings = build_settings(options)
    if settings.gateway_url and mode not in ("auto", "dense"):
        raise click.UsageError(
            f"--mode {mode}: a gateway searches dense vectors only; leave out --gateway "
            "(EMBEDQ_GATEWAY_URL) to search sparse or hybrid here"
        )

    def body() -> int:
        if settings.gateway_url:
            from embedq.api import client

            timeout_s = settings.api_timeout_s + 5  # the gateway's own deadline, then ours
            hits = client.search(
                settings.gateway_url, settings.gateway_key, query, top_k, timeout_s=timeout_s
            )
        else:
            hits = _search_here(settings, query, top_k, mode, fusion)
        _print_hits(hits, as_json)
        return ExitCode.OK

    run_guarded(body)


def _search_here(settings: Settings, query: str, k: int, mode: Mode, fusion: Fusion) -> list[Hit]:
    """Load the model in this process and search the collection (the slow path: the
    model's load, measured in docs/operations.md)."""
    # Not through embedq.worker: a search needs no Redis client nor worker machinery.
    from embedq.model.encoder import encoder_for, resolve_model_dir
    from embedq.sink import retrieval
    from embedq.sink.milvus import open_sink

    resolve_model_dir(settings.model)  # the cheap checks first, then the model loads
    sink = open_sink(settings, create=False)
    sink.ping()
    encoder = encoder_for(settings)
    sink.ensure_for(encoder, create=False)
    return retrieval.search(sink, encoder, query, k, mode=mode, fusion=fusion)


def _print_hits(hits: Sequence[Hit], as_json: bool) -> None:
    if as_json:
        for hit in hits:  # JSON Lines, as every list --json prints
            click.echo(json.dumps(dataclasses.asdict(hit), ensure_ascii=False))
        return
    for hit in hits:
        shown = hit.text if hit.text else json.dumps(hit.meta, ensure_ascii=False)
        click.echo(f"{hit.score:.4f}  {hit.id}  {shown[:120]}")
    if not hits:
        click.echo("no results (is the collection empty?)")


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
