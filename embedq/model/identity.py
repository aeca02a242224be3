"""A model's identity: its name (``embedq.model.encoder.model_name``, the one derivation) and
its fingerprint (``embedq.model.fingerprint``). Workers stamp every online answer with theirs
(``embedq.queue.online_wire``); the gateway accepts only answers whose identity is its
configured model's, so no response mixes two models' vectors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedq.model import matryoshka
from embedq.model.encoder import resolve_model_dir
from embedq.model.fingerprint import fingerprint
from embedq.model.model_spec import ModelSpec

if TYPE_CHECKING:
    from embedq.model.encoder import Encoder


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    fingerprint: str  # 16 hex digits; "" when unknown (a gateway without the model's files)
    # The model card declares Matryoshka training: its vectors may be shortened (truncated
    # and renormalised, as ``--dimensions`` does). Not part of the identity.
    matryoshka: bool = field(default=False, compare=False)

    def accepts(self, name: str, fingerprint: str) -> bool:
        """True when an answer stamped ``name``/``fingerprint`` is this model's: by
        fingerprint when this one is known, else by name."""
        if self.fingerprint:
            return fingerprint == self.fingerprint
        return name == self.name


def identity_of(encoder: Encoder) -> ModelIdentity:
    """The identity of a loaded encoder (its ``--dimensions`` included); a stand-in
    without model files (tests' stubs) has its name only."""
    spec = getattr(encoder, "spec", None)
    if spec is None:
        return ModelIdentity(str(getattr(encoder, "name", "")), "")
    return ModelIdentity(
        encoder.name, fingerprint(encoder.model_dir, spec, getattr(encoder, "truncate_dim", 0))
    )


def configured_identity(model: str, dimensions: int = 0) -> ModelIdentity:
    """The identity of the model ``--model``/``--dimensions`` name, without loading its
    weights (the gateway's); ``ConfigError`` when the directory is not a model's."""
    model_dir, name = resolve_model_dir(model)
    spec = ModelSpec.load(model_dir)
    if dimensions and dimensions >= _native(model_dir, spec):
        dimensions = 0  # as the encoder records it: the native size truncates nothing
    shortenable = matryoshka.declared(model_dir)
    return ModelIdentity(name, fingerprint(model_dir, spec, dimensions), shortenable)


def _native(model_dir: Path, spec: ModelSpec) -> int:
    """The model's dense output size, read from its files (as ``Encoder`` computes it)."""
    if spec.dense:
        return int(spec.dense[-1].out_features)
    try:
        hidden = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return hidden * len(spec.pooling)
