"""The ``embedq bench`` variants, each run in a fresh child process;
``embedq.bench.run`` runs them side by side.

- ``raw``: the ceiling. embedq's ``Encoder`` with the worker's token-budget batching over
  read windows (tokenize + forward), no queue, no database.
- ``st``: ``SentenceTransformer(model_dir).encode(texts, batch_size=32)``, its defaults.
- ``classic``: the per-message worker many teams write first: XREADGROUP COUNT 1,
  tokenize + forward one text, write one row to Milvus, XACK, loop.
- ``embedq``: the real worker (``build_worker(...).run()`` in drain mode) from a stream
  enqueued beforehand into a fresh Milvus Lite file; timed from ``worker_started`` (model
  loaded) to drained, acks included.

On request (issue 29): ``onnx``, ``onnx-int8``, ``openvino``, ``openvino-int8`` (``embedq``
on another backend) and ``st-onnx-int8`` (sentence-transformers' ``backend="onnx"`` int8
``encode``, under another interpreter).
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from embedq.core.config import Settings
from embedq.core.errors import ConfigError

ST_BATCH_SIZE = 32  # SentenceTransformer.encode's default

# -- results of one run ---------------------------------------------------------------


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


# -- the variants (each runs in a child process) ------------------------------------------


@dataclass(frozen=True)
class BenchRun:
    """What one child needs: the variant, the texts, where to put things, the run number."""

    variant: str
    rows: list[dict[str, str]]
    settings: Settings
    run: int
    st_python: str = ""  # the interpreter of variant st-onnx-int8


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_raw(bench_run: BenchRun) -> RunResult:
    from embedq.model.encoder import Encoder
    from embedq.worker.packing import plan_batches

    s = bench_run.settings
    loaded = time.perf_counter()
    encoder = Encoder(s.model, s.device, s.dtype)
    texts = [r["text"] for r in bench_run.rows]
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


def run_st(bench_run: BenchRun) -> RunResult:
    from sentence_transformers import SentenceTransformer

    from embedq.model.encoder import resolve_model_dir

    s = bench_run.settings
    loaded = time.perf_counter()
    model = SentenceTransformer(str(resolve_model_dir(s.model)[0]), device=s.device)
    texts = [r["text"] for r in bench_run.rows]
    # Real tokens as the model sees them (same tokenizer and truncation as embedq's).
    encoded = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    model.encode(texts[:2], batch_size=ST_BATCH_SIZE)
    started = time.perf_counter()
    model.encode(texts, batch_size=ST_BATCH_SIZE, show_progress_bar=False)
    elapsed = time.perf_counter() - started
    return RunResult("st", len(texts), tokens, elapsed, _peak_rss_mb(), [], started - loaded)


def run_classic(bench_run: BenchRun) -> RunResult:
    """The classic design, faithfully: one message, one forward, one write, one ack.

    The one-row write is a plain pymilvus ``upsert`` of a dict (as such a worker is written,
    not embedq's columnar writer), with the fields the collection created by embedq's
    ``Sink`` asks for; one Milvus call per message."""
    from embedq.model.encoder import Encoder
    from embedq.queue.stream import open_stream
    from embedq.sink.columns import Columns, meta_json
    from embedq.sink.milvus import open_sink

    s = bench_run.settings
    loaded = time.perf_counter()
    encoder = Encoder(s.model, s.device, s.dtype)
    encoder.encode(["warm up"])
    stream = open_stream(s)
    stream.ensure_group()
    sink = open_sink(s)
    sink.ensure_collection(encoder.width, encoder.name)
    started = time.perf_counter()
    done = tokens = 0
    batch_ms: list[float] = []
    while done < len(bench_run.rows):
        entries = stream.read_new(1, s.block_ms)
        if not entries:
            continue
        t0 = time.perf_counter()
        entry = entries[0]
        text = entry.fields[b"text"].decode()
        tokenized = encoder.tokenize([text])
        vector = encoder.forward([tokenized[0].ids]).vectors[0]
        row = Columns(
            [entry.fields[b"id"].decode()], vector[None, :], [text], [meta_json({})], [""], [""]
        ).rows(sink.fields)
        sink.client.upsert(sink.target, row, timeout=sink.timeout_s)
        stream.ack([entry.entry_id])
        batch_ms.append((time.perf_counter() - t0) * 1000)
        tokens += len(tokenized[0].ids)
        done += 1
    elapsed = time.perf_counter() - started
    stored = sink.count()
    sink.close()
    return RunResult(
        "classic",
        done,
        tokens,
        elapsed,
        _peak_rss_mb(),
        batch_ms,
        started - loaded,
        {"rows_in_milvus": stored},
    )


# Variants that run the real worker (as ``embedq``) on another forward pass (issue 29).
BACKEND_VARIANTS = {
    "onnx": ("onnx", "none"),
    "onnx-int8": ("onnx", "int8"),
    "openvino": ("openvino", "none"),
    "openvino-int8": ("openvino", "int8"),
}


def run_backend(bench_run: BenchRun) -> RunResult:
    """(d) on another backend: the same worker, drained, with ``--backend`` and
    ``--quantize`` from the variant's name. The export, the conversion and the accuracy gate
    happen at load, before ``worker_started``, so they are not timed."""
    backend, quantize = BACKEND_VARIANTS[bench_run.variant]
    settings = bench_run.settings.replace(backend=backend, quantize=quantize)
    return replace(run_embedq(replace(bench_run, settings=settings)), variant=bench_run.variant)


def st_onnx_child(st_python: str, request: dict[str, Any]) -> dict[str, Any]:
    """``embedq.bench.st_onnx`` run under ``st_python`` with ``request``: its result line
    (also what scripts/int8_recipes.py compares its recipes with)."""
    from embedq.bench import st_onnx

    done = subprocess.run(
        [st_python, st_onnx.__file__],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise ConfigError(f"variant st-onnx-int8 failed under {st_python}: {last}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def run_st_onnx(bench_run: BenchRun) -> RunResult:
    """(b-onnx-int8) sentence-transformers' ``backend="onnx"`` int8 ``encode``, in the
    interpreter ``--st-python`` names (``embedq.bench.st_onnx`` says why and how)."""
    from embedq.model.encoder import resolve_model_dir
    from embedq.model.onnx_backend import cpu_isa

    if not bench_run.st_python:
        raise ConfigError(
            "variant st-onnx-int8 needs --st-python: a Python with sentence-transformers and "
            "optimum[onnxruntime] (see docs/benchmarks.md#cpu-backends-issue-29)"
        )
    texts = [r["text"] for r in bench_run.rows]
    request = {
        "model_dir": str(resolve_model_dir(bench_run.settings.model)[0]),
        "texts": texts,
        "work_dir": str(Path(bench_run.settings.milvus_uri).parent),
        "quantization": ST_QUANTIZATION.get(cpu_isa(), "avx2"),
        "check_texts": texts[:ST_CHECK_TEXTS] if bench_run.run == 1 else [],
    }
    found = st_onnx_child(bench_run.st_python, request)
    extra: dict[str, Any] = {k: found[k] for k in ("file", "lowest_cosine_vs_fp32") if k in found}
    return RunResult(
        "st-onnx-int8",
        found["texts"],
        found["tokens"],
        found["elapsed_s"],
        found["peak_rss_mb"],
        [],
        found["setup_s"],
        extra,
    )


# sentence-transformers' quantization configs by the instruction set embedq.model.onnx_backend
# finds (``export_dynamic_quantized_onnx_model``'s names).
ST_QUANTIZATION = {"AVX-512 VNNI": "avx512_vnni", "AVX-512": "avx512", "AVX2": "avx2"}
ST_CHECK_TEXTS = 64  # texts on which st-onnx-int8's vectors are compared with fp32 torch


def run_unordered(bench_run: BenchRun) -> RunResult:
    """(u) The same worker with ordered per-id writes off: what the index guarantee costs."""
    unordered = replace(bench_run, settings=bench_run.settings.replace(ordered_writes=False))
    return replace(run_embedq(unordered), variant="unordered")


def run_embedq(bench_run: BenchRun) -> RunResult:
    """The real worker, drained; batch latencies from its ``batch_done`` debug events."""
    import structlog

    from embedq.worker.launch import build_worker

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
    worker = build_worker(bench_run.settings)
    stats = worker.run()
    finished = time.perf_counter()
    started = next((t for t, e in events if e.get("event") == "worker_started"), loaded)
    stored = worker.sink.count()
    batch_ms = [batch_latency_ms(e) for _, e in events if e.get("event") == "batch_done"]
    tokens = sum(int(e.get("tokens", 0)) for _, e in events if e.get("event") == "batch_done")
    return RunResult(
        "embedq",
        stats.texts,
        tokens or stats.tokens,
        finished - started,
        _peak_rss_mb(),
        batch_ms,
        started - loaded,
        {"rows_in_milvus": stored, "dead_lettered": stats.dead_lettered},
    )


def batch_latency_ms(event: dict[str, Any]) -> float:
    """A ``batch_done`` event's latency: its ``latency_ms`` when it has one, else the sum of
    its stage timings (encode_ms + write_ms + ack_ms for the sequential worker)."""
    if "latency_ms" in event:
        return float(event["latency_ms"])
    return float(
        sum(v for k, v in event.items() if k.endswith("_ms") and isinstance(v, int | float))
    )


_RUNNERS: dict[str, Callable[[BenchRun], RunResult]] = {
    "raw": run_raw,
    "st": run_st,
    "classic": run_classic,
    "embedq": run_embedq,
    "unordered": run_unordered,
    "st-onnx-int8": run_st_onnx,
    **dict.fromkeys(BACKEND_VARIANTS, run_backend),
}
VARIANTS = ("raw", "st", "classic", "embedq")  # the default, in the order they run each run
# On request (--variants): what ordered writes cost, and the CPU backends (issue 29).
EXTRA_VARIANTS = ("unordered", *BACKEND_VARIANTS, "st-onnx-int8")


def _child(bench_run: BenchRun) -> RunResult:
    import torch

    from embedq.core import logs

    # Warnings only (the embedq variant installs its own event recorder).
    logs.configure("warning", json=True)
    torch.set_grad_enabled(False)
    return _RUNNERS[bench_run.variant](bench_run)


def run_in_child(bench_run: BenchRun) -> RunResult:
    """One variant in a fresh spawned process: its own imports, model and peak RSS."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_child, bench_run).result()
