"""``embedq verify --sample N``: embed N random rows again and compare with what Milvus holds.

The digest (``embedq.sink.digest``) proves a row's vector is the one a worker wrote; it cannot
say whether that worker's vector was right: rows written by another model (a worker
started with the wrong ``--model`` against a collection without a fingerprint, a bulk
import, a hand-made row given a real content hash) pass it. Sampling embeds the row's text
with the configured model (its fingerprint checked against the collection's first, as
``embedq search`` does) and wants a cosine of at least ``MIN_COSINE`` with the stored
vector, dense and sparse alike. Batches and padding change float32 results in the last
bits (cosine ~1 - 1e-7 on CPU, fp16 on a GPU a little more), a vector from another model
is far below: 0.999 tells them apart.

The text is the row's ``text`` field where the collection stores text, else the stream
entry the index's version names (XRANGE); a row with neither (its entry trimmed, or the
row's version not the index's) is reported as not sampleable, not as drift.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from embedq.model.sparse import EMPTY
from embedq.queue.connection import translated as redis_translated
from embedq.sink.error_codes import translated as milvus_translated

if TYPE_CHECKING:
    from embedq.model.encoder import Encoder
    from embedq.queue.stream import Stream
    from embedq.queue.versions import Held
    from embedq.sink.milvus import Sink

log = structlog.get_logger("embedq.ops.sampling")

MIN_COSINE = 0.999
_QUERY_IDS = 256  # ids per Milvus query
_MODEL_ROWS = 32  # texts per forward pass


@dataclass
class Sample:
    sampled: int = 0  # rows embedded again and compared
    mismatched: list[str] = field(default_factory=list)  # cosine below MIN_COSINE
    unsampleable: list[str] = field(default_factory=list)  # no text to embed again
    min_cosine: float | None = None  # the lowest cosine seen (None: nothing compared)


def sample(
    index: Mapping[str, tuple[Held, Stream]],
    skip: set[str],
    sink: Sink,
    encoder: Encoder,
    n: int,
    *,
    rng: random.Random | None = None,
) -> Sample:
    """Embed ``n`` random indexed rows again (not ``skip``: ids already known to be missing)
    and compare each with its stored vectors. ``sink`` must be opened for ``encoder``
    (``Sink.ensure_for``), so the model is the collection's."""
    live = sorted(i for i, (held, _) in index.items() if not held.deleted and i not in skip)
    chosen = sorted((rng or random.Random()).sample(live, min(n, len(live))))
    result = Sample()
    for start in range(0, len(chosen), _QUERY_IDS):
        rows = _stored(sink, chosen[start : start + _QUERY_IDS])
        texts: dict[str, str] = {}
        for doc_id in chosen[start : start + _QUERY_IDS]:
            found = _text(rows.get(doc_id), *index[doc_id], store_text=sink.store_text)
            if found is None:
                result.unsampleable.append(doc_id)
            else:
                texts[doc_id] = found
        _compare(texts, rows, encoder, result)
    result.mismatched.sort()
    return result


def _stored(sink: Sink, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The rows of ``ids`` with their vectors (``Sink.get`` leaves the sparse one out)."""
    fields = (
        ["id", "version"]
        + (["vector"] if sink.dimension != 0 else [])
        + (["sparse"] if sink.sparse else [])
        + (["text"] if sink.store_text else [])
    )
    with milvus_translated("query sampled rows"):
        rows = sink.client.query(
            sink.collection,
            ids=list(ids),
            output_fields=fields,
            consistency_level="Strong",
            timeout=sink.timeout_s,
        )
    return {str(r["id"]): r for r in rows}


def _text(
    row: dict[str, Any] | None, held: Held, stream: Stream, *, store_text: bool
) -> str | None:
    """The text the row's vector must be the embedding of, or None."""
    if row is None:
        return None
    if store_text and row.get("text") is not None:
        return str(row["text"])
    if row.get("version", held.version) != held.version:
        return None  # the stream entry is not what this row was made from
    with redis_translated("XRANGE sampled entry"):
        found: Any = stream.client.xrange(stream.keys.stream, held.version, held.version)
    if not found or b"text" not in found[0][1]:
        return None
    raw = found[0][1][b"text"]
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _compare(
    texts: dict[str, str], rows: dict[str, dict[str, Any]], encoder: Encoder, result: Sample
) -> None:
    ids = list(texts)
    for start in range(0, len(ids), _MODEL_ROWS):
        part = ids[start : start + _MODEL_ROWS]
        tokenized = encoder.tokenize([texts[i] for i in part])
        batch = encoder.forward([t.ids for t in tokenized])
        for n, doc_id in enumerate(part):
            row, cosines = rows[doc_id], []
            if "vector" in row and batch.vectors.shape[1]:
                cosines.append(_dense_cosine(batch.vectors[n], row["vector"]))
            if "sparse" in row and batch.sparse is not None:
                cosines.append(_sparse_cosine(batch.sparse[n] or EMPTY, row["sparse"]))
            if not cosines:
                result.unsampleable.append(doc_id)  # nothing this model makes is stored
                continue
            result.sampled += 1
            worst = min(cosines)
            if result.min_cosine is None or worst < result.min_cosine:
                result.min_cosine = worst
            if worst < MIN_COSINE:
                result.mismatched.append(doc_id)
                log.warning("sample_mismatch", id=doc_id, cosine=round(worst, 6))


def _dense_cosine(fresh: Any, stored: Any) -> float:
    a = np.asarray(fresh, dtype=np.float64)
    b = np.asarray(stored, dtype=np.float64)
    if a.shape != b.shape:
        return -1.0  # another dimension: certainly another model
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms else float(np.array_equal(a, b))


def _sparse_cosine(fresh: Mapping[int, float], stored: Any) -> float:
    other = {int(k): float(v) for k, v in dict(stored or EMPTY).items()}
    dot = sum(w * other.get(k, 0.0) for k, w in fresh.items())
    norms = float(np.sqrt(sum(w * w for w in fresh.values()) * sum(w * w for w in other.values())))
    return dot / norms if norms else 1.0
