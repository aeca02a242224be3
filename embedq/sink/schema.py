"""What a collection must be for a model to write into it (or search it).

Its dense ``vector`` field must have the model's dimension (or be absent for a sparse-only
model), its ``sparse`` field must be there exactly when the model makes sparse vectors, and
the fingerprint it records (``embedq.fingerprint``, a collection property) must be this
model's: another model's vectors are not comparable with its own, whatever their size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from embedq.core.errors import ConfigError, ModelMismatch

if TYPE_CHECKING:
    from embedq.model.encoder import Encoder

log = structlog.get_logger("embedq.sink.milvus")


def collection_args(encoder: Encoder) -> dict[str, Any]:
    """What ``Sink.ensure_collection`` checks a collection against (or creates it with):
    the encoder's identity (embedq.model.identity)."""
    from embedq.model.identity import identity_of  # with the model, not with every sink user

    identity = identity_of(encoder)
    return {
        "dimension": identity.width,
        "model_name": identity.name,
        "sparse": encoder.head is not None,
        "fingerprint": identity.index_fingerprint,
    }


def model_fingerprint(encoder: Encoder) -> str:
    """What collections record of ``encoder``'s model (``embedq.fingerprint``, cached)."""
    from embedq.model.identity import identity_of

    return identity_of(encoder).index_fingerprint


def check_fields(info: dict[str, Any], collection: str, dimension: int, model_name: str) -> None:
    """Refuse a collection whose dense field does not fit the model (warn on another
    model's name in an older collection's description)."""
    vector = next((f for f in info["fields"] if f["name"] == "vector"), None)
    if not dimension and vector is None:
        return  # a sparse-only collection for a sparse-only model
    if not dimension:
        raise ConfigError(
            f"collection {collection} holds dense vectors but the model makes sparse "
            "vectors only: use another --collection or the model it was built with"
        )
    if vector is None:
        raise ConfigError(
            f"collection {collection} exists but has no 'vector' field; "
            "it was not created by embedq (choose another --collection)"
        )
    found = int(vector["params"]["dim"])
    if found != dimension:
        raise ConfigError(
            f"collection {collection} holds {found}-dimensional vectors but the model "
            f"makes {dimension}: use another --collection or the model it was built with"
        )
    description = str(info.get("description", ""))
    if f"model={model_name} " not in description + " " and description.startswith("embedq"):
        log.warning(
            "collection_model_differs",
            collection=collection,
            collection_description=description,
            model=model_name,
        )


def check_model(info: dict[str, Any], collection: str, *, sparse: bool, fingerprint: str) -> None:
    """Refuse a model whose fingerprint or outputs are not the collection's."""
    properties = info.get("properties") or {}
    recorded = str(properties.get("embedq.fingerprint", ""))
    if recorded and fingerprint and recorded != fingerprint:
        raise ModelMismatch(
            f"collection {collection} (at {info.get('collection_name', collection)}) holds "
            f"vectors of model {properties.get('embedq.model', '?')} (fingerprint {recorded}); "
            f"this model's fingerprint is {fingerprint}, and its vectors cannot share a "
            "collection with those: point --collection at this model's collection, or move to "
            "it with `embedq migrate --model`"
        )
    has_sparse = any(f["name"] == "sparse" for f in info["fields"])
    if has_sparse != sparse:
        made = "sparse vectors" if sparse else "no sparse vector"
        raise ConfigError(
            f"collection {collection} {'has' if has_sparse else 'has no'} sparse field but the "
            f"model makes {made}: use another --collection or the model it was built with"
        )


SEPARATOR = "__"


def model_collection(name: str, fingerprint: str) -> str:
    """The physical collection of the model of ``fingerprint`` behind the name (an alias)
    ``name``: ``NAME__<fingerprint>`` (``embedq migrate``). Workers write there whichever
    collection the alias names, so each model keeps its own collection during a rollout."""
    return f"{name}{SEPARATOR}{fingerprint}"


def model_properties(model_name: str, fingerprint: str) -> dict[str, str]:
    """What a new collection records of its model (Milvus collection properties)."""
    found = {"embedq.model": model_name, "embedq.fingerprint": fingerprint}
    return {k: v for k, v in found.items() if v}
