"""Render a ``gpu-run.json`` (scripts/gpu_kit.py, issue 30) as the markdown of
docs/benchmarks.md's GPU section, with the published anchors beside the figures.

    python scripts/render_gpu_run.py gpu-run.json                    # to stdout
    python scripts/render_gpu_run.py gpu-run.json --into docs/benchmarks.md

``--into`` replaces what lies between the ``<!-- gpu-run:start -->`` and
``<!-- gpu-run:end -->`` lines of that file. A dry run's document renders under a heading
that says it is a CPU dry run: the format, not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- gpu-run:start -->", "<!-- gpu-run:end -->"
SNOWFLAKE = "https://www.snowflake.com/en/engineering-blog/embedding-inference-arctic-16x-faster/"
INFINITY = "https://michaelfeil.eu/infinity/0.0.55/benchmarking"
TEI = "https://github.com/huggingface/text-embeddings-inference"
RUN_CALL = 'run(command="bash scripts/gpu_check.sh", carry=["build/gpu-kit"], timeout_s=600)'
DRY_COMMAND = "bash scripts/gpu_check.sh --dry-run --out DIR"
ARCTIC_TOKENS_PER_S = 1_400_000  # per H200, BERT-base class, 50 tokens (see ANCHORS)
# Published figures for the same model class, as their sources state them.
ANCHORS = (
    (
        "ArcticInference (vLLM plugin, several replicas per GPU)",
        "~1.4M tokens/s per H200, BERT-base-size embedder (snowflake-arctic-embed-m-v1.5), "
        "50-token inputs",
        "Snowflake's engineering blog; the same post states 16× vLLM at 50 tokens and 4.2× "
        "at 512, and 2.4× TEI at 50 tokens with parity at 512. The absolute 1.4M figure is "
        "the one the issue and the field notes quote; the stored copy of the post read for "
        f"this section holds the ratios only. [{SNOWFLAKE}]({SNOWFLAKE})",
    ),
    (
        "TEI (text-embeddings-inference)",
        "no absolute figure in text: its README shows charts for bge-base-en-v1.5 on an A10 at "
        "512 tokens. From the ratio above, ~0.58M tokens/s per H200 at 50 tokens (derived "
        "here: 1.4M / 2.4, not published)",
        f"[{TEI}]({TEI}), [{SNOWFLAKE}]({SNOWFLAKE})",
    ),
    (
        "infinity (and TEI, in infinity's benchmark)",
        "0.51 requests/s of 256 sentences (115,000 tokens) ≈ 59,000 tokens/s (infinity, torch "
        "+ compile + FA2); TEI 0.54 ≈ 62,000 tokens/s. One NVIDIA L4, bge-large-en-v1.5 "
        "(BERT-large, ~450 tokens a sentence): another GPU and a 3× larger model",
        f"[{INFINITY}]({INFINITY})",
    ),
)


def heading(doc: dict[str, Any]) -> str:
    machine = doc.get("machine", {})
    when = str(doc.get("started_at", "?"))
    if doc.get("mode") == "dry-run":
        return (
            f"### CPU dry run, {when}: the format only, not GPU figures\n\n"
            "Every step ran on the CPU with tiny sizes (`scripts/gpu_check.sh --dry-run`): a "
            "2-layer BERT from a config, the GPU tests that have a CPU equivalent run on the "
            "CPU, utilisation not sampled. The numbers below say nothing about a GPU."
        )
    return f"### GPU run, {when}, {machine.get('device', 'unknown device')}"


def facts(doc: dict[str, Any]) -> str:
    m, c = doc.get("machine", {}), doc.get("commit", {})
    commit = str(c.get("commit") or "unknown")[:12] + (" (dirty tree)" if c.get("dirty") else "")
    device = m.get("device") or "no GPU"
    parts = [
        f"Device: {device}" + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""),
        f"driver {m.get('driver') or '—'}",
        f"torch {m.get('torch')}, CUDA {m.get('cuda') or '—'}, Python {m.get('python')}",
        f"CPU {m.get('cpu')}, {m.get('cores')} cores",
        f"commit {commit}",
        f"wall {doc.get('wall_s')} s of a {doc.get('limit_s')} s limit",
    ]
    return "; ".join(parts) + "."


def steps_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| step | status | seconds | limit (s) |", "|---|---|--:|--:|"]
    for name, step in doc.get("steps", {}).items():
        status = step.get("status", "?") + (f": {step['why']}" if step.get("why") else "")
        lines.append(
            f"| {name} | {status} | {step.get('seconds', '')} | {step.get('limit_s', '')} |"
        )
    return lines


def pytest_table(step: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{step.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped"))
    lines = [f"`pytest -m gpu`: {counts}.", "", "| test | outcome |", "|---|---|"]
    for test in step.get("tests", []):
        outcome = test["outcome"] + (f" ({test['message']})" if test.get("message") else "")
        lines.append(f"| `{test['test'].rsplit('.', 1)[-1]}` | {outcome.replace('|', '/')} |")
    return lines


def _util(record: dict[str, Any]) -> str:
    util = record.get("gpu_util") or {}
    if util.get("mean_pct") is None:
        return "—"
    return f"{util['mean_pct']:.0f} % ({util.get('p50_pct', 0):.0f})"


def _stages(record: dict[str, Any], top: int = 4) -> str:
    stages = sorted((record.get("cpu_us_per_text") or {}).items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.0f}" for k, v in stages[:top])


def throughput_table(step: dict[str, Any]) -> list[str]:
    lines = [
        "| model | tokens (mean) | variant | texts/s | tokens/s | × raw | GPU util mean (p50) "
        "| CPU µs/text, top stages |",
        "|---|--:|---|--:|--:|--:|--:|---|",
    ]
    for r in step.get("results", []):
        variant = "raw forward" if r["kind"] == "raw" else f"embedq ×{r['procs']} procs"
        ratio = "1" if r["kind"] == "raw" else f"{r.get('ratio_to_raw', 0):.2f}"
        lost = ""
        if r["kind"] == "embedq" and r.get("rows_in_milvus") != r.get("texts"):
            lost = f" ({r.get('rows_in_milvus')} of {r.get('texts')} rows stored!)"
        lines.append(
            f"| {r['model']} | {r['tokens_target']} ({r['mean_tokens']}) | {variant}{lost} "
            f"| {r['texts_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {ratio} | {_util(r)} "
            f"| {_stages(r)} |"
        )
    return lines


def anchors(doc: dict[str, Any]) -> list[str]:
    lines = ["| anchor | published figure | source |", "|---|---|---|"]
    lines += [f"| {name} | {figure} | {source} |" for name, figure, source in ANCHORS]
    best = _best_bert_base_50(doc)
    if best is not None and doc.get("mode") != "dry-run":
        device = doc.get("machine", {}).get("device", "?")
        lines += [
            "",
            f"embedq, BERT-base shape at 50 tokens on this {device}: {best:,.0f} tokens/s, "
            f"{best / ARCTIC_TOKENS_PER_S:.2f}× ArcticInference's published H200 figure"
            + ("" if "H200" in device else " (a different GPU: compare with care)")
            + ".",
        ]
    return lines


def _best_bert_base_50(doc: dict[str, Any]) -> float | None:
    results = doc.get("steps", {}).get("throughput", {}).get("results", [])
    rates = [
        r["tokens_per_s"]
        for r in results
        if r["kind"] == "embedq" and r["model"] == "bert-base" and r["tokens_target"] == 50
    ]
    return max(rates) if rates else None


def render(doc: dict[str, Any]) -> str:
    steps = doc.get("steps", {})
    out = [heading(doc), "", facts(doc), ""]
    dry = doc.get("mode") == "dry-run"
    out += ["```", DRY_COMMAND if dry else RUN_CALL, "```", ""]
    out += [*steps_table(doc), ""]
    if "pytest" in steps:
        out += [*pytest_table(steps["pytest"]), ""]
    if steps.get("throughput", {}).get("results"):
        out += ["Throughput per GPU (embedq: 10-90 % of the backlog acknowledged):", ""]
        out += [*throughput_table(steps["throughput"]), ""]
    if steps.get("feed", {}).get("markdown"):
        out += ["Feed bench (zero-layer model, the kit's Milvus Lite server):", ""]
        out += [steps["feed"]["markdown"].rstrip(), ""]
    out += ["Published anchors for the same model class:", "", *anchors(doc)]
    return "\n".join(out).rstrip() + "\n"


def replace_between(path: Path, text: str) -> None:
    page = path.read_text(encoding="utf-8")
    if START not in page or END not in page:
        raise SystemExit(f"{path} has no {START} ... {END} lines to replace between")
    head, rest = page.split(START, 1)
    _old, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/render_gpu_run.py", description=__doc__)
    parser.add_argument("run", type=Path, help="a gpu-run.json")
    parser.add_argument("--into", type=Path, help="replace the GPU block of this markdown file")
    args = parser.parse_args(argv)
    text = render(json.loads(args.run.read_text(encoding="utf-8")))
    if args.into is not None:
        replace_between(args.into, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
