"""Device-dependent batching, dtype resolution, model replicas and per-device workers.

What can run on a CPU runs here for real (replicas of the packaged model, spawned device
processes); what needs CUDA is marked ``gpu`` and skipped where there is none.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from embedq.core.config import Settings, SettingsError
from embedq.core.errors import ConfigError
from embedq.model.encoder import Encoder, attention_for, resolve_dtype
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble, resolve_batch_settings
from embedq.worker.packing import (
    CPU_MAX_BATCH_ROWS,
    CPU_MAX_BATCH_TOKENS,
    CUDA_MAX_BATCH_TOKENS,
    batch_limits,
    plan_batches,
)
from embedq.worker.replicas import (
    parse_devices,
    replicas_for,
    run_per_device,
    settings_per_device,
    share_cpu_threads,
)
from tests.conftest import corpus_rows

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- batch limits ---------------------------------------------------------------------------


def test_auto_batch_limits_depend_on_the_device_and_explicit_values_win() -> None:
    assert batch_limits("cpu") == (CPU_MAX_BATCH_TOKENS, CPU_MAX_BATCH_ROWS)
    assert batch_limits("cuda:1")[0] == CUDA_MAX_BATCH_TOKENS
    assert CPU_MAX_BATCH_TOKENS < CUDA_MAX_BATCH_TOKENS
    assert batch_limits("cpu", 1000, 0) == (1000, CPU_MAX_BATCH_ROWS)
    assert batch_limits("cuda", 0, 7)[1] == 7
    resolved = resolve_batch_settings(Settings(device="cpu"))
    assert (resolved.max_batch_tokens, resolved.max_batch_rows) == batch_limits("cpu")
    explicit = Settings(device="cpu", max_batch_tokens=123, max_batch_rows=4)
    assert resolve_batch_settings(explicit) is explicit


def test_unresolved_limits_are_refused_not_run_one_row_at_a_time() -> None:
    with pytest.raises(ValueError, match="batch_limits"):
        plan_batches([5, 6], 0, 10)
    with pytest.raises(SettingsError, match="max_batch_tokens"):
        Settings(max_batch_tokens=-1)
    with pytest.raises(SettingsError, match="replicas"):
        Settings(replicas=-1)


def test_auto_replicas_are_two_on_a_multicore_cpu_and_one_on_cuda() -> None:
    assert Settings().replicas == 0  # auto
    assert replicas_for("cpu", 0, cpu_threads=2) == 2
    assert replicas_for("cpu", 0, cpu_threads=16) == 2
    assert replicas_for("cpu", 0, cpu_threads=1) == 1  # nothing to share
    assert replicas_for("cuda:0", 0, cpu_threads=16) == 1
    assert replicas_for("cpu", 3, cpu_threads=2) == 3  # asked for: given
    assert replicas_for("cuda", 8, cpu_threads=2) == 8


def test_cpu_replicas_share_torchs_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert share_cpu_threads(2) == 2 and torch.get_num_threads() == 2
        torch.set_num_threads(2)
        assert share_cpu_threads(3) == 1  # never zero
    finally:
        torch.set_num_threads(before)


def test_dtype_and_attention_are_decided_per_device() -> None:
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("auto", "cuda:3") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cuda") is torch.bfloat16
    assert attention_for("cpu") == "sdpa"
    assert attention_for("cuda") == "sdpa"


# -- replicas ----------------------------------------------------------------------------


class CountingReplica:
    """A replica that counts the forward passes it ran (and on which threads)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.calls = 0
        self.threads: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)

    def forward(self, batch: Sequence[Sequence[int]]) -> Any:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return self.encoder.forward(batch)


def test_a_worker_with_three_replicas_shares_the_weights_and_writes_the_same_vectors(
    encoder: Encoder,
    settings: Settings,
    redis_client: redis.Redis,
    sink: Sink,
) -> None:
    rows = corpus_rows("long.jsonl", 96)
    for r in rows:
        redis_client.xadd(settings.stream, {"id": r["id"], "text": r["text"]})
    replicas = [encoder.replica(), encoder.replica()]
    assert all(r.model is encoder.model for r in replicas)  # one copy of the weights
    assert all(r.cuda_stream is None for r in replicas)  # CUDA streams only on a GPU
    counted = [CountingReplica(e) for e in (encoder, *replicas)]
    # Small batches, so the three model threads each get several.
    s = settings.replace(max_batch_rows=4, read_count=32)
    worker = assemble(s, Stream(redis_client, s.stream, "g", "c1"), counted, sink)  # type: ignore[arg-type]
    assert worker.run().texts == 96

    assert all(c.calls > 0 for c in counted), [c.calls for c in counted]
    assert len(set().union(*(c.threads for c in counted))) == 3  # one thread per replica
    stored = {r["id"]: r["vector"] for r in sink.get([r["id"] for r in rows])}
    want = encoder.encode([r["text"] for r in rows])
    got = np.stack([stored[r["id"]] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert sink.count() == 96
    assert redis_client.xpending(s.stream, "g")["pending"] == 0


def test_even_and_padded_batches_give_each_text_its_own_vector(encoder: Encoder) -> None:
    # An unpadded batch runs without an attention mask; a padded one with it. Both must
    # give every text the vector it gets alone.
    even = [[101, 7592, 2088, 102], [101, 2088, 7592, 102]]
    padded = [*even, [101, 7592, 102]]
    alone = np.stack([encoder.forward([ids]).vectors[0] for ids in padded])
    np.testing.assert_allclose(encoder.forward(even).vectors, alone[:2], atol=1e-5)
    np.testing.assert_allclose(encoder.forward(padded).vectors, alone, atol=1e-5)
    assert encoder.forward(padded).padded_tokens == 12


def test_cpu_tensors_are_not_pinned(encoder: Encoder) -> None:
    # Pinning needs a CUDA driver; on a CPU the batch goes straight to the model.
    tensor = torch.zeros(2, 3, dtype=torch.int64)
    assert encoder._to_device(tensor) is tensor


# -- one process per device --------------------------------------------------------------


def test_parse_devices() -> None:
    assert parse_devices("") == []
    assert parse_devices("0,1", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1", cuda_count=2) == ["cuda:1"]
    assert parse_devices("all", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cpu,cpu", cuda_count=0) == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="no CUDA device"):
        parse_devices("all", cuda_count=0)
    with pytest.raises(ConfigError, match="not visible"):
        parse_devices("0,2", cuda_count=2)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_devices("0,cuda:0", cuda_count=2)
    with pytest.raises(ConfigError, match="not a GPU index"):
        parse_devices("gpu0", cuda_count=2)


def test_each_device_gets_its_own_stable_consumer_name() -> None:
    base = Settings(consumer="pod-7", devices="0,1")
    per = settings_per_device(base, ["cuda:0", "cuda:1"])
    assert [(s.device, s.consumer, s.devices) for s in per] == [
        ("cuda:0", "pod-7-cuda0", ""),
        ("cuda:1", "pod-7-cuda1", ""),
    ]
    assert [s.consumer for s in settings_per_device(base, ["cpu", "cpu"])] == [
        "pod-7-cpu0",
        "pod-7-cpu1",
    ]


# Targets for spawned children: they must be importable, hence module level.
def _write_device(settings: Settings) -> int:
    Path(settings.milvus_uri).write_text(settings.device)
    return 0


def _fail_first_wait_for_sigterm(settings: Settings) -> int:
    if settings.consumer.endswith("cpu0"):
        return 3
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait(60)
    Path(settings.milvus_uri).write_text("stopped by SIGTERM" if stopped.is_set() else "no")
    return 0


def test_one_process_per_device_runs_each_device(tmp_path: Path) -> None:
    per = [
        Settings(consumer=f"w-{i}", device="cpu", milvus_uri=str(tmp_path / f"{i}.txt"))
        for i in range(2)
    ]
    assert run_per_device(per, _write_device, poll_s=0.05) == 0
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(2)] == ["cpu", "cpu"]


def test_a_failed_device_worker_stops_the_others_and_fails_the_node(tmp_path: Path) -> None:
    per = settings_per_device(Settings(consumer="n"), ["cpu", "cpu"])
    per = [s.replace(milvus_uri=str(tmp_path / f"{i}.txt")) for i, s in enumerate(per)]
    assert run_per_device(per, _fail_first_wait_for_sigterm, poll_s=0.05, grace_s=30) == 3
    assert (tmp_path / "1.txt").read_text() == "stopped by SIGTERM"


def test_worker_refuses_a_device_that_is_not_there() -> None:
    from click.testing import CliRunner

    from embedq.cli import main

    result = CliRunner().invoke(main, ["worker", "--devices", "7", "--log-level", "error"])
    assert result.exit_code == 2
    assert "cuda:7 is not visible" in result.output


# -- real CUDA -----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_fp16_on_cuda_matches_fp32_on_real_text(encoder: Encoder) -> None:
    texts = [r["text"] for r in corpus_rows("long.jsonl", 64)]
    gpu = Encoder(device="cuda", dtype="auto")
    assert gpu.dtype is torch.float16
    want = encoder.encode(texts)
    got = gpu.encode(texts)
    cosine = (want * got).sum(axis=1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.min() >= 0.999


@pytest.mark.gpu
@needs_cuda
def test_cuda_replicas_run_on_their_own_streams(encoder: Encoder) -> None:
    texts = [r["text"] for r in corpus_rows("short.jsonl", 64)]
    first = Encoder("", "cuda", "fp16")
    replicas = [first, *(first.replica() for _ in range(3))]
    assert len({id(e.cuda_stream) for e in replicas}) == 4
    ids = [t.ids for t in first.tokenize(texts)]
    batches = [ids[i : i + 8] for i in range(0, len(ids), 8)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # as the worker's model threads do
        futures = [pool.submit(replicas[i % 4].forward, b) for i, b in enumerate(batches)]
        got = np.concatenate([f.result(timeout=60).vectors for f in futures])
    want = encoder.encode(texts)
    assert ((got * want).sum(axis=1)).min() >= 0.999  # both normalized
