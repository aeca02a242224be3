"""The encoder follows each model's sentence-transformers config: pooling mode, dense
layers, normalization, max_seq_length, lower-casing, and plain HF layouts.

Small BERT models are built from a config (random weights) with the packaged tokenizer and
saved with sentence-transformers itself; sentence-transformers' ``encode`` is the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedq.core.errors import ConfigError
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.model.model_spec import ModelSpec

from .conftest import corpus_rows
from .support.tiny_models import FULL_VOCAB, tiny_bert

TEXTS = [r["text"] for r in corpus_rows("long.jsonl", 24)] + ["short", "Ünïcödé tëxt 🙂"]
# Every token id of the texts has a row, and long texts fit (truncated at 128).
BERT: dict[str, int] = {"vocab_size": FULL_VOCAB, "layers": 2, "heads": 4, "max_positions": 128}


def st_model(
    tmp_path: Path, pooling: str, dense: bool, normalize: bool, max_seq_length: int = 64
) -> Path:
    from sentence_transformers import SentenceTransformer, models

    base = tiny_bert(tmp_path / "hf", **BERT)
    transformer = models.Transformer(str(base), max_seq_length=max_seq_length)
    modes = pooling.split("+")
    pool = models.Pooling(32, pooling_mode=modes[0] if len(modes) == 1 else modes)
    modules: list[torch.nn.Module] = [transformer, pool]
    if dense:
        modules.append(
            models.Dense(32 * len(pooling.split("+")), 16, activation_function=torch.nn.Tanh())
        )
    if normalize:
        modules.append(models.Normalize())
    out = tmp_path / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    ("pooling", "dense", "normalize"),
    [
        ("cls", True, True),
        ("max", False, False),
        ("mean_sqrt_len_tokens", False, True),
        ("lasttoken", False, False),
        ("weightedmean", False, True),
        ("cls+mean", True, True),
        ("mean", True, False),
    ],
)
def test_sentence_transformers_configs_are_followed(
    tmp_path: Path, pooling: str, dense: bool, normalize: bool
) -> None:
    from sentence_transformers import SentenceTransformer

    model_dir = st_model(tmp_path, pooling, dense, normalize)
    ours = Encoder(str(model_dir), device="cpu")
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    assert ours.width == reference.shape[1] == (16 if dense else 32 * len(pooling.split("+")))
    assert ours.max_seq_length == 64
    vectors = ours.encode(TEXTS)
    assert np.allclose(vectors, reference, atol=1e-4), np.abs(vectors - reference).max()
    if normalize:
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_legacy_boolean_pooling_config_is_read(tmp_path: Path) -> None:
    from embedq.model.model_spec import _pooling_modes

    legacy = {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
    }
    assert _pooling_modes(legacy, tmp_path) == ("cls", "mean")
    assert ModelSpec.load(packaged_model_dir()) == ModelSpec(  # the packaged model's config
        pooling=("mean",), normalize=True, max_seq_length=256
    )
    with pytest.raises(ConfigError, match="not supported"):
        _pooling_modes({"pooling_mode": "attention"}, tmp_path)


def test_plain_transformers_directory_is_mean_pooled_like_sentence_transformers(
    tmp_path: Path,
) -> None:
    from sentence_transformers import SentenceTransformer

    model_dir = tiny_bert(tmp_path / "hf", **BERT)
    assert ModelSpec.load(model_dir) == ModelSpec(pooling=("mean",), normalize=False)
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    assert (
        cosine_rows(Encoder(str(model_dir), device="cpu").encode(TEXTS), reference).min() > 0.9999
    )


def test_overlong_texts_are_truncated_and_flagged(encoder: Encoder) -> None:
    long_text = " ".join(["tokens"] * 600)
    tokenized = encoder.tokenize([long_text, "short text"])
    assert tokenized[0].truncated and len(tokenized[0].ids) == encoder.max_seq_length == 256
    assert not tokenized[1].truncated
    assert tokenized[0].ids[-1] == encoder.tokenizer.sep_token_id


def test_unsupported_module_and_missing_directory_are_config_errors(tmp_path: Path) -> None:
    model_dir = tiny_bert(tmp_path / "m", **BERT)
    (model_dir / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CNN"}]'
    )
    with pytest.raises(ConfigError, match=r"models\.CNN is not supported"):
        Encoder(str(model_dir), device="cpu")
    with pytest.raises(ConfigError, match="--model"):
        Encoder(str(tmp_path / "missing"), device="cpu")
    if not torch.cuda.is_available():  # on a GPU machine --device cuda is valid
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Encoder("", device="cuda")
