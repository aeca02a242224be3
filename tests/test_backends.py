"""``--backend onnx|openvino`` / ``--quantize int8`` (issue 29): the forward pass on ONNX
Runtime or OpenVINO, checked against fp32 torch by the accuracy gate at load."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import redis
from onnx import numpy_helper

from embedq.core.config import Settings, SettingsError
from embedq.core.errors import ConfigError
from embedq.model import onnx_backend, openvino_backend
from embedq.model.accuracy_gate import THRESHOLDS, AccuracyGateFailed, cosines
from embedq.model.encoder import Encoder
from embedq.model.fingerprint import fingerprint
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble

from .support.tiny_models import FULL_VOCAB, tiny_bert

ROOT = Path(__file__).resolve().parent.parent

# Not the gate's probes: the test must not grade the gate with its own questions.
HOSTILE = [
    "",
    " ",
    "\u0000\u0000\u0000",
    "\ufeff\ufeffBOM twice",
    "ﷺ ﷽ 𒀱 Z̷̢͈̓a̸͍͒l̵̰̈g̶̱̐ǒ̴̙",
    "' OR '1'='1' /* */ UNION SELECT password FROM accounts",
    "%s%s%s%n %x{0}${jndi:ldap://x}",
    "\r\n\r\n\t\t\t\v\f",
    "🙂" * 300,
    "x" * 5000,
    "日本語とEnglishとрусский混在テキスト",
]


def real_texts(n: int = 48) -> list[str]:
    lines = (ROOT / "examples" / "sample.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def onnx_encoders(encoder: Encoder, model_cache: Path) -> dict[str, Encoder]:
    """The packaged model on ONNX fp32 and int8 (each export once, through the gate)."""
    return {
        q: Encoder(device="cpu", backend="onnx", quantize=q, model_cache=str(model_cache))
        for q in ("none", "int8")
    }


@pytest.fixture(scope="module")
def openvino_encoders(encoder: Encoder, model_cache: Path) -> dict[str, Encoder]:
    """The packaged model on OpenVINO fp32 and int8 (read from the ONNX export, through the
    gate)."""
    return {
        q: Encoder(device="cpu", backend="openvino", quantize=q, model_cache=str(model_cache))
        for q in ("none", "int8")
    }


@pytest.fixture(params=["onnx", "openvino"])
def exported_encoders(
    request: pytest.FixtureRequest, onnx_encoders: dict[str, Encoder], model_cache: Path
) -> dict[str, Encoder]:
    if request.param == "onnx":
        return onnx_encoders
    found: dict[str, Encoder] = request.getfixturevalue("openvino_encoders")
    return found


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_exported_vectors_match_fp32_torch_on_real_and_hostile_text(
    encoder: Encoder, exported_encoders: dict[str, Encoder], quantize: str
) -> None:
    texts = real_texts() + HOSTILE
    reference = encoder.encode(texts)
    candidate = exported_encoders[quantize]
    # The same token-budget path as the worker: tokenize once, forward per batch.
    tokens = [t.ids for t in candidate.tokenize(texts)]
    got = np.concatenate(
        [candidate.forward(tokens[i : i + 16]).vectors for i in range(0, len(tokens), 16)]
    )
    found = cosines(reference, got)
    assert found.min() >= THRESHOLDS[quantize], (found.min(), int(np.argmin(found)))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in fp32
    assert candidate.gate_cosine is not None and candidate.gate_cosine >= THRESHOLDS[quantize]


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backends_keep_matryoshka_truncation(
    encoder: Encoder, model_cache: Path, backend: str
) -> None:
    cut = Encoder(
        device="cpu",
        backend=backend,
        model_cache=str(model_cache),
        dimensions=128,
        force_dimensions=True,
    )
    texts = real_texts(8)
    got = cut.encode(texts)
    assert got.shape == (8, 128)
    want = encoder.encode(texts)[:, :128]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert cosines(want, got).min() >= 0.9999


def test_fingerprints_differ_across_backends(
    encoder: Encoder, onnx_encoders: dict[str, Encoder], openvino_encoders: dict[str, Encoder]
) -> None:
    prints = {
        model_fingerprint(encoder),
        model_fingerprint(onnx_encoders["none"]),
        model_fingerprint(onnx_encoders["int8"]),
        model_fingerprint(openvino_encoders["none"]),
        model_fingerprint(openvino_encoders["int8"]),
    }
    assert len(prints) == 5
    # fp32 torch keeps the fingerprint collections recorded before backends existed.
    assert model_fingerprint(encoder) == fingerprint(encoder.model_dir, encoder.spec, 0)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_worker_on_each_backend_drains_into_milvus_lite(
    settings: Settings,
    redis_client: redis.Redis,
    encoder: Encoder,
    exported_encoders: dict[str, Encoder],
    quantize: str,
) -> None:
    candidate = exported_encoders[quantize]
    texts = real_texts(24)
    Producer(redis_client, settings.stream, group="g").enqueue(
        [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    )
    sink = open_sink(settings)
    try:
        stats = assemble(
            settings, Stream(redis_client, settings.stream, "g", "c1"), candidate, sink
        ).run()
        assert stats.texts == len(texts)
        info = sink.client.describe_collection(settings.collection)
        assert info["properties"]["embedq.fingerprint"] == model_fingerprint(candidate)
        stored = {r["id"]: r["vector"] for r in sink.get([f"t{i}" for i in range(len(texts))])}
        assert len(stored) == len(texts)
        got = np.array([stored[f"t{i}"] for i in range(len(texts))], dtype=np.float32)
        assert cosines(encoder.encode(texts), got).min() >= THRESHOLDS[quantize]
        assert redis_client.xpending(settings.stream, "g")["pending"] == 0
    finally:
        sink.close()


# -- the gate and the cache, on the tiny model ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's tiny BERT, but with an embedding row for every token of the tokenizer:
    the gate's probes (emoji, CJK, Arabic) reach ids past the shared tiny model's rows."""
    target = tmp_path_factory.mktemp("tiny-bert-full-vocab")
    return tiny_bert(target, vocab_size=FULL_VOCAB, max_positions=512)


@pytest.fixture
def tiny_export(tiny_model: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(cache folder, exported model.onnx) of the tiny model, fp32."""
    cache = tmp_path / "cache"
    Encoder(str(tiny_model), device="cpu", backend="onnx", model_cache=str(cache))
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    yield cache, entry / "model.onnx"


def test_the_gate_refuses_a_perturbed_export(
    tiny_model: Path, tiny_export: tuple[Path, Path]
) -> None:
    cache, path = tiny_export
    graph = onnx.load(str(path))
    # Scramble the largest weight matrix: a plausible broken export (right shapes, wrong values).
    biggest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(biggest)
    scrambled = np.random.default_rng(0).permutation(weights.reshape(-1)).reshape(weights.shape)
    biggest.CopyFrom(numpy_helper.from_array(scrambled.astype(weights.dtype), biggest.name))
    onnx.save(graph, str(path))
    with pytest.raises(
        AccuracyGateFailed, match=r"below cosine 0\.9999 on \d+ of \d+ probes"
    ) as err:
        Encoder(str(tiny_model), device="cpu", backend="onnx", model_cache=str(cache))
    assert "\n" not in str(err.value) and "lowest" in str(err.value)
    assert isinstance(err.value, ConfigError)  # exit code 2 (CONFIG)


def test_a_corrupt_export_is_one_clear_line(
    tiny_model: Path, tiny_export: tuple[Path, Path]
) -> None:
    cache, path = tiny_export
    path.write_bytes(path.read_bytes()[:1000])  # a half-written file
    with pytest.raises(ConfigError, match="cannot load the ONNX model") as err:
        Encoder(str(tiny_model), device="cpu", backend="onnx", model_cache=str(cache))
    assert "\n" not in str(err.value) and "export it again" in str(err.value)


def test_an_export_is_reused_and_a_lost_race_drops_its_copy(
    tiny_model: Path, tiny_export: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, path = tiny_export
    calls: list[Any] = []
    monkeypatch.setattr(onnx_backend, "_export", lambda *a, **k: calls.append(a))
    Encoder(str(tiny_model), device="cpu", backend="onnx", model_cache=str(cache))
    assert calls == []  # the cached export is reused, not redone
    # Another process finishes the same entry while this one exports: this one's rename
    # fails and it uses the winner's file, leaving no temporary folder behind.
    other = cache / "other-entry"

    def racing_export(model: Any, out: Path, **kwargs: Any) -> None:
        (out / "model.onnx").write_bytes(b"loser")
        other.mkdir()
        (other / "model.onnx").write_bytes(b"winner")

    monkeypatch.setattr(onnx_backend, "_export", racing_export)
    got = onnx_backend.exported(None, tiny_model, other, quantize="none", token_types=True)
    assert got.read_bytes() == b"winner"
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.parent.name, "other-entry"])


def test_a_model_that_cannot_be_exported_is_one_clear_line(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Unsupported: ONNX export of operator foo\nlong trace")

    monkeypatch.setattr(onnx_backend, "_export", failing)
    with pytest.raises(
        ConfigError, match=r"cannot export .* to ONNX: RuntimeError: Unsupported"
    ) as err:
        Encoder(str(tiny_model), device="cpu", backend="onnx", model_cache=str(tmp_path))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no half export left behind


def test_unsupported_combinations_are_refused() -> None:
    with pytest.raises(SettingsError, match="quantize int8 needs backend onnx or openvino"):
        Settings(quantize="int8")
    with pytest.raises(SettingsError, match="backend must be torch, onnx or openvino"):
        Settings(backend="tensorrt")
    for backend in ("onnx", "openvino"):
        with pytest.raises(ConfigError, match=f"--backend {backend} runs on the CPU"):
            onnx_backend.check_choice(backend, "none", "cuda:0", splade=False)
        with pytest.raises(ConfigError, match=f"--backend {backend} does not serve SPLADE"):
            onnx_backend.check_choice(backend, "none", "cpu", splade=True)


def test_openvino_int8_without_nncf_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a)
    )
    openvino_backend.check_available("none")  # fp32 needs only OpenVINO
    with pytest.raises(ConfigError, match=r"needs NNCF .* pip install 'embedq\[openvino\]'") as err:
        openvino_backend.check_available("int8")
    assert "\n" not in str(err.value)


def test_the_gate_refuses_a_perturbed_openvino_model(tiny_model: Path, tmp_path: Path) -> None:
    """The gate judges what OpenVINO serves: a converted model whose weights were scrambled
    after conversion is refused, with the figures."""
    import openvino

    cache = tmp_path / "cache"
    Encoder(str(tiny_model), device="cpu", backend="openvino", model_cache=str(cache))
    (xml,) = cache.glob("*openvino*/model.xml")
    model = openvino.Core().read_model(str(xml))
    biggest = max(
        (op for op in model.get_ops() if op.get_type_name() == "Constant"),
        key=lambda op: int(np.prod(op.get_output_shape(0))),
    )
    weights = biggest.get_data()
    scrambled = np.random.default_rng(0).permutation(weights.reshape(-1)).reshape(weights.shape)
    biggest.output(0).replace(openvino.op.Constant(scrambled.astype(weights.dtype)).output(0))
    # Saved beside and renamed over: OpenVINO maps model.bin, and writing into the mapped
    # file in place would pull it from under the reader (SIGBUS).
    scratch = tmp_path / "scrambled"
    openvino.save_model(model, str(scratch / "model.xml"), compress_to_fp16=False)
    for name in ("model.xml", "model.bin"):
        (scratch / name).replace(xml.parent / name)
    with pytest.raises(AccuracyGateFailed, match=r"--backend openvino .* below cosine 0\.9999"):
        Encoder(str(tiny_model), device="cpu", backend="openvino", model_cache=str(cache))


def test_backend_settings_come_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from embedq.cli import main

    monkeypatch.setenv("EMBEDQ_BACKEND", "torch")
    monkeypatch.setenv("EMBEDQ_QUANTIZE", "int8")
    result = CliRunner().invoke(main, ["worker", "--drain", "--milvus-uri", "/nonexistent/x.db"])
    assert result.exit_code == 2, result.output
    assert "needs backend onnx" in result.output
    assert "Traceback" not in result.output


# -- embedq bench's CPU-backend variants ----------------------------------------------------


def test_bench_reports_each_backend_against_both_sentence_transformers_baselines() -> None:
    from embedq.bench.report import ratios
    from embedq.bench.variants import RunResult

    speeds = {"st": 10.0, "st-onnx-int8": 20.0, "onnx-int8": 30.0, "embedq": 15.0}
    results = [
        RunResult(variant, 100, 1000, 100 / (rate * run), 0.0, run=run)
        for run in (1, 2, 3)
        for variant, rate in speeds.items()
    ]
    found = ratios(results)
    assert found["onnx-int8/b"] == pytest.approx(3.0)
    assert found["onnx-int8/st-onnx-int8"] == pytest.approx(1.5)
    assert found["d/b"] == pytest.approx(1.5)
    assert "openvino/b" not in found  # not run, not reported


def test_the_sentence_transformers_onnx_variant_needs_its_interpreter() -> None:
    from embedq.bench.variants import BenchRun, run_st_onnx

    with pytest.raises(ConfigError, match="st-onnx-int8 needs --st-python") as err:
        run_st_onnx(BenchRun("st-onnx-int8", [{"id": "1", "text": "x"}], Settings(), 1))
    assert "\n" not in str(err.value)
