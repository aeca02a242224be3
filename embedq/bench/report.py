"""``embedq bench``: embedq end to end next to its own ceiling and two common designs.

Four variants run on the same machine, the same corpus sample and the same model, each in a
fresh child process (``spawn``) so its peak RSS is its own, and the runs interleave
(a, b, c, d, a, b, c, d, …) so a neighbour's load hits every variant alike:

(a) ``raw``, the model ceiling; (b) ``st``, sentence-transformers ``encode``; (c)
``classic``, a per-message worker; (d) ``embedq`` end to end (``embedq.bench_variants``
says what each does). This module runs them, takes medians and ratios, and writes the
report.

Redis is a private ``redis-server`` on a free port started for the bench, so no one
else's data is touched. Model load is never timed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedq.bench_variants import ST_BATCH_SIZE, Job, RunResult, private_redis, run_in_child
from embedq.config import Settings
from embedq.errors import ConfigError

VARIANTS = ("raw", "st", "classic", "embedq")
LABELS = {
    "raw": "(a) raw model ceiling",
    "st": "(b) sentence-transformers encode",
    "classic": "(c) classic per-message worker",
    "embedq": "(d) embedq end to end",
}
SECTION = "## Worker throughput (CPU)"


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- results ------------------------------------------------------------------------------


@dataclass
class VariantSummary:
    """Medians over runs."""

    variant: str
    texts: int
    runs: int
    texts_per_s: float
    tokens_per_s: float
    p50_batch_ms: float
    p95_batch_ms: float
    peak_rss_mb: float
    texts_per_s_runs: list[float]


def summarize(results: Sequence[RunResult]) -> VariantSummary:
    return VariantSummary(
        variant=results[0].variant,
        texts=results[0].texts,
        runs=len(results),
        texts_per_s=median([r.texts_per_s for r in results]),
        tokens_per_s=median([r.tokens_per_s for r in results]),
        p50_batch_ms=median([percentile(r.batch_ms, 50) for r in results if r.batch_ms]),
        p95_batch_ms=median([percentile(r.batch_ms, 95) for r in results if r.batch_ms]),
        peak_rss_mb=median([r.peak_rss_mb for r in results]),
        texts_per_s_runs=[round(r.texts_per_s, 1) for r in results],
    )


_RATIO_NAMES = {"raw": "d/a", "st": "d/b", "classic": "d/c"}


def run_ratios(results: Sequence[RunResult]) -> dict[str, list[float]]:
    """embedq's texts/s over each other variant's (d/a, d/b, d/c), run by run.

    Within one run the variants follow each other within minutes, so a ratio taken inside a
    run compares them under nearly the same load; the median of those is what we report.
    """
    by_run: dict[int, dict[str, float]] = {}
    for r in results:
        by_run.setdefault(r.run, {})[r.variant] = r.texts_per_s
    found: dict[str, list[float]] = {}
    for run in sorted(by_run):
        speeds = by_run[run]
        ours = speeds.get("embedq")
        if ours is None:
            continue
        for name, label in _RATIO_NAMES.items():
            if speeds.get(name):
                found.setdefault(label, []).append(ours / speeds[name])
    return found


def ratios(results: Sequence[RunResult]) -> dict[str, float]:
    """Medians of the per-run ratios (see ``run_ratios``)."""
    return {label: median(values) for label, values in run_ratios(results).items()}


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

    return {
        "cpu": cpu_model(),
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


@dataclass
class BenchReport:
    corpus: str
    command: str
    n: int
    n_classic: int
    runs: int
    settings: dict[str, Any]
    machine: dict[str, Any]
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    started_at: str
    wall_s: float
    enqueue_texts_per_s: float
    summaries: dict[str, VariantSummary]
    results: list[RunResult]

    @property
    def ratios(self) -> dict[str, float]:
        return ratios(self.results)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratios"] = {k: round(v, 3) for k, v in self.ratios.items()}
        return data


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
) -> BenchReport:
    from embedq.producer import Producer

    if "st" in variants and importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError(
            "variant st needs sentence-transformers: pip install 'embedq[bench]', or leave it "
            "out with --variants raw,classic,embedq"
        )
    rows = load_sample(corpus, n)
    classic_rows = rows[: min(n_classic, len(rows))]
    wall_started = time.monotonic()
    before = loadavg()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: list[RunResult] = []
    enqueue_rates: list[float] = []
    with private_redis() as redis_url, tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp:
        for run in range(1, runs + 1):
            for variant in variants:
                sample = classic_rows if variant == "classic" else rows
                job_settings = settings.replace(
                    redis_url=redis_url,
                    stream=f"bench:{variant}:{run}",
                    group="bench",
                    consumer=f"bench-{variant}",
                    milvus_uri=str(Path(tmp) / f"{variant}-{run}.db"),
                    collection="bench",
                    drain=True,
                )
                if variant in ("classic", "embedq"):
                    t0 = time.perf_counter()
                    with Producer.connect(redis_url, job_settings.stream) as producer:
                        producer.enqueue(sample)
                    enqueue_rates.append(len(sample) / (time.perf_counter() - t0))
                result = run_in_child(Job(variant, sample, job_settings, run))
                result.run = run
                _check_complete(result, len(sample))
                results.append(result)
                progress(
                    f"run {run}/{runs} {variant:<8} {result.texts_per_s:8.1f} texts/s "
                    f"{result.tokens_per_s:9.0f} tokens/s  rss {result.peak_rss_mb:6.0f} MB  "
                    f"load {loadavg()[0]:.2f}"
                )
    summaries = {v: summarize([r for r in results if r.variant == v]) for v in variants}
    return BenchReport(
        corpus=corpus.name,
        command=command,
        n=len(rows),
        n_classic=len(classic_rows),
        runs=runs,
        settings={
            "device": settings.device,
            "dtype": settings.dtype,
            "read_count": settings.read_count,
            "max_batch_tokens": settings.max_batch_tokens,
            "max_batch_rows": settings.max_batch_rows,
            "block_ms": settings.block_ms,
        },
        machine=machine_facts(),
        loadavg_before=before,
        loadavg_after=loadavg(),
        started_at=started_at,
        wall_s=round(time.monotonic() - wall_started, 1),
        enqueue_texts_per_s=median(enqueue_rates),
        summaries=summaries,
        results=results,
    )


def _check_complete(result: RunResult, expected: int) -> None:
    """A variant that lost or duplicated rows has no throughput worth printing."""
    stored = result.extra.get("rows_in_milvus", expected)
    if result.texts != expected or stored != expected:
        raise ConfigError(
            f"bench variant {result.variant}: processed {result.texts} texts and Milvus holds "
            f"{stored} rows, expected {expected}"
        )


# -- output -------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"  # NaN: not measured


def table(report: BenchReport) -> str:
    """A markdown table (also readable on a terminal)."""
    lines = [
        "| variant | texts | texts/s | tokens/s | p50 batch ms | p95 batch ms | peak RSS MB "
        "| texts/s per run |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for name, s in report.summaries.items():
        lines.append(
            f"| {LABELS[name]} | {s.texts} | {_fmt(s.texts_per_s)} | {_fmt(s.tokens_per_s, 0)} "
            f"| {_fmt(s.p50_batch_ms)} | {_fmt(s.p95_batch_ms)} | {_fmt(s.peak_rss_mb, 0)} "
            f"| {', '.join(str(v) for v in s.texts_per_s_runs)} |"
        )
    return "\n".join(lines)


def markdown(report: BenchReport) -> str:
    m = report.machine
    per_run = run_ratios(report.results)
    ratio_text = (
        ", ".join(
            f"{k} = {v:.2f}× (runs: {', '.join(f'{x:.2f}' for x in per_run[k])})"
            for k, v in report.ratios.items()
        )
        or "–"
    )
    cfg = report.settings
    return "\n".join(
        [
            f"### {report.corpus} (n = {report.n}, {report.runs} runs, medians)",
            "",
            f"Measured {report.started_at}; wall time {report.wall_s:.0f} s.",
            "",
            "```sh",
            report.command,
            "```",
            "",
            table(report),
            "",
            f"**Ratios of texts/s, median of per-run ratios:** {ratio_text}.",
            "",
            f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
            f"{m['torch_threads']} threads, Python {m['python']}"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + ".",
            f"- Load average (1/5/15 min) before {_load(report.loadavg_before)}, after "
            f"{_load(report.loadavg_after)}: the machine is shared, so absolute numbers move; "
            "the variants interleave run by run, so the ratios are fairer than the absolutes.",
            f"- Batching: device {cfg['device']}, dtype {cfg['dtype']}, read window "
            f"{cfg['read_count']}, max {cfg['max_batch_tokens']} padded tokens and "
            f"{cfg['max_batch_rows']} rows per batch (the same for (a) and (d)); "
            f"(b) uses batch_size={ST_BATCH_SIZE}.",
            f"- (c) processed the first {report.n_classic} texts (it is slow); its texts/s "
            "compare directly. Its batch latency is one message: read to ack.",
            f"- (d) is timed from `worker_started` (model loaded) to drained with every entry "
            f"acked and the Milvus row count checked; the stream was filled before, at "
            f"{report.enqueue_texts_per_s:,.0f} texts/s (not counted). Its batch latency is "
            "the worker's `batch_done` timing (encode + write + ack).",
            "- Peak RSS is each variant's own child process (ru_maxrss).",
            "",
        ]
    )


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def update_markdown(path: Path, report: BenchReport) -> None:
    """Put this corpus's block under the worker-throughput section of ``path``, replacing an
    earlier block for the same corpus and leaving every other section alone."""
    begin = f"<!-- bench:{report.corpus} -->"
    end = f"<!-- /bench:{report.corpus} -->"
    block = f"{begin}\n{markdown(report)}{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    elif SECTION in text:
        head, tail = text.split(SECTION, 1)
        next_section = tail.find("\n## ")
        if next_section == -1:
            text = f"{head}{SECTION}{tail.rstrip()}\n\n{block}\n"
        else:
            cut = next_section + 1
            text = f"{head}{SECTION}{tail[:cut].rstrip()}\n\n{block}\n\n{tail[cut:]}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
