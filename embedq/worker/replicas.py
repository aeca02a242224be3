"""Using a whole node: how many model replicas a device gets, and one worker process per
device.

Within one process, ``--replicas K`` gives the worker K model threads, each with its own
``Encoder.replica()`` (shared weights, and on CUDA its own stream; see ``embedq.worker.loop``).
The default (0) is 1 on CUDA and 2 on a multi-core CPU, where the replicas split torch's
threads between them (``replicas_for``, ``share_cpu_threads``).

``--devices 0,1`` runs one worker process per listed device (``spawn``, since CUDA does not
survive ``fork``); the parent forwards SIGTERM/SIGINT and, when one child dies, stops the
others and exits non-zero, so a node never keeps running half its fleet while looking
healthy.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

from embedq.core.config import Settings
from embedq.core.errors import ConfigError

log = structlog.get_logger("embedq.worker.replicas")

CPU_AUTO_REPLICAS = 2


def replicas_for(device: str, requested: int, cpu_threads: int) -> int:
    """Model replicas for ``device``: ``requested``, or with 0 ("auto") 1 on CUDA and 2 on
    a CPU with at least two threads.

    On a CPU, two replicas with half the threads each beat one replica with all of them
    when anything else runs beside the model (the writer, Milvus Lite, Redis): a preempted
    OpenMP thread stalls every parallel region of its forward pass, and a stalled replica
    no longer stalls the other (docs/benchmarks.md).
    """
    if requested:
        return requested
    if device.startswith("cuda") or cpu_threads < 2:
        return 1
    return CPU_AUTO_REPLICAS


def share_cpu_threads(replicas: int) -> int:
    """Give each of ``replicas`` CPU model replicas an equal share of torch's intra-op
    threads (at least one); returns the share."""
    import torch

    share = max(1, torch.get_num_threads() // replicas)
    torch.set_num_threads(share)
    return share


# -- one worker process per device --------------------------------------------------------


def parse_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """``"0,1"`` → ``["cuda:0", "cuda:1"]``; ``"all"`` → every visible GPU; ``""`` → none.

    ``cpu`` entries are allowed (several CPU workers on one host, and tests).
    """
    spec = spec.strip()
    if not spec:
        return []
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "all":
        if cuda_count == 0:
            raise ConfigError("--devices all: no CUDA device is visible on this machine")
        return [f"cuda:{i}" for i in range(cuda_count)]
    devices = []
    for raw in spec.split(","):
        item = raw.strip()
        if item == "cpu":
            devices.append("cpu")
            continue
        index = item.removeprefix("cuda:")
        if not index.isdigit():
            raise ConfigError(f"--devices {spec}: {item!r} is not a GPU index, cuda:N or cpu")
        if int(index) >= cuda_count:
            raise ConfigError(
                f"--devices {spec}: cuda:{index} is not visible ({cuda_count} CUDA devices)"
            )
        devices.append(f"cuda:{int(index)}")
    if len({d for d in devices if d != "cpu"}) != len([d for d in devices if d != "cpu"]):
        raise ConfigError(f"--devices {spec}: a GPU is listed twice (use --replicas instead)")
    return devices


def settings_per_device(
    settings: Settings, devices: Sequence[str], procs: int = 1
) -> list[Settings]:
    """One worker's settings per device and process; consumer names stay stable across
    restarts (``<consumer>-cuda0``, ``<consumer>-cuda0-p1`` with ``procs`` > 1), so a
    restarted process re-reads its own pending entries."""
    return [
        settings.replace(
            device=device,
            devices="",
            procs_per_device=procs,
            consumer=f"{settings.consumer}-{device.replace(':', '')}"
            + (str(i) if device == "cpu" else "")
            + (f"-p{p}" if procs > 1 else ""),
        )
        for i, device in enumerate(devices)
        for p in range(procs)
    ]


def run_per_device(
    per_device: Sequence[Settings],
    target: Callable[[Settings], int],
    *,
    poll_s: float = 0.2,
    grace_s: float | None = None,
) -> int:
    """Run ``target(settings)`` in one spawned process per device and wait for all.

    Returns 0 when every child exited 0, else the exit code of the first one that failed.
    SIGTERM/SIGINT reaching this process are passed on to every child (each finishes its
    batch; a second signal ends them at once, as for a single worker). When one child fails
    the others get SIGTERM, and after ``grace_s`` SIGKILL.
    """
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child_main, args=(target, s), name=f"embedq-worker-{s.device}")
        for s in per_device
    ]
    for child in children:
        child.start()
        log.info("device_worker_started", worker=child.name, pid=child.pid)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                _signal(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_failure = _supervise(children, forward, poll_s=poll_s, grace_s=grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for child in children:
        child.join()
    if first_failure is not None:
        return first_failure
    return next((int(c.exitcode) for c in children if c.exitcode), 0)


def _supervise(
    children: Sequence[multiprocessing.process.BaseProcess],
    forward: Callable[[int, FrameType | None], None],
    *,
    poll_s: float,
    grace_s: float | None,
) -> int | None:
    """Wait for every child; on the first failure stop the others (SIGTERM, then SIGKILL
    after ``grace_s``). Returns the first failing exit code, if any."""
    first_failure: int | None = None
    failed_at = 0.0
    while any(child.is_alive() for child in children):
        failed = next((c for c in children if c.exitcode not in (None, 0)), None)
        if failed is not None and first_failure is None:
            first_failure = int(failed.exitcode or 1)
            failed_at = time.monotonic()
            log.error(
                "device_worker_failed",
                worker=failed.name,
                exit_code=failed.exitcode,
                then="stopping the other device workers",
            )
            forward(signal.SIGTERM, None)
        overdue = grace_s is not None and time.monotonic() - failed_at > grace_s
        if first_failure is not None and overdue:
            for child in children:
                if child.is_alive():
                    child.kill()
        time.sleep(poll_s)
    return first_failure


def _signal(pid: int, signum: int) -> None:
    import contextlib
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _child_main(target: Callable[[Settings], int], settings: Settings) -> None:
    import os
    import sys

    # Its own process group: a terminal's Ctrl-C reaches the parent only, which passes it on
    # once (reaching both, a child would count two signals and exit hard).
    os.setpgid(0, 0)
    sys.exit(target(settings))
