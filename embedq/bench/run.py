"""``embedq bench``: embedq end to end next to its own ceiling and two common designs.

Four variants run on the same machine, the same corpus sample and the same model, each in a
fresh child process (``spawn``) so its peak RSS is its own, and the runs interleave
(a, b, c, d, a, b, c, d, …) so a neighbour's load hits every variant alike:

(a) ``raw``, the model ceiling; (b) ``st``, sentence-transformers ``encode``; (c)
``classic``, a per-message worker; (d) ``embedq`` end to end (``embedq.bench.variants``
says what each does), and on request the CPU backends of issue 29 (``onnx-int8`` and the
like: (d) on another forward pass; ``st-onnx-int8``: sentence-transformers' own int8 ONNX
``encode``). This module runs them and gathers a ``BenchReport``
(``embedq.bench.report`` takes medians and ratios and writes it out).

Redis is a private ``redis-server`` on a free port started for the bench
(``embedq.bench.servers``), so no one else's data is touched. Model load is never timed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedq.bench.report import BenchReport, median, summarize
from embedq.bench.servers import RedisServer
from embedq.bench.variants import (
    BACKEND_VARIANTS,
    VARIANTS,
    BenchRun,
    RunResult,
    run_in_child,
)
from embedq.core.config import Settings
from embedq.core.errors import ConfigError

# -- machine facts ------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    import torch

    from embedq.model.onnx_backend import cpu_isa

    return {
        "cpu": cpu_model(),
        # The widest int8 instruction set the quantized backends' kernels can use here.
        "cpu_int8_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# -- corpus -------------------------------------------------------------------------------


def load_sample(path: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` rows of a JSONL corpus with ``id`` and ``text``."""
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows.append({"id": str(item["id"]), "text": str(item["text"])})
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{number}: not an {{id, text}} JSON line: {exc}"
                ) from None
            if len(rows) == n:
                break
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    return rows


# -- the whole bench ----------------------------------------------------------------------


def run_bench(
    corpus: Path,
    settings: Settings,
    *,
    n: int,
    n_classic: int,
    runs: int,
    variants: Sequence[str] = VARIANTS,
    command: str = "",
    progress: Callable[[str], None] = lambda _line: None,
    st_python: str = "",
) -> BenchReport:
    """Every variant ``runs`` times, interleaved, against one private Redis."""
    _check_variants(variants, st_python)
    settings = resolve_settings(settings)
    rows = load_sample(corpus, n)
    classic_rows = rows[: min(n_classic, len(rows))]
    wall_started = time.monotonic()
    before = loadavg()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: list[RunResult] = []
    enqueue_rates: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis_server,
    ):
        for run in range(1, runs + 1):
            for variant in variants:
                sample = classic_rows if variant == "classic" else rows
                run_settings = _settings_for(settings, variant, run, redis_server.url, tmp)
                if variant in ("classic", "embedq", "unordered", *BACKEND_VARIANTS):
                    enqueue_rates.append(_enqueue(sample, run_settings))
                result = run_in_child(BenchRun(variant, sample, run_settings, run, st_python))
                result.run = run
                _check_complete(result, len(sample))
                results.append(result)
                progress(
                    f"run {run}/{runs} {variant:<8} {result.texts_per_s:8.1f} texts/s "
                    f"{result.tokens_per_s:9.0f} tokens/s  rss {result.peak_rss_mb:6.0f} MB  "
                    f"load {loadavg()[0]:.2f}"
                )
    return BenchReport(
        corpus=corpus.name,
        command=command,
        n=len(rows),
        n_classic=len(classic_rows),
        runs=runs,
        settings=_reported_settings(settings),
        machine=machine_facts(),
        loadavg_before=before,
        loadavg_after=loadavg(),
        started_at=started_at,
        wall_s=round(time.monotonic() - wall_started, 1),
        enqueue_texts_per_s=median(enqueue_rates),
        summaries={v: summarize([r for r in results if r.variant == v]) for v in variants},
        results=results,
    )


def _check_variants(variants: Sequence[str], st_python: str) -> None:
    """One line, before anything starts, for a variant this machine cannot run."""
    if "st" in variants and importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(
            "variant st needs sentence-transformers: pip install 'embedq[bench]', or leave it "
            "out with --variants raw,classic,embedq"
        )
    if "st-onnx-int8" in variants and not st_python:
        raise ConfigError(
            "variant st-onnx-int8 needs --st-python: a Python with sentence-transformers and "
            "optimum[onnxruntime] (docs/benchmarks.md#cpu-backends-issue-29)"
        )


def resolve_settings(settings: Settings) -> Settings:
    """Device, dtype and batch limits resolved as the worker resolves them, so the report
    names what ran, and (a) batches as (d) does."""
    from embedq.model.encoder import resolve_device
    from embedq.worker.launch import resolve_batch_settings

    device = resolve_device(settings.device)
    dtype = settings.dtype
    if dtype == "auto":  # as the encoder will resolve it
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return resolve_batch_settings(settings.replace(device=device, dtype=dtype))


def _settings_for(settings: Settings, variant: str, run: int, redis_url: str, tmp: str) -> Settings:
    """A stream and a Milvus Lite file of this variant's and this run's own."""
    return settings.replace(
        redis_url=redis_url,
        stream=f"bench:{variant}:{run}",
        group="bench",
        consumer=f"bench-{variant}",
        milvus_uri=str(Path(tmp) / f"{variant}-{run}.db"),
        collection="bench",
        drain=True,
    )


def _enqueue(sample: list[dict[str, str]], settings: Settings) -> float:
    """Fill the variant's stream before it starts (not timed as its throughput); texts/s."""
    from embedq.producer.client import Producer

    started = time.perf_counter()
    with Producer.connect(settings.redis_url, settings.stream) as producer:
        producer.enqueue(sample)
    return len(sample) / (time.perf_counter() - started)


def _reported_settings(settings: Settings) -> dict[str, Any]:
    return {
        "device": settings.device,
        "dtype": settings.dtype,
        "read_count": settings.read_count,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_rows": settings.max_batch_rows,
        "block_ms": settings.block_ms,
        "model_cache": settings.model_cache,
    }


def _check_complete(result: RunResult, expected: int) -> None:
    """A variant that lost or duplicated rows has no throughput worth printing."""
    stored = result.extra.get("rows_in_milvus", expected)
    if result.texts != expected or stored != expected:
        raise ConfigError(
            f"bench variant {result.variant}: processed {result.texts} texts and Milvus holds "
            f"{stored} rows, expected {expected}"
        )
