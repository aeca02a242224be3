"""How the gateway's answers are shaped: the model it serves (identity and the names it
answers to), shortened ``dimensions``, the vector encodings, and a scoped key's hits."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from embedq.core.config import Settings
from embedq.core.errors import ConfigError
from embedq.model.encoder import PACKAGED_MODEL_NAME, model_name
from embedq.model.identity import ModelIdentity, configured_identity
from embedq.model.onnx_backend import variant
from embedq.queue.connection import translated
from embedq.queue.online_wire import Answer
from embedq.sink.milvus import Sink


def served_model(settings: Settings) -> tuple[ModelIdentity, tuple[str, ...]]:
    """The model's identity (name and fingerprint, as workers stamp their answers; the index
    fingerprint, backend variant included, as they record it on collections) and the names
    a request may give for it. A gateway image without the model's files knows its name
    only, and accepts answers by name."""
    try:
        backend = variant(settings.backend, settings.quantize)
        identity = configured_identity(settings.model, settings.dimensions, backend)
    except ConfigError:
        name = model_name(Path(settings.model)) if settings.model else PACKAGED_MODEL_NAME
        identity = ModelIdentity(name, "")
    served = [n.strip() for n in settings.api_served_model_name.split(",") if n.strip()]
    if served:  # vLLM's --served-model-name: these names only, the first in answers
        return identity, tuple(served)
    name = identity.name
    return identity, (name, name.rsplit("/", 1)[-1])


def within(sink: Sink, hits: list[Any], scope: str) -> list[Any]:
    """Those of ``hits`` that ``scope`` alone admits (asked of Milvus by id)."""
    if not hits:
        return hits
    ids = ", ".join(orjson.dumps(h.id).decode() for h in hits)
    with translated("search scope"):
        rows = sink.client.query(
            sink.collection,
            filter=f"({scope}) and id in [{ids}]",
            output_fields=["id"],
            timeout=sink.timeout_s,
        )
    admitted = {str(r["id"]) for r in rows}
    return [h for h in hits if h.id in admitted]


def truncated(vector: np.ndarray[Any, Any] | None, dimensions: int) -> np.ndarray[Any, Any]:
    assert vector is not None
    head = vector[:dimensions].astype(np.float32)
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 else head


def encoded(answer: Answer, encoding_format: str) -> Any:
    vector = answer.vector
    assert vector is not None
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector
