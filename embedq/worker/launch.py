"""The composition root: everything a worker runs on is resolved and built here, once.

``resolve_runtime`` decides device, dtype, batch limits and model replicas from the
settings and the machine (as infinity's loading strategy does); ``assemble`` wires a worker
from its stream, encoders and sink (heartbeat, reclaimers, batcher, settler, retries);
``build_worker`` opens those from settings. The CLI calls ``run_worker``, ``run_reclaim``
and ``run_device_workers``; nothing else wires.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import structlog

from embedq.core import logs
from embedq.core.backoff import Retrier, dependency
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode, InfrastructureError
from embedq.core.keys import lane_stream
from embedq.core.records import Limits
from embedq.model import tokenizing
from embedq.model.encoder import Encoder, encoder_for, resolve_device
from embedq.model.identity import identity_of
from embedq.model.vector_cache import Vector, VectorCache
from embedq.queue.jobs import JobLedger
from embedq.queue.online_wire import Stamp
from embedq.queue.stream import Stream, open_partitions, open_stream
from embedq.queue.versions import Versions
from embedq.sink.milvus import Sink, open_sink
from embedq.worker.batcher import Batcher, BatchPolicy
from embedq.worker.heap import settle_heap
from embedq.worker.heartbeat import Heartbeat, InFlight
from embedq.worker.lane import Gate, OnlineLane
from embedq.worker.loop import Parts, Worker
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.model_stage import Encoding
from embedq.worker.packing import batch_limits
from embedq.worker.pipeline import Stats
from embedq.worker.reclaimer import ConsumerTidy, Reclaimer, ReclaimSummary
from embedq.worker.replicas import (
    parse_devices,
    replicas_for,
    run_per_device,
    settings_per_device,
    share_cpu_threads,
)
from embedq.worker.settler import Settler
from embedq.worker.watchdog import Watchdog
from embedq.worker.write_order import Ordering

log = structlog.get_logger("embedq.worker.launch")


@dataclass(frozen=True)
class Runtime:
    """What the settings leave to the machine, decided once."""

    device: str
    max_batch_tokens: int
    max_batch_rows: int
    replicas: int


def resolve_runtime(settings: Settings, device: str | None = None) -> Runtime:
    """Device, batch limits (0 = the device's default) and replica count (0 = auto)."""
    import torch

    device = device or resolve_device(settings.device)
    tokens, rows = batch_limits(device, settings.max_batch_tokens, settings.max_batch_rows)
    replicas = replicas_for(device, settings.replicas, torch.get_num_threads())
    return Runtime(device, tokens, rows, replicas)


def resolve_batch_settings(settings: Settings, device: str | None = None) -> Settings:
    """``settings`` with "auto" batch limits replaced by the device's defaults."""
    if settings.max_batch_tokens and settings.max_batch_rows:
        return settings
    runtime = resolve_runtime(settings, device)
    return settings.replace(
        max_batch_tokens=runtime.max_batch_tokens, max_batch_rows=runtime.max_batch_rows
    )


def resolved(settings: Settings, device: str) -> Settings:
    """``settings`` with what they leave to the machine decided (``resolve_runtime``, once
    per worker): batch limits and the replica count for ``device``."""
    runtime = resolve_runtime(settings, device)
    return settings.replace(
        max_batch_tokens=runtime.max_batch_tokens,
        max_batch_rows=runtime.max_batch_rows,
        replicas=runtime.replicas,
    )


def first_encoder(settings: Settings) -> Encoder:
    tokenizing.serial()  # before the encoder's own first batch (its word path's probes)
    return encoder_for(settings)


def replicate(first: Encoder, replicas: int) -> list[Encoder]:
    """``first`` and a replica per extra model thread (weights shared)."""
    if first.device == "cpu" and replicas > 1:
        share = share_cpu_threads(replicas)
        log.info("cpu_threads_shared", replicas=replicas, threads_each=share)
    # Each replica gets its own model thread in the pipeline and, on CUDA, its own stream.
    return [first] + [first.replica() for _ in range(replicas - 1)]


def load_encoders(settings: Settings) -> list[Encoder]:
    """The model, once, and a replica per extra model thread (weights shared)."""
    first = first_encoder(settings)
    return replicate(first, resolved(settings, first.device).replicas)


def fault_injector(point: str) -> Callable[[str], None]:
    """Tests' ``--fault-point``: SIGKILL this process when it reaches ``point``.

    A real kill at an exact stage is the only way to prove that a crash there loses and
    duplicates nothing. With no point set, a no-op.
    """

    def reached(where: str) -> None:
        if point and where == point:
            log.warning("fault_injected", point=where)
            os.kill(os.getpid(), signal.SIGKILL)

    return reached


def assemble(
    settings: Settings,
    stream: Stream,
    encoders: Encoder | Sequence[Encoder],
    sink: Sink,
    metrics: WorkerMetrics | None = None,
) -> Worker:
    """A worker around ``stream`` (and its partitions), ``encoders`` and ``sink``."""
    encoders = [encoders] if isinstance(encoders, Encoder) else list(encoders)
    settings = resolve_batch_settings(settings, encoders[0].device)
    metrics = metrics or WorkerMetrics(stream=settings.stream, group=settings.group)
    sink.on_row_fallback = metrics.upsert_row_fallback.inc
    partitions = worker_streams(settings, stream)
    stats, in_flight = Stats(), InFlight(on_change=metrics.in_flight.set)
    crash: list[BaseException] = []
    watchdog = Watchdog(settings.stage_timeout_s)
    retrying = Retrier(
        on_failure=count_failures(metrics), give_up=lambda: bool(crash), on_attempt=watchdog.touch
    )
    settler = Settler(
        sink,
        JobLedger(stream.client, stream.keys.stream),
        ordering=ordering(settings, partitions, retrying),
        retrying=retrying,
        in_flight=in_flight,
        metrics=metrics,
        stats=stats,
        fault_point=fault_injector(settings.fault_point),
    )
    stop_requested = threading.Event()
    lane = online_lane(partitions, settings, in_flight, retrying, stop_requested, bulk=encoders)
    batcher, encoding = reader_and_model(
        settings, encoders[0], lane, settler, metrics=metrics, stats=stats
    )
    heartbeat = Heartbeat(partitions, in_flight, Timing(settings.min_idle_s).heartbeat_s, watchdog)
    publish_on(heartbeat, lane)
    return Worker(
        Parts(
            settings=settings,
            partitions=partitions,
            encoders=encoders,
            sink=sink,
            metrics=metrics,
            in_flight=in_flight,
            heartbeat=heartbeat,
            watchdog=watchdog,
            reclaimers=reclaimers(settings, partitions, settler),
            batcher=batcher,
            settler=settler,
            encoding=encoding,
            retrying=retrying,
            stats=stats,
            stop_requested=stop_requested,
            crash=crash,
            fault_point=settler.fault_point,
            lane=lane,
        )
    )


def worker_streams(settings: Settings, stream: Stream) -> list[Stream]:
    """What a worker reads: ``stream``'s partitions, then (unless ``--no-online``) the
    interactive lane, which reads put first (embedq.worker.lane)."""
    partitions = open_partitions(stream, settings.partitions)
    if settings.online:
        lane = lane_stream(stream.keys.base)
        partitions.append(Stream(stream.client, lane, stream.group, stream.consumer, online=True))
    return partitions


def reader_and_model(
    settings: Settings,
    encoder: Encoder,
    lane: OnlineLane | None,
    settler: Settler,
    *,
    metrics: WorkerMetrics,
    stats: Stats,
) -> tuple[Batcher, Encoding]:
    """The batcher and the model stage's work; with the interactive lane's hooks when the
    worker answers online requests (embedq.worker.lane)."""
    reject = lane.rejecting(settler.reject) if lane else settler.reject
    batcher = Batcher(
        encoder,
        batch_policy(settings),
        dead_letter=settler.dead_letter,
        reject=reject,
        metrics=metrics,
        stats=stats,
        lane=lane,
    )
    cache: VectorCache[Vector] = VectorCache(settings.vector_cache_size)
    return batcher, Encoding(cache, reject, metrics, stats)


def online_lane(
    streams: Sequence[Stream],
    settings: Settings,
    in_flight: InFlight,
    retrying: Retrier,
    stop: threading.Event,
    *,
    bulk: Sequence[Encoder],
) -> OnlineLane | None:
    """The worker's side of the interactive lane, the one of ``streams`` whose keys are
    online (None with ``--no-online``: none is), with a replica of its own beside the
    ``bulk`` ones."""
    lanes = [s for s in streams if s.keys.online]
    if not lanes:
        return None
    return OnlineLane(
        lanes[0],
        bulk[0].replica(),
        Gate.for_replicas(bulk),
        in_flight,
        retrying,
        reply_ttl_ms=int(settings.api_timeout_s * 1000) + 5000,
        read_count=settings.read_count,
        stop=stop,
        stamp=stamp_of(bulk[0]),
    )


def publish_on(heartbeat: Heartbeat, lane: OnlineLane | None) -> None:
    """The lane's record of who serves it (``OnlineLane.publish``), renewed at every beat
    and lasting three."""
    if lane is not None:
        heartbeat.also.append(partial(lane.publish, 3 * heartbeat.interval_s))


def stamp_of(encoder: Encoder) -> Stamp:
    """The model identity the worker stamps on its online answers."""
    identity = identity_of(encoder)
    return Stamp(identity.name, identity.fingerprint)


def count_failures(metrics: WorkerMetrics) -> Callable[[str, InfrastructureError], None]:
    """The retrier's report of a failed call (once per call, however many retries)."""

    def failed(_action: str, exc: InfrastructureError) -> None:
        metrics.errors.labels(kind=dependency(exc)).inc()

    return failed


@dataclass(frozen=True)
class Timing:
    """What ``--min-idle`` implies, derived in one place. An entry idle ``min_idle_s`` is
    reclaimable (the reclaimer); a per-id write lease lasts as long, so a dead worker's
    leases expire when its entries can be taken over (embedq.queue.versions); entries in hand are
    heartbeated four times per threshold, between 0.2 s and 10 s."""

    min_idle_s: float

    @property
    def lease_ms(self) -> int:
        return int(self.min_idle_s * 1000)

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, min(10.0, self.min_idle_s / 4))


def ordering(settings: Settings, partitions: Sequence[Stream], retrying: Retrier) -> Ordering:
    """Fenced per-id writes on every partition (leases per ``Timing``)."""
    versions = {s.keys.stream: Versions(s.client, s.keys, settings.collection) for s in partitions}
    lease_ms = Timing(settings.min_idle_s).lease_ms
    return Ordering(versions if settings.ordered_writes else None, lease_ms, retrying)


def batch_policy(settings: Settings) -> BatchPolicy:
    return BatchPolicy(
        limits=Limits(settings.max_text_bytes, settings.max_meta_bytes),
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_rows=settings.max_batch_rows,
        reject_overlong=settings.on_overlong == "reject",
    )


def reclaimers(
    settings: Settings, streams: Sequence[Stream], settler: Settler
) -> dict[str, Reclaimer]:
    """A reclaimer per stream, by stream key; one consumer tidy for them all (a dead
    worker's name is in every stream's group, and goes from all of them in one line)."""
    tidy = ConsumerTidy(streams, settings.consumer_idle_delete_s)
    return {
        stream.keys.stream: Reclaimer(
            stream,
            min_idle_s=settings.min_idle_s,
            max_deliveries=settings.max_deliveries,
            count=settings.read_count,
            dead_letter=partial(settler.dead_letter, stream),
            tidy=tidy,
        )
        for stream in streams
    }


def build_worker(settings: Settings, metrics: WorkerMetrics | None = None) -> Worker:
    """A worker wired from settings: stream, model (and replicas), sink. The runtime is
    resolved here, once; ``assemble`` finds the batch limits set."""
    first = first_encoder(settings)
    settings = resolved(settings, first.device)
    encoders = replicate(first, settings.replicas)
    return assemble(settings, open_stream(settings), encoders, open_sink(settings), metrics)


def run_worker(
    settings: Settings,
    on_release: Callable[[Stats], None] | None = None,
    *,
    on_loaded: Callable[[], None] | None = None,
) -> Stats:
    """``embedq worker``: the metrics server first (probes answer while the model loads),
    then the worker, until it stops. Ready means "can make progress now": model loaded and
    stages running, Redis and Milvus answering (checked in the background), and no call
    backing off; a dependency that answers again cuts the backoff short. ``on_release``
    gets the summary when the grace period ends before the batches in hand
    (embedq.worker.shutdown); ``on_loaded`` is called once the model is in memory."""
    from embedq.worker.health import not_backing_off, serve_worker_metrics

    metrics = WorkerMetrics(stream=settings.stream, group=settings.group)
    booted = list[Worker]()

    def wake() -> None:
        for work in booted:
            work.retrying.wake()

    server = None
    if settings.metrics_port:
        server = serve_worker_metrics(
            metrics,
            settings,
            # Ready while the pipeline runs: not loading, stopping, or after a stage crashed.
            ready=lambda: bool(booted) and booted[0].ready,
            wake=wake,
        )
    work = build_worker(settings, metrics)
    if on_loaded is not None:
        on_loaded()
    settle_heap()
    booted.append(work)
    metrics.watch_retries(work.retrying.waiting)
    if server is not None:
        server.watch("milvus", work.sink.ping, every_s=5.0, on_recovered=work.retrying.wake)
        server.require("progress", not_backing_off(work.retrying.waiting))
        server.require_alive("stages", lambda: not work.parts.watchdog.stuck())
    work.install_signal_handlers(on_release)
    return work.run()


def run_reclaim(settings: Settings, *, once: bool) -> ReclaimSummary:
    """``embedq reclaim``: one model, reclaimed entries processed one batch at a time."""
    work = build_worker(settings.replace(replicas=1))
    settle_heap()
    work.install_signal_handlers()
    return work.reclaim(once=once)


def run_device_workers(settings: Settings) -> int:
    """``--devices`` / ``--procs-per-device``: worker processes per device (the listed ones,
    or ``--device``), supervised here."""
    devices = parse_devices(settings.devices) or [resolve_device(settings.device)]
    per_device = settings_per_device(settings, devices, settings.procs_per_device)
    return run_per_device(per_device, worker_process, grace_s=settings.grace_s + 5)


def worker_process(settings: Settings) -> int:
    """What each device's process runs: a whole worker on that device."""
    logs.configure(settings.log_level, settings.log_json, settings.secrets)
    if settings.device == "cpu" and settings.procs_per_device > 1:
        # Processes sharing the CPU share its cores too (torch would give each all of them).
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.procs_per_device))
    try:
        # A second signal or an expired grace period ends the process inside the worker.
        run_worker(settings.replace(metrics_port=0))
    except ConfigError as exc:
        log.error("config_error", error=str(exc))
        return int(ExitCode.USAGE)
    return int(ExitCode.OK)
