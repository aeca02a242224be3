"""``embedq bench --feed``: can embedq feed a fast device? The pipeline around the model next
to its own slowest component, on one Milvus 2.3.5 server and one private Redis.

The model is a **zero-layer copy** of the given one (same tokenizer, embeddings, pooling and
output width; no transformer layers), built here, so the forward pass is nearly free and
what is timed is everything around it: read, decode, tokenize, tensors, pool, rows, upsert,
ack. Variants, interleaved run by run on the same rows:

(e) ``feed``: ``embedq worker --drain`` as real processes (``procs`` of them, one consumer
    each), GPU-like shapes; the rate is read **from outside**, from the consumer group
    (acknowledged = entries read - pending), between 10 % and 90 % acknowledged, so start-up
    and the tail are left out. CPU µs per text by stage come from each worker's
    ``worker_stopped`` line; peak RSS from the kernel (``wait4``).
(f) ``sink``: bare pymilvus ``MilvusClient.upsert`` of the same rows (dict rows, 384-d +
    text + meta + hash + version), ``SINK_ROWS`` per call, one client, into a collection
    with embedq's schema. ``sink-columns`` does the same through embedq's columnar writer.
(g) ``tokenizer``: the model's Rust tokenizer, ``encode_batch`` of 512 texts per call.
(h) ``redis``: XREADGROUP COUNT 512 + XACK of the same entries, one client.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedq.bench.report import median

SINK_ROWS = 512
TOKENIZER_ROWS = 512
REDIS_COUNT = 512
# What a worker on a GPU runs: wide batches, big read windows, one model thread.
GPU_SHAPES = (
    "--max-batch-rows",
    "256",
    "--max-batch-tokens",
    "16384",
    "--read-count",
    "2048",
    "--replicas",
    "1",
)
BASELINES = ("sink", "tokenizer", "redis")


@dataclass
class FeedResult:
    variant: str  # feed×N, sink, sink-columns, tokenizer, redis
    run: int
    texts: int
    texts_per_s: float
    peak_rss_mb: float = 0.0
    cpu_us_per_text: dict[str, float] = field(default_factory=dict)
    process_cpu_us_per_text: float = 0.0  # every thread of every worker, start-up left out
    rss_mb: dict[str, float] = field(default_factory=dict)  # summed RSS at 25/50/90 % acked
    window_s: tuple[float, float] = (0.0, 0.0)  # perf_counter at 10 % and 90 % acked


def zero_layer_copy(model_dir: Path, into: Path) -> Path:
    """The model with ``num_hidden_layers=0``: its tokenizer, pooling and width, no layers."""
    from transformers import AutoConfig, AutoModel

    shutil.copytree(model_dir, into, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    config.num_hidden_layers = 0
    AutoModel.from_config(config).save_pretrained(str(into))  # type: ignore[no-untyped-call]
    return into


# -- (e) the worker, from outside -----------------------------------------------------------


def acked(redis_url: str, stream: str, group: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for info in client.xinfo_groups(stream):
            if info["name"].decode() == group:
                return int(info.get("entries-read") or 0) - int(info["pending"])
        return 0
    finally:
        client.close()


def ack_window(samples: list[tuple[float, int]], total: int) -> tuple[float, float]:
    """When 10 % and 90 % of ``total`` were acknowledged (``perf_counter`` times,
    interpolated between samples): the span a rate is read over, and the span the GPU
    run kit reads the device's utilisation over."""

    def when(level: float) -> float:
        target = level * total
        for (t0, a0), (t1, a1) in itertools.pairwise(samples):
            if a1 >= target:
                return t1 if a1 == a0 else t0 + (t1 - t0) * (target - a0) / (a1 - a0)
        return samples[-1][0]

    return when(0.1), when(0.9)


def rate_between(samples: list[tuple[float, int]], total: int) -> float:
    """texts/s between 10 % and 90 % acknowledged (times interpolated between samples)."""
    start, end = ack_window(samples, total)
    span = end - start
    return 0.8 * total / span if span > 0 else 0.0


def run_feed(
    rows: list[dict[str, str]],
    *,
    procs: int,
    model: Path,
    redis_url: str,
    milvus_uri: str,
    name: str,
    run: int,
) -> FeedResult:
    """(e): ``procs`` worker processes drain a stream filled beforehand."""
    from embedq.producer.client import Producer

    with Producer.connect(redis_url, name) as producer:
        producer.enqueue(rows)
    flags = {"model": str(model), "redis-url": redis_url, "stream": name}
    flags |= {"milvus-uri": milvus_uri, "collection": name, "log-level": "info"}
    base = [sys.executable, "-m", "embedq.cli", "worker", "--drain", *GPU_SHAPES]
    base += [part for flag, value in flags.items() for part in (f"--{flag}", value)]
    # One intra-op thread each: the zero-layer forward is tiny, and processes sharing the
    # cores must not each start a thread per core.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    workers = [
        subprocess.Popen(
            [*base, "--consumer", f"{name}-{i}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(procs)
    ]
    logs: list[bytes] = [b""] * procs
    readers = [threading.Thread(target=_collect, args=(w, logs, i)) for i, w in enumerate(workers)]
    for t in readers:
        t.start()
    samples, rss = _watch(workers, redis_url, name)
    for t in readers:
        t.join()
    for w, log in zip(workers, logs, strict=True):
        if w.returncode != 0:
            raise RuntimeError(f"a feed worker exited {w.returncode}: {log[-800:]!r}")
    result = _summary([_stopped(log) for log in logs], f"feed×{procs}", run)
    result.texts_per_s = rate_between(samples, len(rows))
    result.window_s = ack_window(samples, len(rows))
    result.rss_mb = _rss_at(samples, rss, len(rows))
    return result


def _watch(
    workers: list[subprocess.Popen[bytes]], redis_url: str, name: str
) -> tuple[list[tuple[float, int]], list[float]]:
    """(time, acknowledged) every 50 ms until the workers exit, and their summed RSS (MB)."""
    samples: list[tuple[float, int]] = []
    rss: list[float] = []
    while any(w.poll() is None for w in workers):
        samples.append((time.perf_counter(), acked(redis_url, name, "embedq")))
        rss.append(sum(_rss_mb(w.pid) for w in workers))
        time.sleep(0.05)
    samples.append((time.perf_counter(), acked(redis_url, name, "embedq")))
    rss.append(0.0)
    return samples, rss


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_at(samples: list[tuple[float, int]], rss: list[float], total: int) -> dict[str, float]:
    """Resident memory when 25 %, 50 % and 90 % of the backlog was acknowledged: flat
    means the worker's memory does not grow with the backlog."""
    out: dict[str, float] = {}
    for level in (0.25, 0.5, 0.9):
        i = next((i for i, (_t, a) in enumerate(samples) if a >= level * total), -1)
        out[f"{int(level * 100)}%"] = round(rss[i], 1) if i >= 0 else 0.0
    return out


def _summary(stopped: list[dict[str, Any]], variant: str, run: int) -> FeedResult:
    """The workers' own accounts: texts, CPU per stage (weighted by texts), peak RSS."""
    texts = sum(int(s["texts"]) for s in stopped)
    stages: dict[str, float] = {}
    for s in stopped:
        for stage, us in s.get("cpu_us_per_text", {}).items():
            stages[stage] = stages.get(stage, 0.0) + us * int(s["texts"]) / max(texts, 1)
    process_us = sum(float(s.get("process_cpu_s", 0.0)) for s in stopped) / max(texts, 1) * 1e6
    return FeedResult(
        variant,
        run,
        texts,
        0.0,
        max(float(s.get("peak_rss_mb", 0.0)) for s in stopped),
        {k: round(v, 1) for k, v in sorted(stages.items())},
        round(process_us, 1),
    )


def _collect(proc: subprocess.Popen[bytes], logs: list[bytes], i: int) -> None:
    assert proc.stderr is not None
    logs[i] = proc.stderr.read()
    proc.wait()


def _stopped(log: bytes) -> dict[str, Any]:
    for line in reversed(log.decode(errors="replace").splitlines()):
        if '"worker_stopped"' in line:
            return dict(json.loads(line))
    raise RuntimeError(f"no worker_stopped line in a feed worker's log: {log[-800:]!r}")


# -- (f), (g), (h): the components alone ----------------------------------------------------


def _rows_for_sink(rows: list[dict[str, str]], dimension: int) -> tuple[Any, list[str]]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(rows), dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [r["text"] for r in rows]


def run_sink(
    rows: list[dict[str, str]],
    *,
    milvus_uri: str,
    name: str,
    run: int,
    dimension: int,
    columns: bool,
) -> FeedResult:
    """(f): one client upserting the rows, ``SINK_ROWS`` per call."""
    from embedq.sink.columns import Columns
    from embedq.sink.milvus import Sink

    sink = Sink(milvus_uri, "", name, timeout_s=60)
    sink.ensure_collection(dimension, "bench")
    vectors, texts = _rows_for_sink(rows, dimension)
    ids = [r["id"] for r in rows]
    started = time.perf_counter()
    for b in range(0, len(rows), SINK_ROWS):
        end = b + SINK_ROWS
        if columns:
            sink.upsert_columns(
                Columns(
                    ids[b:end],
                    vectors[b:end],
                    texts[b:end],
                    [b"{}"] * len(ids[b:end]),
                    ["0" * 32] * len(ids[b:end]),
                    ["1-0"] * len(ids[b:end]),
                )
            )
        else:
            sink.client.upsert(
                name,
                [
                    {
                        "id": i,
                        "vector": v.tolist(),
                        "text": t,
                        "meta": {},
                        "content_hash": "0" * 32,
                        "version": "1-0",
                    }
                    for i, v, t in zip(ids[b:end], vectors[b:end], texts[b:end], strict=True)
                ],
                timeout=60,
            )
    elapsed = time.perf_counter() - started
    sink.close()
    return FeedResult("sink-columns" if columns else "sink", run, len(rows), len(rows) / elapsed)


def run_tokenizer(rows: list[dict[str, str]], *, model: Path, run: int) -> FeedResult:
    """(g): the Rust tokenizer as embedq configures it, 512 texts per call."""
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(str(model), local_files_only=True).backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length=256)
    texts = [r["text"] for r in rows]
    started = time.perf_counter()
    for b in range(0, len(texts), TOKENIZER_ROWS):
        backend.encode_batch(texts[b : b + TOKENIZER_ROWS], add_special_tokens=True)
    return FeedResult("tokenizer", run, len(texts), len(texts) / (time.perf_counter() - started))


def run_redis(rows: list[dict[str, str]], *, redis_url: str, name: str, run: int) -> FeedResult:
    """(h): XREADGROUP COUNT 512 + XACK of the entries the producer wrote, one client."""
    import redis

    from embedq.producer.client import Producer

    with Producer.connect(redis_url, name) as producer:
        producer.enqueue(rows)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(name, "bare", id="0")
    done = 0
    started = time.perf_counter()
    while done < len(rows):
        reply: Any = client.xreadgroup("bare", "c", {name: ">"}, count=REDIS_COUNT)
        if not reply:
            break
        ids: list[Any] = [eid for eid, _fields in reply[0][1]]
        client.xack(name, "bare", *ids)
        done += len(ids)
    elapsed = time.perf_counter() - started
    client.close()
    return FeedResult("redis", run, done, done / elapsed)


def feed_ratios(results: list[FeedResult]) -> dict[str, float]:
    """Median over runs of feed×N / min(sink, tokenizer, redis) of the same run."""
    out: dict[str, list[float]] = {}
    for run in sorted({r.run for r in results}):
        mine = [r for r in results if r.run == run]
        floor = min((r.texts_per_s for r in mine if r.variant in BASELINES), default=0.0)
        for r in mine:
            if r.variant.startswith("feed") and floor:
                out.setdefault(r.variant, []).append(r.texts_per_s / floor)
    return {k: median(v) for k, v in out.items()}
