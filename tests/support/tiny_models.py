"""Tiny real BERT models built from a config, for tests that need a model in milliseconds.

One builder (issue 24: the suite had four copies of it): random weights from ``seed``, the
packaged all-MiniLM-L6-v2 tokenizer's files copied beside them. The defaults are the
suite's shared tiny model (``tests/conftest.py``'s ``tiny_model``): an embedding table of
``EMBEDDING_ROWS`` rows while the tokenizer knows 30522 tokens, so torch raises in the
forward pass of any batch holding a token id of 30000 or more (tests/test_dead_letters.py)
and a model failure on one text is real, not faked.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from embedq.model.encoder import packaged_model_dir

EMBEDDING_ROWS = 30000
MAX_POSITIONS = 64
FULL_VOCAB = 30522  # the packaged tokenizer's size: every token id has an embedding row
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def bert_config(
    *,
    vocab_size: int = EMBEDDING_ROWS,
    layers: int = 1,
    heads: int = 2,
    max_positions: int = MAX_POSITIONS,
) -> Any:
    """A BERT config 32 wide (intermediate 64): small enough that a forward pass is noise."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )


def copy_tokenizer(target: Path) -> None:
    """The packaged model's tokenizer files into ``target``."""
    source = packaged_model_dir()
    assert source is not None, "the packaged model provides the tokenizer files"
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def tiny_bert(
    target: Path,
    *,
    vocab_size: int = EMBEDDING_ROWS,
    seed: int = 0,
    layers: int = 1,
    heads: int = 2,
    max_positions: int = MAX_POSITIONS,
) -> Path:
    """A plain ``BertModel`` (mean-pooled by the encoder) saved in ``target`` with the
    packaged tokenizer; the same arguments give the same weights, another ``seed`` another
    model of the same shape (a fine-tuned twin that neither name nor size tells apart)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    config = bert_config(
        vocab_size=vocab_size, layers=layers, heads=heads, max_positions=max_positions
    )
    target.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(target)
    copy_tokenizer(target)
    return target
