"""``embedq bench``: embedq end to end next to its own ceiling and two common designs.

Four variants run on the same machine, the same corpus sample and the same model, each in a
fresh child process (``spawn``) so its peak RSS is its own, and the runs interleave
(a, b, c, d, a, b, c, d, …) so a neighbour's load hits every variant alike:

- ``raw``: the ceiling. embedq's ``Encoder`` with the worker's token-budget batching over
  read windows (tokenize + forward), no queue, no database.
- ``st``: ``SentenceTransformer(model_dir).encode(texts, batch_size=32)``, its defaults.
- ``classic``: the per-message worker many teams write first: XREADGROUP COUNT 1,
  tokenize + forward one text, ``MilvusClient.insert`` one row, XACK, loop.
- ``embedq``: the real worker (``build_worker(...).run()`` in drain mode) from a stream
  enqueued beforehand (enqueue time not counted, but reported) into a fresh Milvus Lite
  file; timed from ``worker_started`` (model loaded) to drained, acks included, and the row
  count checked in Milvus afterwards.

Redis is a private ``redis-server`` on a free port started for the bench, so no one
else's data is touched. Model load is never timed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedq.config import Settings
from embedq.errors import ConfigError

VARIANTS = ("raw", "st", "classic", "embedq")
LABELS = {
    "raw": "(a) raw model ceiling",
    "st": "(b) sentence-transformers encode",
    "classic": "(c) classic per-message worker",
    "embedq": "(d) embedq end to end",
}
ST_BATCH_SIZE = 32  # SentenceTransformer.encode's default
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
class RunResult:
    """One variant, one run, as measured in its child process."""

    variant: str
    texts: int
    tokens: int
    elapsed_s: float
    peak_rss_mb: float
    batch_ms: list[float] = field(default_factory=list)
    setup_s: float = 0.0  # model load etc., never part of elapsed_s
    extra: dict[str, Any] = field(default_factory=dict)
    run: int = 1

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


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


# -- a private Redis ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away ``redis-server`` on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ConfigError(
            "embedq bench starts its own redis-server (so it touches no one's data) but none "
            "is on PATH: apt-get install redis-server"
        )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="embedq-bench-redis-") as data_dir:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", data_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_for_redis(url, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_redis(url: str, process: subprocess.Popen[bytes]) -> None:
    import redis

    from embedq.redis_connection import connect

    client = connect(url)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError("the bench's private redis-server did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


# -- the variants (each runs in a child process) ------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one child needs: the variant, the texts, and where to put things."""

    variant: str
    rows: list[dict[str, str]]
    settings: Settings
    run: int


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_raw(job: Job) -> RunResult:
    from embedq.batching import plan_batches
    from embedq.encoder import Encoder

    s = job.settings
    loaded = time.perf_counter()
    encoder = Encoder(s.model, s.device, s.dtype)
    texts = [r["text"] for r in job.rows]
    encoder.encode(texts[:2])  # first-call set-up (allocator, kernels) is not throughput
    started = time.perf_counter()
    batch_ms: list[float] = []
    tokens = 0
    for begin in range(0, len(texts), s.read_count):
        window = encoder.tokenize(texts[begin : begin + s.read_count])
        for batch in plan_batches(
            [len(t.ids) for t in window], s.max_batch_tokens, s.max_batch_rows
        ):
            t0 = time.perf_counter()
            encoded = encoder.forward([window[i].ids for i in batch])
            batch_ms.append((time.perf_counter() - t0) * 1000)
            tokens += encoded.tokens
    elapsed = time.perf_counter() - started
    return RunResult("raw", len(texts), tokens, elapsed, _peak_rss_mb(), batch_ms, started - loaded)


def run_st(job: Job) -> RunResult:
    from sentence_transformers import SentenceTransformer

    from embedq.encoder import resolve_model_dir

    s = job.settings
    loaded = time.perf_counter()
    model = SentenceTransformer(str(resolve_model_dir(s.model)[0]), device=s.device)
    texts = [r["text"] for r in job.rows]
    # Real tokens as the model sees them (same tokenizer and truncation as embedq's).
    encoded = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    model.encode(texts[:2], batch_size=ST_BATCH_SIZE)
    started = time.perf_counter()
    model.encode(texts, batch_size=ST_BATCH_SIZE, show_progress_bar=False)
    elapsed = time.perf_counter() - started
    return RunResult("st", len(texts), tokens, elapsed, _peak_rss_mb(), [], started - loaded)


def run_classic(job: Job) -> RunResult:
    """The classic design, faithfully: one message, one forward, one insert, one ack."""
    from embedq.encoder import Encoder
    from embedq.sink import open_sink
    from embedq.stream import open_stream

    s = job.settings
    loaded = time.perf_counter()
    encoder = Encoder(s.model, s.device, s.dtype)
    encoder.encode(["warm up"])
    stream = open_stream(s)
    stream.ensure_group()
    sink = open_sink(s)
    sink.ensure_collection(encoder.dimension, encoder.name)
    client = sink.client
    started = time.perf_counter()
    done = tokens = 0
    batch_ms: list[float] = []
    while done < len(job.rows):
        entries = stream.read_new(1, s.block_ms)
        if not entries:
            continue
        t0 = time.perf_counter()
        entry = entries[0]
        text = entry.fields[b"text"].decode()
        tokenized = encoder.tokenize([text])
        vector = encoder.forward([tokenized[0].ids]).vectors[0]
        client.insert(
            s.collection,
            [
                {
                    "id": entry.fields[b"id"].decode(),
                    "vector": vector.tolist(),
                    "text": text,
                    "meta": {},
                }
            ],
            timeout=s.milvus_timeout_s,
        )
        stream.ack([entry.entry_id])
        batch_ms.append((time.perf_counter() - t0) * 1000)
        tokens += len(tokenized[0].ids)
        done += 1
    elapsed = time.perf_counter() - started
    stored = sink.count()
    sink.close()
    return RunResult(
        "classic", done, tokens, elapsed, _peak_rss_mb(), batch_ms, started - loaded,
        {"rows_in_milvus": stored},
    )  # fmt: skip


def run_embedq(job: Job) -> RunResult:
    """The real worker, drained; batch latencies from its ``batch_done`` debug events."""
    import structlog

    from embedq.worker import build_worker

    events: list[tuple[float, dict[str, Any]]] = []

    def record(_logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        events.append((time.perf_counter(), dict(event)))
        if name in ("warning", "error", "critical", "exception"):
            # A dead letter or a retry during a benchmark is worth seeing.
            sys.stderr.write(json.dumps(dict(event), default=str) + "\n")
        raise structlog.DropEvent

    structlog.configure(
        processors=[structlog.processors.add_log_level, record],
        wrapper_class=structlog.make_filtering_bound_logger(10),  # debug: batch_done lines
        cache_logger_on_first_use=False,
    )
    loaded = time.perf_counter()
    worker = build_worker(job.settings)
    stats = worker.run()
    finished = time.perf_counter()
    started = next((t for t, e in events if e.get("event") == "worker_started"), loaded)
    stored = worker.sink.count()
    batch_ms = [batch_latency_ms(e) for _, e in events if e.get("event") == "batch_done"]
    tokens = sum(int(e.get("tokens", 0)) for _, e in events if e.get("event") == "batch_done")
    return RunResult(
        "embedq", stats.texts, tokens or stats.tokens, finished - started, _peak_rss_mb(),
        batch_ms, started - loaded,
        {"rows_in_milvus": stored, "dead_lettered": stats.dead_lettered},
    )  # fmt: skip


def batch_latency_ms(event: dict[str, Any]) -> float:
    """A ``batch_done`` event's latency: its ``latency_ms`` when it has one, else the sum of
    its stage timings (encode_ms + write_ms + ack_ms for the sequential worker)."""
    if "latency_ms" in event:
        return float(event["latency_ms"])
    return float(
        sum(v for k, v in event.items() if k.endswith("_ms") and isinstance(v, int | float))
    )


_RUNNERS: dict[str, Callable[[Job], RunResult]] = {
    "raw": run_raw,
    "st": run_st,
    "classic": run_classic,
    "embedq": run_embedq,
}


def _child(job: Job) -> RunResult:
    import torch

    from embedq import logs

    # Warnings only (the embedq variant installs its own event recorder).
    logs.configure("warning", json=True)
    torch.set_grad_enabled(False)
    return _RUNNERS[job.variant](job)


def run_in_child(job: Job) -> RunResult:
    """One variant in a fresh spawned process: its own imports, model and peak RSS."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_child, job).result()


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
