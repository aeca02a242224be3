"""Vectors already computed, by the hash of their text: a text repeated under many ids (a
boilerplate chunk, a re-run of a source) goes through the model once.

In-process and bounded by entry count (an LRU): each worker process holds at most
``capacity`` vectors (a 384-d float32 vector is 1.5 KB, so 10,000 cost about 15 MB). It is
per model by construction (one model per worker process) and needs no invalidation: a
text's vector never changes for a given model. Workers do not share it; identical texts
in one read window always meet in one process, which covers the common case (a document's
chunks and their re-sends travel together).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
V = TypeVar("V")


class VectorCache(Generic[V]):
    """An LRU of vectors by text hash (dense arrays, or a sparse model's dicts)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._vectors: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()  # model replicas run on several threads

    def get_many(self, keys: set[str]) -> dict[str, V]:
        if not self.capacity:
            return {}
        found = {}
        with self._lock:
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                    found[key] = vector
        return found

    def put_many(self, vectors: dict[str, V]) -> None:
        if not self.capacity:
            return
        with self._lock:
            for key, vector in vectors.items():
                self._vectors[key] = vector
                self._vectors.move_to_end(key)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)

    def __len__(self) -> int:
        return len(self._vectors)
