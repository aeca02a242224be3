"""--dimensions N: Matryoshka truncation equal to sentence-transformers' truncate_dim, refused
for a model that does not declare Matryoshka training unless forced."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import redis

from embedq.core.config import Settings, SettingsError
from embedq.core.errors import ConfigError, ModelMismatch
from embedq.model.encoder import Encoder, encoder_for, packaged_model_dir
from embedq.model.matryoshka import declared
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble

from .test_cli import embedq

TEXTS = ["how do I trim a stream", "Milvus upserts by primary key", "x " * 300]


def _card(model_dir: Path, front_matter: str) -> Path:
    (model_dir / "README.md").write_text(f"---\n{front_matter}\n---\n\n# a model\n")
    return model_dir


def test_truncated_vectors_equal_sentence_transformers_truncate_dim() -> None:
    from sentence_transformers import SentenceTransformer

    model = packaged_model_dir()
    assert model is not None
    encoder = Encoder(str(model), device="cpu", dimensions=128, force_dimensions=True)
    assert encoder.width == 128
    got = encoder.encode(TEXTS)
    want = SentenceTransformer(str(model), device="cpu", truncate_dim=128).encode(
        TEXTS, normalize_embeddings=True
    )
    assert got.shape == want.shape == (3, 128)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0)


def test_rows_are_written_with_n_dimensions(
    settings: Settings, redis_client: redis.Redis, encoder: Encoder
) -> None:
    from sentence_transformers import SentenceTransformer

    settings = settings.replace(dimensions=128, force_dimensions=True)
    cut = encoder_for(settings.replace(device="cpu"))
    Producer(redis_client, settings.stream, group="g").enqueue(
        [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    )
    sink = open_sink(settings)
    try:
        stats = assemble(
            settings, Stream(redis_client, settings.stream, "g", "c1"), cut, sink
        ).run()
        assert stats.texts == 3
        info = sink.client.describe_collection(settings.collection)
        vector = next(f for f in info["fields"] if f["name"] == "vector")
        assert int(vector["params"]["dim"]) == 128
        assert (
            info["properties"]["embedq.fingerprint"]
            == model_fingerprint(cut)
            != model_fingerprint(encoder)
        )
        stored = {r["id"]: r["vector"] for r in sink.get(["t0", "t1", "t2"])}
        reference = SentenceTransformer(str(cut.model_dir), device="cpu", truncate_dim=128)
        want = reference.encode(TEXTS, normalize_embeddings=True)
        for i in range(3):
            np.testing.assert_allclose(stored[f"t{i}"], want[i], rtol=1e-5, atol=1e-6)
        # The full-width model must not write into the 128-d collection: its fingerprint
        # differs, and so does its dimension.
        with pytest.raises(ModelMismatch, match="fingerprint"):
            sink.ensure_collection(
                encoder.width, encoder.name, fingerprint=model_fingerprint(encoder)
            )
        with pytest.raises(ConfigError, match="128-dimensional"):
            sink.ensure_collection(encoder.width, encoder.name)
    finally:
        sink.close()


def test_a_model_without_matryoshka_training_is_refused_unless_forced(tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not declare Matryoshka training.*--force"):
        Encoder(str(tiny_model), device="cpu", dimensions=16)
    forced = Encoder(str(tiny_model), device="cpu", dimensions=16, force_dimensions=True)
    assert forced.width == 16


@pytest.mark.parametrize(
    "front_matter",
    [
        "tags:\n- sentence-transformers\n- loss:MatryoshkaLoss",
        "tags: [sentence-transformers, matryoshka]",
        "library_name: sentence-transformers\ntags:\n  - 'loss:Matryoshka2dLoss'",
    ],
)
def test_a_model_card_that_declares_matryoshka_is_accepted(
    tiny_model: Path, tmp_path: Path, front_matter: str
) -> None:
    model = _card(Path(shutil.copytree(tiny_model, tmp_path / "m")), front_matter)
    assert declared(model)
    assert Encoder(str(model), device="cpu", dimensions=16).width == 16


def test_matryoshka_only_in_the_text_is_not_a_declaration(tiny_model: Path, tmp_path: Path) -> None:
    model = _card(Path(shutil.copytree(tiny_model, tmp_path / "m")), "tags:\n- bert")
    (model / "README.md").write_text(
        (model / "README.md").read_text() + "We did not train with matryoshka.\n"
    )
    assert not declared(model)


def test_bad_dimensions(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dimensions 33: the model makes 32-dimensional"):
        Encoder(str(tiny_model), device="cpu", dimensions=33, force_dimensions=True)
    with pytest.raises(SettingsError, match="dimensions must be >= 0"):
        Settings(dimensions=-1)
    # The full width is no truncation at all: the same vectors, the same fingerprint.
    same = Encoder(str(tiny_model), device="cpu", dimensions=32)
    assert same.width == 32 and same.truncate_dim == 0
    assert model_fingerprint(same) == model_fingerprint(Encoder(str(tiny_model), device="cpu"))


def test_sparse_only_model_cannot_be_truncated(tmp_path: Path) -> None:
    from .support.sparse_models import build_splade

    model = build_splade(tmp_path / "splade")
    with pytest.raises(ConfigError, match="sparse vectors only"):
        Encoder(str(model), device="cpu", dimensions=8, force_dimensions=True)


def test_worker_cli_refuses_dimensions_for_an_undeclared_model(settings: Settings) -> None:
    result = embedq(
        "worker",
        "--dimensions",
        "128",
        "--drain",
        "--milvus-uri",
        settings.milvus_uri,
        "--stream",
        settings.stream,
        "--connect-timeout",
        "1",
    )
    assert result.returncode == 2, result.stderr
    assert "does not declare Matryoshka training" in result.stderr
    assert "--force-dimensions" in result.stderr and "Traceback" not in result.stderr
    bad = embedq("worker", "--dimensions", "-3")
    assert bad.returncode == 2 and "--dimensions" in bad.stderr
