"""A model's fingerprint: what a collection records so that no other model writes into it.

Two models whose vectors could not be compared must never share a collection, even when
their dimensions agree (a fine-tuned twin of the same architecture, another pooling, the
same model cut to other ``--dimensions``). The fingerprint covers the weights (every weight
file in the model directory and its module folders), the post-processing (``ModelSpec``:
pooling, dense layers, normalisation, the sparse head), ``--dimensions`` and the backend
(``--backend onnx``, ``--quantize int8``: ``variant``, empty for fp32 torch so collections
made before backends existed keep their fingerprint): an int8 index is never mixed with an
fp32 one.

Weight files up to 64 MiB are hashed whole. Larger ones are hashed by their size and 16
evenly spaced 1 MiB samples: a full hash of a 2 GB checkpoint would add seconds to every
worker start, and two different trainings differ everywhere, so sampling tells them apart.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from embedq.model.model_spec import ModelSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WHOLE_BYTES = 64 * 1024 * 1024
SAMPLES = 16
SAMPLE_BYTES = 1024 * 1024


@functools.cache  # model files do not change under a running process
def fingerprint(model_dir: Path, spec: ModelSpec, dimensions: int = 0, variant: str = "") -> str:
    """16 hex digits naming these weights, this post-processing, these dimensions and this
    backend variant (``embedq.model.onnx_backend.variant``)."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        digest.update(str(path.relative_to(model_dir)).encode())
        digest.update(_file_digest(path))
    described = {**{k: v for k, v in vars(spec).items() if k != "dense"}, "dimensions": dimensions}
    digest.update(repr(sorted(described.items())).encode())
    for dense in spec.dense:
        digest.update(
            repr((dense.in_features, dense.out_features, dense.bias, dense.activation)).encode()
        )
    if variant:
        digest.update(f"backend={variant}".encode())
    return digest.hexdigest()[:16]


def weight_files(model_dir: Path) -> list[Path]:
    """Every weight file of the model, in a stable order (module folders included)."""
    found = [p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return sorted(found, key=lambda p: str(p.relative_to(model_dir)))


def _file_digest(path: Path) -> bytes:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= WHOLE_BYTES:
            for block in iter(lambda: handle.read(SAMPLE_BYTES), b""):
                digest.update(block)
            return digest.digest()
        step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
        for i in range(SAMPLES):
            handle.seek(i * step)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.digest()
