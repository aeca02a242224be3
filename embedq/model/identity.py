"""A model's identity, derived here and nowhere else: its name
(``embedq.model.encoder.model_name``), its fingerprint (``embedq.model.fingerprint``), its
width (the dense vector's size as written, 0 for sparse only) and its truncation
(``--dimensions``, Matryoshka; 0 keeps the native width).

Built once per process (``identity_of`` for a loaded encoder, ``configured_identity`` for a
gateway that loads no weights; both through ``_identity``) and handed around: workers stamp
every online answer with it (``embedq.queue.online_wire``), the worker's metrics describe it,
the collection check compares it (``embedq.sink.schema``), and the gateway accepts only
answers whose identity is its configured model's, so no response mixes two models' vectors.
"""

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
    # Weights, post-processing and truncation: 16 hex digits, what online answers carry; ""
    # when unknown (a gateway without the model's files).
    fingerprint: str
    width: int = 0  # dense dimensions written (after truncation); 0: sparse only or unknown
    truncation: int = 0  # --dimensions in effect; 0: the native width, nothing cut
    # The model card declares Matryoshka training: its vectors may be shortened (truncated
    # and renormalised, as ``--dimensions`` does). Not part of the identity.
    matryoshka: bool = field(default=False, compare=False)
    # ``fingerprint`` plus the backend variant (``--backend onnx --quantize int8``): what a
    # collection records, so an int8 index is never mixed with an fp32 one. Answers are
    # stamped without it: the accuracy gate bounds what a backend changes in one vector.
    index_fingerprint: str = field(default="", compare=False)

    def accepts(self, name: str, fingerprint: str) -> bool:
        """True when an answer stamped ``name``/``fingerprint`` is this model's: by
        fingerprint when this one is known, else by name."""
        if self.fingerprint:
            return fingerprint == self.fingerprint
        return name == self.name


def identity_of(encoder: Encoder) -> ModelIdentity:
    """The identity of a loaded encoder (its ``--dimensions`` and backend included); a
    stand-in without model files (tests' stubs) has its name and width only."""
    spec = getattr(encoder, "spec", None)
    if spec is None:
        name = str(getattr(encoder, "name", ""))
        return ModelIdentity(name, "", width=int(getattr(encoder, "width", 0)))
    return _identity(
        encoder.model_dir,
        encoder.name,
        spec,
        width=encoder.width,
        truncation=encoder.truncate_dim,
        variant=getattr(encoder, "variant", ""),
    )


def configured_identity(model: str, dimensions: int = 0, variant: str = "") -> ModelIdentity:
    """The identity of the model ``--model``/``--dimensions`` name, without loading its
    weights (the gateway's); ``ConfigError`` when the directory is not a model's."""
    model_dir, name = resolve_model_dir(model)
    spec = ModelSpec.load(model_dir)
    native = spec.native_width(_hidden_size(model_dir))
    if dimensions >= native:
        dimensions = 0  # as the encoder records it: the native size truncates nothing
    width = dimensions or native
    return _identity(model_dir, name, spec, width=width, truncation=dimensions, variant=variant)


def _identity(
    model_dir: Path, name: str, spec: ModelSpec, *, width: int, truncation: int, variant: str
) -> ModelIdentity:
    return ModelIdentity(
        name,
        fingerprint(model_dir, spec, truncation),
        width=width,
        truncation=truncation,
        matryoshka=matryoshka.declared(model_dir),
        index_fingerprint=fingerprint(model_dir, spec, truncation, variant),
    )


def _hidden_size(model_dir: Path) -> int:
    """The transformer's hidden size, read from its config.json (0 when unreadable)."""
    try:
        return int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
