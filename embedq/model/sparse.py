"""Sparse output heads: SPLADE (a ``SparseEncoder``) and BGE-M3's lexical weights.

Both run on the output of the encoder's one forward pass (``Encoder.forward`` calls
``SparseHead.sparse`` on it), so BGE-M3's dense vector and its lexical weights come from
the same pass, as in FlagEmbedding's ``BGEM3FlagModel``:

* SPLADE, as sentence-transformers' ``SpladePooling``: ``log1p(relu(logits))`` (twice
  ``log1p`` for ``log1p_relu``) over the MLM logits of the real tokens, max or summed per
  vocabulary entry. For ``max`` the order is turned round (max first, then relu and log1p):
  both are monotonic, so the values are the same, and the transform runs on one row per
  text instead of one per token.
* BGE-M3, as FlagEmbedding's ``_sparse_embedding`` / ``_process_token_weights``:
  ``relu(sparse_linear(hidden))`` per token, the largest weight per token id, the CLS, EOS,
  PAD and UNK tokens dropped, zeros left out.

A sparse vector is ``{token id: weight}``, what Milvus takes for a ``SPARSE_FLOAT_VECTOR``;
an empty one is stored as ``EMPTY`` (Milvus refuses empty sparse vectors).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from embedq.core.errors import ConfigError, EncodeFailed
from embedq.model.model_spec import ModelSpec

SparseVector = dict[int, float]

# Milvus refuses an empty sparse vector, and a text can have one (BGE-M3 weighs "a" at 0).
# It is stored as the smallest float32 on token 0 instead: that adds at most 1e-38 times
# a query's weight to a score, nothing measurable, and the row keeps its dense vector.
EMPTY: SparseVector = {0: float(np.finfo(np.float32).tiny)}


def model_class(spec: ModelSpec) -> Any:
    """The transformers class to load: SPLADE needs the MLM head's logits."""
    from transformers import AutoModel, AutoModelForMaskedLM

    return AutoModelForMaskedLM if spec.splade is not None else AutoModel


def load_head(spec: ModelSpec, model_dir: Path, tokenizer: Any, model: Any) -> SparseHead | None:
    """The sparse head ``spec`` names, on the model's device; None for a dense-only model."""
    if spec.splade is None and not spec.bge_m3:
        return None
    return SparseHead(spec, model_dir, tokenizer, model)


class SparseHead:
    """Sparse vectors from one forward pass's output."""

    def __init__(self, spec: ModelSpec, model_dir: Path, tokenizer: Any, model: Any) -> None:
        import torch

        self.spec = spec
        self.vocab_size = int(model.config.vocab_size)
        # SPLADE models give no dense vector; BGE-M3 gives both.
        self.dense = spec.splade is None
        self._linear: Any = None
        if spec.bge_m3:
            state = torch.load(
                model_dir / "sparse_linear.pt", map_location="cpu", weights_only=True
            )
            hidden = int(model.config.hidden_size)
            self._linear = torch.nn.Linear(hidden, 1)
            try:
                self._linear.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(
                    f"{model_dir}/sparse_linear.pt does not fit the model: {exc}"
                ) from None
            self._linear = self._linear.to(next(model.parameters()).device).eval()
        special = (
            tokenizer.cls_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            tokenizer.unk_token_id,
        )
        self.unused = sorted({int(t) for t in special if t is not None})

    @property
    def kind(self) -> str:
        return "splade" if self.spec.splade is not None else "bge-m3"

    def sparse(self, output: Any, input_ids: Any, mask: Any) -> list[SparseVector]:
        """One sparse vector per row of the batch (``mask``: 1 for real tokens)."""
        if self.spec.splade is not None:
            rows = _to_dicts(self._splade(output, mask))
        else:
            rows = _to_dicts(self._lexical(output, input_ids, mask))
        return rows

    def _splade(self, output: Any, mask: Any) -> Any:
        import torch

        assert self.spec.splade is not None
        logits = output.logits.float()
        real = mask.unsqueeze(-1).bool()
        if self.spec.splade.strategy == "max":
            # As SpladePooling multiplies padded positions' logits by 0 before relu, padding
            # counts as 0 here: it never wins a max of non-negative values.
            pooled = logits.masked_fill(~real, 0.0).amax(dim=1).relu().log1p()
            return pooled.log1p() if self.spec.splade.activation == "log1p_relu" else pooled
        transformed = logits.masked_fill(~real, 0.0).relu().log1p()
        if self.spec.splade.activation == "log1p_relu":
            transformed = transformed.log1p()
        return torch.sum(transformed, dim=1)

    def _lexical(self, output: Any, input_ids: Any, mask: Any) -> Any:
        import torch

        hidden = output.last_hidden_state.float()
        weights = torch.relu(self._linear(hidden)).squeeze(-1)  # one weight per token
        keep = mask.bool()
        for token in self.unused:
            keep &= input_ids != token
        weights = weights.masked_fill(~keep, 0.0)
        pooled = torch.zeros(
            input_ids.shape[0], self.vocab_size, dtype=weights.dtype, device=weights.device
        )
        return pooled.scatter_reduce(1, input_ids, weights, reduce="amax")


def _to_dicts(pooled: Any) -> list[SparseVector]:
    """Rows of a (batch, vocab) tensor as ``{index: value}`` of their non-zero entries; only
    those leave the device."""
    rows, cols = pooled.nonzero(as_tuple=True)
    values = pooled[rows, cols].float().cpu().numpy()
    rows_np, cols_np = rows.cpu().numpy(), cols.cpu().numpy()
    if not np.isfinite(values).all():
        raise EncodeFailed("model produced non-finite sparse weights")
    bounds = np.searchsorted(rows_np, np.arange(pooled.shape[0] + 1))  # nonzero is row-major
    return [
        dict(zip(cols_np[a:b].tolist(), values[a:b].tolist(), strict=True))
        for a, b in itertools.pairwise(bounds)
    ]
