"""``embedq search``: dense, sparse or hybrid retrieval, by what the collection holds.

A collection of a dense model is searched by cosine over ``vector``; one of a SPLADE model
by inner product over ``sparse``; one of BGE-M3 by either, or by both at once (Milvus's
hybrid search, the two result lists fused by reciprocal rank, RRF with k=60, or by a
weighted sum of the scores). ``auto`` takes every field the collection has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from embedq.core.errors import ConfigError
from embedq.model.encoder import Encoder
from embedq.model.sparse import EMPTY
from embedq.sink.error_codes import translated
from embedq.sink.milvus import Hit, Sink

Mode = Literal["auto", "dense", "sparse", "hybrid"]
Ranker = Literal["rrf", "weighted"]
MODES = ("auto", "dense", "sparse", "hybrid")
RANKERS = ("rrf", "weighted")


@dataclass(frozen=True)
class Fusion:
    """How a hybrid search fuses its two lists."""

    ranker: Ranker = "rrf"
    rrf_k: int = 60  # Milvus's and the RRF paper's default
    dense_weight: float = 0.5
    sparse_weight: float = 0.5

    def milvus_ranker(self) -> Any:
        from pymilvus import RRFRanker, WeightedRanker

        if self.ranker == "rrf":
            return RRFRanker(self.rrf_k)
        return WeightedRanker(self.dense_weight, self.sparse_weight)


def resolve_mode(mode: Mode, sink: Sink, encoder: Encoder) -> Mode:
    """The mode a search runs in: ``auto`` becomes what the collection and model both have;
    a mode they cannot serve is a ``ConfigError`` that says what they can."""
    dense = bool(sink.dimension) and encoder.width > 0
    sparse = sink.sparse and encoder.head is not None
    can = [
        m for m, ok in (("dense", dense), ("sparse", sparse), ("hybrid", dense and sparse)) if ok
    ]
    if mode == "auto":
        return "hybrid" if dense and sparse else ("dense" if dense else "sparse")
    if mode not in can:
        raise ConfigError(
            f"--mode {mode}: collection {sink.collection} with this model can be searched "
            f"{' or '.join(can) or 'in no mode'}"
        )
    return mode


def search(
    sink: Sink,
    encoder: Encoder,
    query: str,
    k: int,
    *,
    mode: Mode = "auto",
    fusion: Fusion = Fusion(),
) -> list[Hit]:
    """The ``k`` nearest stored entries to ``query``, best first."""
    mode = resolve_mode(mode, sink, encoder)
    batch = encoder.forward([encoder.tokenize([query])[0].ids])
    dense = batch.vectors[0].tolist() if encoder.width else None
    sparse = (batch.sparse[0] or EMPTY) if batch.sparse else None
    fields = ["meta"] + (["text"] if sink.store_text else [])
    with translated("search"):
        if mode == "hybrid":
            from pymilvus import AnnSearchRequest

            requests = [
                AnnSearchRequest([dense], "vector", {"metric_type": "COSINE"}, limit=k),
                AnnSearchRequest([sparse], "sparse", {"metric_type": "IP"}, limit=k),
            ]
            result = sink.client.hybrid_search(
                sink.collection,
                requests,
                fusion.milvus_ranker(),
                limit=k,
                output_fields=fields,
                timeout=sink.timeout_s,
            )
        else:
            result = sink.client.search(
                sink.collection,
                [dense if mode == "dense" else sparse],
                anns_field="vector" if mode == "dense" else "sparse",
                limit=k,
                output_fields=fields,
                timeout=sink.timeout_s,
            )
    return [_hit(h) for h in result[0]]


def _hit(hit: dict[str, Any]) -> Hit:
    entity = hit.get("entity", {})
    return Hit(
        id=str(hit["id"]),
        score=float(hit["distance"]),
        text=entity.get("text"),
        meta=entity.get("meta"),
    )
