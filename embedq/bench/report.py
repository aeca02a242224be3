"""What ``embedq bench`` reports: medians over runs, embedq's ratios to the other
variants taken run by run, and the markdown block it writes into docs/benchmarks.md."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embedq.bench.variants import ST_BATCH_SIZE, RunResult

LABELS = {
    "raw": "(a) raw model ceiling",
    "st": "(b) sentence-transformers encode",
    "classic": "(c) classic per-message worker",
    "embedq": "(d) embedq end to end",
    "unordered": "(u) embedq, ordered per-id writes off",
    "onnx": "(d) embedq end to end, --backend onnx",
    "onnx-int8": "(d) embedq end to end, --backend onnx --quantize int8",
    "openvino": "(d) embedq end to end, --backend openvino",
    "openvino-int8": "(d) embedq end to end, --backend openvino --quantize int8",
    "st-onnx-int8": '(b) sentence-transformers backend="onnx" int8 encode',
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


# d/u below 1 is what ordered per-id writes cost (u: the same worker with them off).
_RATIO_NAMES = {"raw": "d/a", "st": "d/b", "classic": "d/c", "unordered": "d/u"}
# (d) on the CPU backends of issue 29, against sentence-transformers' fp32 torch encode (b)
# and its own int8 ONNX encode: e.g. ``onnx-int8/b`` and ``onnx-int8/st-onnx-int8``.
_BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-int8")
_BASELINES = {"st": "b", "st-onnx-int8": "st-onnx-int8"}
_PAIRS = [("embedq", other, label) for other, label in _RATIO_NAMES.items()] + [
    (ours, other, f"{ours}/{short}") for ours in _BACKENDS for other, short in _BASELINES.items()
]


def run_ratios(results: Sequence[RunResult]) -> dict[str, list[float]]:
    """embedq's texts/s over each other variant's (d/a, d/b, d/c), and each CPU backend's
    over sentence-transformers' (``onnx-int8/b``, ``onnx-int8/st-onnx-int8``), run by run.

    Within one run the variants follow each other within minutes, so a ratio taken inside a
    run compares them under nearly the same load; the median of those is what we report.
    """
    by_run: dict[int, dict[str, float]] = {}
    for r in results:
        by_run.setdefault(r.run, {})[r.variant] = r.texts_per_s
    found: dict[str, list[float]] = {}
    for run in sorted(by_run):
        speeds = by_run[run]
        for ours, other, label in _PAIRS:
            if speeds.get(ours) and speeds.get(other):
                found.setdefault(label, []).append(speeds[ours] / speeds[other])
    return found


def ratios(results: Sequence[RunResult]) -> dict[str, float]:
    """Medians of the per-run ratios (see ``run_ratios``)."""
    return {label: median(values) for label, values in run_ratios(results).items()}


# -- the report ---------------------------------------------------------------------------


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
            + (f"; int8 instruction set {m['cpu_int8_isa']}" if m.get("cpu_int8_isa") else "")
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
            *_st_onnx_note(report),
            "",
        ]
    )


def _st_onnx_note(report: BenchReport) -> list[str]:
    """What sentence-transformers' int8 ONNX model loaded, and how far it is from fp32."""
    found = [r.extra for r in report.results if r.variant == "st-onnx-int8" and r.extra]
    checked = [e for e in found if "lowest_cosine_vs_fp32" in e]
    if not checked:
        return []
    return [
        f"- sentence-transformers' int8 model ({checked[0].get('file')}): lowest cosine to "
        f"fp32 torch {checked[0]['lowest_cosine_vs_fp32']:.4f} on the first texts (embedq's "
        "int8 gate asks for 0.99 on every probe)."
    ]


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
