"""On a real GPU (issue 30; ``scripts/gpu_check.sh`` runs these with ``pytest -m gpu``):
fp16 vectors of real text equal fp32 ones, replicas and ``--procs-per-device`` processes
share one device, a CUDA out-of-memory shrinks the batch instead of dead-lettering, and a
sticky device error stops the worker with nothing dead-lettered.

Every test is marked ``gpu`` and skipped where CUDA is not available. The kit's dry run
sets ``EMBEDQ_GPU_KIT_DEVICE=cpu``: the tests that have a CPU equivalent then run on the
CPU (fp16 included), so their code is exercised before any GPU run; the two that need CUDA
itself (a real CUDA OOM, a device-side assert) stay skipped there.

``EMBEDQ_GPU_REFERENCE`` names the vectors ``scripts/gpu_check.sh --prepare`` computed
with the original fp32 weights on the CPU: the packaged model travels to a GPU machine in
fp16 (it must fit the 64 MiB a device call carries), so fp32 of the carried weights alone
would leave the rounding of the weights out of the comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import redis
import torch
from structlog.testing import capture_logs

from embedq.bench.gpu_kit import reference_texts
from embedq.core.config import Settings
from embedq.core.errors import SinkUnavailable
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble

from .conftest import REDIS_URL, SAMPLE, corpus_rows
from .support.cli import JSON_LOGS, embedq
from .support.servers import MilvusLiteServer

DEVICE = os.environ.get("EMBEDQ_GPU_KIT_DEVICE") or "cuda"
ON_CUDA = DEVICE.startswith("cuda") and torch.cuda.is_available()
RUNS_HERE = ON_CUDA or DEVICE == "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not RUNS_HERE, reason="needs CUDA (or EMBEDQ_GPU_KIT_DEVICE=cpu)"),
]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA itself, no CPU equivalent")
COSINE = 0.999  # each vector, fp16 against fp32
# fp16 on a CPU is emulated and slow: the dry run embeds a few texts of each kind.
SOME = slice(None) if ON_CUDA else slice(0, 2)


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def enqueue(stream: str, rows: list[dict[str, Any]]) -> None:
    with Producer.connect(REDIS_URL, stream=stream) as producer:
        producer.enqueue(rows)


def read_back(uri: str, collection: str, ids: list[str]) -> list[dict[str, Any]]:
    """The rows of ``ids``, and no more rows than that; one retry, since a loaded machine
    has made a fresh connection to ``milvus-lite server`` time out once."""
    for attempt in (1, 2):
        sink = Sink(uri, "", collection, timeout_s=60)
        try:
            assert sink.count() == len(ids)
            return sink.get(ids)
        except SinkUnavailable:
            if attempt == 2:
                raise
        finally:
            sink.close()
    raise AssertionError("unreachable")


def test_fp16_vectors_of_real_text_equal_fp32_ones(encoder: Encoder) -> None:
    every = reference_texts(SAMPLE)
    texts = [*every[:48][SOME], *every[48:96][SOME], *every[96:][SOME]]
    fp16 = Encoder(device=DEVICE, dtype="fp16")
    assert fp16.dtype is torch.float16 and fp16.device.startswith(DEVICE)
    got = fp16.encode(texts)
    assert np.isfinite(got).all()
    lowest = cosines(got, encoder.encode(texts))  # fp32 on the CPU, the same weights
    assert lowest.min() >= COSINE, f"text {lowest.argmin()}: cosine {lowest.min():.5f}"
    reference = os.environ.get("EMBEDQ_GPU_REFERENCE")
    if reference:  # the original fp32 weights' vectors, computed where they were installed
        with np.load(reference) as stored:
            assert list(stored["texts"]) == every, "the reference is of other texts"
            chosen = [every.index(t) for t in texts]
            original = cosines(got, stored["vectors"][chosen])
        assert original.min() >= COSINE, f"text {original.argmin()}: {original.min():.5f}"


def test_replicas_and_processes_share_one_device(
    encoder: Encoder,
    milvus_lite_server: MilvusLiteServer,
    redis_client: redis.Redis,
    stream_name: str,
) -> None:
    rows = corpus_rows("long.jsonl", 96 if ON_CUDA else 24)
    enqueue(stream_name, rows)
    done = embedq(
        "worker",
        *("--redis-url", REDIS_URL, "--stream", stream_name, "--group", "g"),
        *("--consumer", "w", "--milvus-uri", milvus_lite_server.uri, "--collection", "shared"),
        *("--device", DEVICE, "--replicas", "2", "--procs-per-device", "2"),
        *("--drain", "--block-ms", "100", "--read-count", "16", "--log-level", "info"),
        env=JSON_LOGS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count('"device_worker_started"') == 2
    consumers = redis_client.xinfo_consumers(f"{stream_name}", "g")
    assert len(consumers) == 2 and all(c["pending"] == 0 for c in consumers)
    assert redis_client.xlen(f"{stream_name}:dlq") == 0
    stored = read_back(milvus_lite_server.uri, "shared", [r["id"] for r in rows])
    assert sorted(r["id"] for r in stored) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: np.asarray(r["vector"], dtype=np.float32) for r in stored}
    want = encoder.encode([r["text"] for r in rows])
    got = np.stack([by_id[r["id"]] for r in rows])
    assert cosines(got, want).min() >= COSINE


@needs_cuda
def test_a_cuda_oom_shrinks_the_batch_and_dead_letters_nothing(
    encoder: Encoder, redis_client: redis.Redis, stream_name: str, tmp_path: Path
) -> None:
    """A real CUDA OOM: the caching allocator is capped (``set_per_process_memory_fraction``)
    between what one text and what the whole batch needs, measured first on this device."""
    gpu = Encoder(device="cuda")
    # 128 distinct texts at the model's 256-token limit: one batch of 128 × 256 tokens.
    long = [t for t in reference_texts(SAMPLE) if len(gpu.tokenize([t])[0].ids) >= 256]
    rows = [{"id": f"oom-{i}", "text": f"({i}) {long[i % len(long)]}"} for i in range(128)]
    limit = _between_one_and_all(gpu, [r["text"] for r in rows])
    enqueue(stream_name, rows)
    settings = Settings(
        redis_url=REDIS_URL,
        stream=stream_name,
        group="g",
        consumer="c",
        milvus_uri=str(tmp_path / "oom.db"),
        collection="oom",
        block_ms=100,
        drain=True,
        read_count=128,
        max_batch_rows=128,
        max_batch_tokens=128 * 256,
        device="cuda",
    )
    sink = Sink(settings.milvus_uri, "", settings.collection, timeout_s=60)
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    worker = assemble(settings, Stream(redis_client, stream_name, "g", "c"), gpu, sink)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        with capture_logs() as logs:
            stats = worker.run()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.cuda.memory_stats().get("num_ooms", 0) > ooms, "no OOM happened: limit too high"
    assert any(e["event"] == "batch_split" and "memory" in e["error"] for e in logs)
    assert stats.dead_lettered == 0 and redis_client.xlen(f"{stream_name}:dlq") == 0
    assert sink.count() == len(rows)
    vectors = {r["id"]: r["vector"] for r in sink.get([r["id"] for r in rows[:16]])}
    sink.close()
    got = np.asarray([vectors[r["id"]] for r in rows[:16]], dtype=np.float32)
    assert cosines(got, encoder.encode([r["text"] for r in rows[:16]])).min() >= COSINE


def _between_one_and_all(gpu: Encoder, texts: list[str]) -> int:
    """Bytes the allocator may hold: what one text's forward needed plus a quarter of what
    the whole batch needed on top, so the batch runs out of memory and small ones fit."""
    ids = [t.ids for t in gpu.tokenize(texts)]

    def peak(batch: list[list[int]]) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu.forward(batch)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_reserved())

    one, everything = peak(ids[:1]), peak(ids)
    torch.cuda.empty_cache()
    assert everything > one + 64 * 2**20, f"the batch needs too little: {one} → {everything}"
    return one + (everything - one) // 4


@needs_cuda
def test_a_sticky_device_error_stops_the_worker_and_dead_letters_nothing(
    tiny_model: Path, redis_client: redis.Redis, stream_name: str, tmp_path: Path
) -> None:
    """The suite's tiny model has fewer embedding rows than its tokenizer has tokens: on the
    CPU the text holding token 30080 raises in its forward pass and is dead-lettered as
    poison (tests/test_dead_letters.py); on CUDA the lookup trips a device-side assert that
    leaves the CUDA context unusable, for every text after it too. The worker stops and
    leaves the entries pending for a healthy worker; none is blamed."""
    rows = [{"id": f"ok-{i}", "text": f"sheep number {i} in a field"} for i in range(20)]
    rows.insert(7, {"id": "assert", "text": "the velocity xⁿ grows"})  # "##ⁿ" is 30080
    enqueue(stream_name, rows)
    done = embedq(
        "worker",
        *("--redis-url", REDIS_URL, "--stream", stream_name, "--group", "g"),
        *("--consumer", "w", "--milvus-uri", str(tmp_path / "sticky.db"), "--collection", "s"),
        *("--model", str(tiny_model), "--device", "cuda", "--drain", "--block-ms", "100"),
        env=JSON_LOGS,
    )
    assert done.returncode != 0, done.stderr[-3000:]
    assert "device" in done.stderr.lower(), done.stderr[-3000:]
    assert redis_client.xlen(f"{stream_name}:dlq") == 0, "a broken device dead-lettered entries"
    pending = redis_client.xpending(stream_name, "g")
    assert pending["pending"] >= 1  # left for a healthy worker, not acknowledged
