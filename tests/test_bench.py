"""The benchmark harness: its statistics, its markdown, and one real tiny run of all four
variants (private redis-server, Milvus Lite files, the packaged model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedq.bench.report import (
    LABELS,
    SECTION,
    BenchReport,
    markdown,
    median,
    percentile,
    ratios,
    run_ratios,
    summarize,
    update_markdown,
)
from embedq.bench.run import load_sample
from embedq.bench.variants import VARIANTS, RunResult, batch_latency_ms
from embedq.core.errors import ConfigError
from tests.conftest import corpus_rows

ROOT = Path(__file__).resolve().parents[1]


def test_percentile_interpolates_between_ranks() -> None:
    values = [40.0, 10.0, 30.0, 20.0]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_summary_takes_medians_over_runs() -> None:
    def run(elapsed_s: float, rss: float) -> RunResult:
        return RunResult("raw", 100, 5000, elapsed_s, rss, [10.0, 20.0, 30.0])

    raw = summarize([run(1.0, 400), run(2.0, 500), run(4.0, 450)])
    assert raw.texts_per_s == 50.0  # per-run 100, 50, 25
    assert raw.tokens_per_s == 2500.0
    assert raw.peak_rss_mb == 450
    assert raw.p50_batch_ms == 20.0
    assert raw.texts_per_s_runs == [100.0, 50.0, 25.0]


def test_ratios_compare_embedq_within_each_run_then_take_the_median() -> None:
    # The machine is shared: run 2 is slow for everyone. Ratios inside a run stay honest.
    speeds = {
        1: {"raw": 100, "st": 50, "embedq": 90},
        2: {"raw": 10, "st": 5, "embedq": 9},
        3: {"raw": 100, "st": 80, "embedq": 100},
    }
    results = [
        RunResult(variant, 100, 1000, 100 / texts_per_s, 1.0, run=run)
        for run, by_variant in speeds.items()
        for variant, texts_per_s in by_variant.items()
    ]
    assert run_ratios(results) == {
        "d/a": pytest.approx([0.9, 0.9, 1.0]),
        "d/b": pytest.approx([1.8, 1.8, 1.25]),
    }
    assert ratios(results) == {"d/a": pytest.approx(0.9), "d/b": pytest.approx(1.8)}


def test_batch_latency_prefers_the_worker_latency_field() -> None:
    sequential = {"event": "batch_done", "count": 3, "encode_ms": 5.0, "write_ms": 2.5, "ack_ms": 1}
    assert batch_latency_ms(sequential) == 8.5
    assert batch_latency_ms({**sequential, "latency_ms": 42.0}) == 42.0


def test_load_sample_reads_the_first_rows_and_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"id": 1, "text": "a"}\n\n{"id": "2", "text": "b"}\n{"id": "3", "text": "c"}\n'
    )
    assert load_sample(good, 2) == [{"id": "1", "text": "a"}, {"id": "2", "text": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "a"}\n{"id": "2"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        load_sample(bad, 10)


def _report(corpus: str, texts_per_s: float) -> BenchReport:
    result = RunResult("embedq", 10, 100, 10 / texts_per_s, 500.0, [5.0])
    raw = RunResult("raw", 10, 100, 5 / texts_per_s, 400.0, [2.0])
    return BenchReport(
        corpus=corpus,
        command=f"embedq bench --corpus {corpus}",
        n=10,
        n_classic=5,
        runs=1,
        settings={
            "device": "cpu",
            "dtype": "fp32",
            "read_count": 512,
            "max_batch_tokens": 4096,
            "max_batch_rows": 64,
            "block_ms": 100,
        },
        machine={"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "2", "python": "3"},
        loadavg_before=(1.0, 1.0, 1.0),
        loadavg_after=(1.0, 1.0, 1.0),
        started_at="2026-01-01 00:00 UTC",
        wall_s=1.0,
        enqueue_texts_per_s=1000.0,
        summaries={"raw": summarize([raw]), "embedq": summarize([result])},
        results=[raw, result],
    )


def test_markdown_updates_its_own_block_and_keeps_other_sections(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Enqueue throughput\n\nproducer numbers\n")
    update_markdown(doc, _report("long.jsonl", 10.0))
    update_markdown(doc, _report("short.jsonl", 20.0))
    update_markdown(doc, _report("long.jsonl", 30.0))  # a re-run replaces the old block
    text = doc.read_text()
    assert "## Enqueue throughput\n\nproducer numbers" in text
    assert text.count(SECTION) == 1
    assert text.count("### long.jsonl") == 1
    assert text.count("### short.jsonl") == 1
    assert "| 30.0 |" in text
    assert "| 10.0 |" not in text
    assert "embedq bench --corpus long.jsonl" in markdown(_report("long.jsonl", 1.0))
    assert "d/a = 0.50× (runs: 0.50)" in text


def test_bench_command_runs_all_four_variants(tmp_path: Path) -> None:
    corpus = tmp_path / "short.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": r["id"], "text": r["text"]}) + "\n"
            for r in corpus_rows("short.jsonl", 20)
        )
    )
    output = tmp_path / "benchmarks.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedq.cli",
            "bench",
            "--corpus",
            str(corpus),
            "-n",
            "20",
            "--n-classic",
            "8",
            "--runs",
            "1",
            "--json",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout)
    assert list(report["summaries"]) == ["raw", "st", "classic", "embedq"]
    for name, summary in report["summaries"].items():
        assert summary["texts_per_s"] > 0, name
        assert summary["tokens_per_s"] > summary["texts_per_s"], name
        assert summary["peak_rss_mb"] > 50, name
    assert report["summaries"]["classic"]["texts"] == 8
    assert report["summaries"]["embedq"]["texts"] == 20
    embedq_run = next(r for r in report["results"] if r["variant"] == "embedq")
    assert embedq_run["extra"]["rows_in_milvus"] == 20
    assert set(report["ratios"]) == {"d/a", "d/b", "d/c"}
    assert report["machine"]["cores"] >= 1
    written = output.read_text()
    for variant in VARIANTS:  # the default ones ran; (u) runs on request
        assert LABELS[variant] in written
