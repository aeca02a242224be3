"""Device-dependent batching, dtype resolution, model replicas and per-device workers.

What can run on a CPU runs here for real (replicas of the packaged model, spawned device
processes); what needs CUDA is marked ``gpu`` and skipped where there is none.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from embedq.batching import (
    CPU_MAX_BATCH_ROWS,
    CPU_MAX_BATCH_TOKENS,
    CUDA_MAX_BATCH_TOKENS,
    batch_limits,
    plan_batches,
    resolve_batch_settings,
)
from embedq.config import Settings, SettingsError
from embedq.encoder import Encoder, attention_for, resolve_dtype
from embedq.errors import ConfigError
from embedq.replicas import ReplicaPool, parse_devices, run_per_device, settings_per_device
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
        Settings(replicas=0)


def test_dtype_and_attention_are_decided_per_device() -> None:
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("auto", "cuda:3") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cuda") is torch.bfloat16
    assert attention_for("cpu") == "sdpa"
    assert attention_for("cuda") == "sdpa"


# -- replicas ----------------------------------------------------------------------------


def test_replicas_share_weights_and_match_a_single_encoder(encoder: Encoder) -> None:
    texts = [r["text"] for r in corpus_rows("long.jsonl", 24)]
    ids = [t.ids for t in encoder.tokenize(texts)]
    batches = [ids[i : i + 6] for i in range(0, len(ids), 6)]
    expected = [encoder.forward(b).vectors for b in batches]

    pool = ReplicaPool([encoder, encoder.replica(), encoder.replica()])
    try:
        assert pool.size == 3
        twin = pool.encoders[1]
        assert twin.model is encoder.model  # one copy of the weights
        assert twin.cuda_stream is None  # no CUDA streams on a CPU
        futures = [pool.submit(b) for b in batches]  # run concurrently on three threads
        for future, want in zip(futures, expected, strict=True):
            got = future.result(timeout=120)
            np.testing.assert_allclose(got.vectors, want, atol=1e-5)
    finally:
        pool.close()


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
    pool = ReplicaPool.load("", "cuda", "fp16", replicas=4)
    try:
        streams = {id(e.cuda_stream) for e in pool.encoders}
        assert len(streams) == 4
        ids = [t.ids for t in pool.encoder.tokenize(texts)]
        futures = [pool.submit(ids[i : i + 8]) for i in range(0, len(ids), 8)]
        got = np.concatenate([f.result(timeout=60).vectors for f in futures])
        want = encoder.encode(texts)
        assert ((got * want).sum(axis=1)).min() >= 0.999  # both normalized
    finally:
        pool.close()
