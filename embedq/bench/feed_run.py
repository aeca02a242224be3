"""``embedq bench --feed``: the feed variants (``embedq.bench.feed``) run side by side,
interleaved run by run, on one private Redis and one Milvus 2.3.5 server; the report."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from embedq.bench.feed import (
    FeedResult,
    feed_ratios,
    run_feed,
    run_redis,
    run_sink,
    run_tokenizer,
    zero_layer_copy,
)
from embedq.bench.run import load_sample, loadavg, machine_facts
from embedq.bench.servers import MilvusStandalone, RedisServer
from embedq.model.encoder import Encoder


@dataclass
class FeedReport:
    corpus: str
    command: str
    n: int
    runs: int
    procs: list[int]
    machine: dict[str, Any]
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    started_at: str
    results: list[FeedResult]

    def medians(self) -> dict[str, FeedResult]:
        """Per variant: the run with the median texts/s (its stages and RSS with it)."""
        out: dict[str, FeedResult] = {}
        for variant in dict.fromkeys(r.variant for r in self.results):
            mine = sorted((r for r in self.results if r.variant == variant), key=_rate)
            out[variant] = mine[len(mine) // 2]
        return out


QUIESCE_S = 90.0  # the longest wait for an idle server before a variant


def _drop_all(uri: str) -> None:
    """Drop every collection of the bench's private server (a finished variant's rows)."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        for collection in client.list_collections():
            client.drop_collection(collection)
    finally:
        client.close()


def _rate(result: FeedResult) -> float:
    return result.texts_per_s


def _steps(
    rows: list[dict[str, str]],
    run: int,
    *,
    procs: list[int],
    zero: Path,
    dimension: int,
    redis_url: str,
    milvus_uri: str,
) -> list[tuple[str, Callable[[], FeedResult]]]:
    """One run's variants, in the order they run: the whole feed at each process count,
    the bare sink (rows, then columns), the tokenizer alone, and bare Redis."""
    feed = [
        (
            f"feed×{p}",
            partial(
                run_feed,
                rows,
                procs=p,
                model=zero,
                redis_url=redis_url,
                milvus_uri=milvus_uri,
                name=f"feed{p}r{run}",
                run=run,
            ),
        )
        for p in procs
    ]
    sink = partial(run_sink, rows, milvus_uri=milvus_uri, run=run, dimension=dimension)
    return [
        *feed,
        ("sink", partial(sink, name=f"sink{run}", columns=False)),
        ("sink-columns", partial(sink, name=f"cols{run}", columns=True)),
        ("tokenizer", partial(run_tokenizer, rows, model=zero, run=run)),
        ("redis", partial(run_redis, rows, redis_url=redis_url, name=f"bare{run}", run=run)),
    ]


def run_feed_bench(
    corpus: Path,
    model_dir: Path,
    *,
    n: int,
    runs: int,
    procs: list[int],
    command: str = "",
    progress: Callable[[str], None] = lambda _line: None,
    servers: tuple[str, str] | None = None,
) -> FeedReport:
    """Every variant ``runs`` times, interleaved, on one private Redis and Milvus server,
    or on ``servers`` (a Redis URL and a Milvus URI someone else runs: the GPU run kit's)."""
    rows = load_sample(corpus, n)
    before, started_at = loadavg(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: list[FeedResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="embedq-feed-") as tmp,
        _servers(Path(tmp), servers) as (redis_url, milvus_uri, quiesce),
    ):
        zero = zero_layer_copy(model_dir, Path(tmp) / "zero-layer-model")
        dimension = Encoder(str(zero), "cpu").width
        for run in range(1, runs + 1):
            steps = _steps(
                rows,
                run,
                procs=procs,
                zero=zero,
                dimension=dimension,
                redis_url=redis_url,
                milvus_uri=milvus_uri,
            )
            for label, step in steps:
                # Every variant starts on an idle server: the previous variant's segments
                # are sealed and indexed in the background for many seconds after its last
                # write, and that work would land on whichever variant runs next.
                if quiesce() >= QUIESCE_S:
                    progress(f"Milvus still busy after {QUIESCE_S:.0f} s: {label} shares it")
                result = step()
                results.append(result)
                _drop_all(milvus_uri)
                progress(f"run {run}/{runs} {label:<13} {result.texts_per_s:9.0f} texts/s")
    return FeedReport(
        corpus.name,
        command,
        len(rows),
        runs,
        procs,
        machine_facts(),
        before,
        loadavg(),
        started_at,
        results,
    )


@contextlib.contextmanager
def _servers(
    tmp: Path, given: tuple[str, str] | None
) -> Iterator[tuple[str, str, Callable[[], float]]]:
    """(Redis URL, Milvus URI, wait for an idle Milvus): the ``given`` servers as they are
    (no idle wait: only a 2.3.5 standalone's CPU can be read), else a private redis-server
    and Milvus 2.3.5 standalone, stopped afterwards."""
    if given is not None:
        yield given[0], given[1], lambda: 0.0
        return
    with RedisServer(tmp / "redis") as redis_server, MilvusStandalone(tmp / "milvus") as milvus:
        yield redis_server.url, milvus.uri, partial(milvus.quiesce, timeout_s=QUIESCE_S)


STAGES = (
    "read",
    "decode",
    "tokenize",
    "plan",
    "forward",
    "pool",
    "fence",
    "build_rows",
    "upsert",
    "ack",
    "jobs",
    "metrics",
)


def feed_markdown(report: FeedReport) -> str:
    medians = report.medians()
    lines = [
        f"Machine: {report.machine['cpu']}, {report.machine['cores']} cores; "
        f"{report.started_at}; load {report.loadavg_before[0]:.2f} → "
        f"{report.loadavg_after[0]:.2f}; {report.n} texts of {report.corpus}, "
        f"{report.runs} runs interleaved (medians).",
        "",
        "```sh",
        report.command,
        "```",
        "",
        "| variant | texts/s (median) | per run | ratio to min(f, g, h) | peak RSS MB "
        "| RSS at 25/50/90 % acked |",
        "|---|--:|---|--:|--:|---|",
    ]
    ratios = feed_ratios(report.results)
    for variant, result in medians.items():
        per_run = ", ".join(f"{r.texts_per_s:,.0f}" for r in report.results if r.variant == variant)
        ratio = f"{ratios[variant]:.2f}" if variant in ratios else ""
        rss = f"{result.peak_rss_mb:.0f}" if result.peak_rss_mb else ""
        over = " / ".join(f"{v:.0f}" for v in result.rss_mb.values())
        lines.append(
            f"| {variant} | {result.texts_per_s:,.0f} | {per_run} | {ratio} | {rss} | {over} |"
        )
    feeds = [v for v in medians if v.startswith("feed")]
    if feeds:
        lines += [
            "",
            "CPU µs per text by stage (worker threads' own CPU time; the median run):",
            "",
            "| stage | " + " | ".join(feeds) + " |",
            "|---|" + "--:|" * len(feeds),
        ]
        for stage in STAGES:
            cells = [f"{medians[v].cpu_us_per_text.get(stage, 0.0):.1f}" for v in feeds]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        totals = [f"{sum(medians[v].cpu_us_per_text.values()):.1f}" for v in feeds]
        process = [f"{medians[v].process_cpu_us_per_text:.1f}" for v in feeds]
        lines.append("| **sum of stages** | " + " | ".join(totals) + " |")
        lines.append("| whole process(es) | " + " | ".join(process) + " |")
    return "\n".join(lines) + "\n"
