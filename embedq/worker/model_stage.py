"""The model stage's work on one batch: vectors for its items, each distinct text through the
model once.

Texts repeated in a batch, or whose vector the cache holds (``embedq.model.vector_cache``), skip
the forward pass. When the model raises on a batch, it is split in halves until the text
that fails is alone (``embedq.worker.pipeline.isolate``); that text's items are dead-lettered
(``encode_failed``), the rest go on, but only once the model is seen to work on another
input. Out of memory shrinks the batch (the same splitting); a broken device, or memory
that does not fit one text, stops the worker (``DeviceFailed``) with nothing dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import structlog

from embedq.core.errors import DeviceFailed, EncodeFailed, ModelOutOfMemory
from embedq.model.encoder import Encoder
from embedq.model.sparse import SparseVector
from embedq.model.vector_cache import Vector, VectorCache
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.pipeline import Batch, Item, Stats, isolate

log = structlog.get_logger("embedq.worker.model_stage")

Reject = Callable[[Item, str, str], None]


class Encoding:
    def __init__(
        self, cache: VectorCache[Vector], reject: Reject, metrics: WorkerMetrics, stats: Stats
    ) -> None:
        self.cache = cache
        # A sparse model's vectors, beside the dense ones; a tenth as many, as a SPLADE
        # vector of a few hundred entries costs ten times a 384-d array in a dict.
        self.sparse_cache: VectorCache[SparseVector] = VectorCache(cache.capacity // 10)
        self.reject = reject
        self.metrics = metrics
        self.stats = stats

    def encode(self, batch: Batch, encoder: Encoder) -> None:
        """Fill ``batch.vectors``, running the model once per distinct text it has no
        vector for; when the model fails, split until the culprit is alone and reject it
        (with every item of the same text)."""
        hashes = {item.text_hash for item in batch.items}
        vectors = self.cache.get_many(hashes)
        sparse = self.sparse_cache.get_many(hashes) if encoder.head else {}
        if encoder.head:  # both outputs come from one pass: both must be cached to skip it
            vectors = {h: v for h, v in vectors.items() if h in sparse}
        todo = list({i.text_hash: i for i in batch.items if i.text_hash not in vectors}.values())
        self.metrics.vector_cache_hits.inc(len(batch.items) - len(todo))
        failed: dict[str, str] = {}
        runs = isolate(
            todo,
            lambda group: encoder.forward([i.ids for i in group]),
            EncodeFailed,
            on_split=self._on_encode_split,
        )
        for items, outcome in runs if todo else ():
            if isinstance(outcome, ModelOutOfMemory):
                # Split down to one text and still out of memory: the device, not the input.
                raise DeviceFailed(f"out of memory for a single text: {outcome}")
            if isinstance(outcome, EncodeFailed):
                failed[items[0].text_hash] = str(outcome)
                continue
            tensors_s, model_s, pool_s = outcome.cpu_s
            self.stats.charge("forward", tensors_s + model_s)
            self.stats.charge("pool", pool_s)
            fresh = {i.text_hash: v for i, v in zip(items, outcome.vectors, strict=True)}
            self.cache.put_many(fresh)
            vectors.update(fresh)
            if outcome.sparse is not None:
                more = {i.text_hash: v for i, v in zip(items, outcome.sparse, strict=True)}
                self.sparse_cache.put_many(more)
                sparse.update(more)
            batch.tokens += outcome.tokens
            batch.padded_tokens += outcome.padded_tokens
        if failed:
            self._check_device(encoder)
        self.metrics.encoded_texts.inc(len(todo) - len(failed))
        for item in batch.items:
            if item.text_hash in failed:
                self.reject(item, "encode_failed", failed[item.text_hash])
        batch.items = [i for i in batch.items if i.text_hash not in failed]
        if batch.items:
            batch.vectors = np.stack([vectors[i.text_hash] for i in batch.items])
            if encoder.head:
                batch.sparse = [sparse[i.text_hash] for i in batch.items]

    def _check_device(self, encoder: Encoder) -> None:
        """A text is poison only if the model works without it: run the smallest input
        there is. A model that fails on that too is broken (a sticky device error that
        every text met), and no entry may be dead-lettered for it."""
        try:
            encoder.forward([encoder.tokenize([" "])[0].ids])
        except EncodeFailed as exc:
            raise DeviceFailed(f"the model fails on any input: {exc}") from exc

    def _on_encode_split(self, size: int, exc: EncodeFailed) -> None:
        log.warning("batch_split", size=size, error=str(exc)[:200])
        self.metrics.errors.labels(kind="encode").inc()
