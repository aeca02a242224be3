"""Rows as columns: one Milvus upsert request built straight from a float32 matrix and lists.

pymilvus's ``MilvusClient.upsert`` takes one dict per row and converts every value of every
row through its type checks; for 384-d rows that was most of a worker's write stage (see
docs/benchmarks.md#what-changed-issue-13-and-why). The worker already holds a batch as
columns, so this builds each column's protobuf ``FieldData`` at once: the vectors as one
packed float32 buffer parsed by protobuf (far cheaper than ``extend``-ing them value by
value), the strings by one ``extend`` per column. The request goes through the same gRPC
stub, schema timestamp and status check as pymilvus's own ``upsert_rows``; ``send`` returns
None where the client is not built that way (another pymilvus), and the sink then sends
dict rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from embedq.core.errors import SinkRejected
from embedq.model.sparse import EMPTY

TEXT_MAX_BYTES = 65_535  # Milvus' VARCHAR limit; stored text is cut there, vectors are not


@dataclass(frozen=True)
class Columns:
    """A batch of rows, one list (or matrix) per field; ``vectors`` is (rows, dimension)."""

    ids: Sequence[str]
    vectors: npt.NDArray[np.float32]
    texts: Sequence[str]
    metas: Sequence[bytes]  # JSON, as Milvus stores it (``meta_json``)
    content_hashes: Sequence[str]
    versions: Sequence[str]
    # A sparse model's vectors (embedq.model.sparse), one per row; empty for a dense-only model.
    sparse: Sequence[dict[int, float] | None] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, start: int, stop: int) -> Columns:
        return Columns(
            self.ids[start:stop],
            self.vectors[start:stop],
            self.texts[start:stop],
            self.metas[start:stop],
            self.content_hashes[start:stop],
            self.versions[start:stop],
            self.sparse[start:stop],
        )

    def request_bytes(self) -> list[int]:
        """Roughly what each row costs on the wire (float32 vector, strings, JSON)."""
        width = int(self.vectors.shape[1]) * 4 + 64 if len(self.ids) else 0
        sparse = [len(v or ()) * 8 for v in self.sparse] or [0] * len(self.ids)
        return [
            width + len(i) + len(t) * 4 + len(m) + n
            for i, t, m, n in zip(self.ids, self.texts, self.metas, sparse, strict=True)
        ]

    def chunks(self, budget_bytes: int) -> list[Columns]:
        """Consecutive slices of at most ``budget_bytes`` each (one row may exceed it)."""
        out: list[Columns] = []
        start = size = 0
        for i, cost in enumerate(self.request_bytes()):
            if i > start and size + cost > budget_bytes:
                out.append(self.take(start, i))
                start, size = i, 0
            size += cost
        if start < len(self):
            out.append(self.take(start, len(self)))
        return out

    def rows(self, fields: Sequence[str]) -> list[dict[str, Any]]:
        """One dict per row with ``fields``, for a client without a gRPC stub (``send``
        returned None)."""
        sparse = [v or EMPTY for v in self.sparse] or [EMPTY] * len(self.ids)
        return [
            {
                k: v
                for k, v in (
                    ("id", i),
                    ("vector", vec.tolist()),
                    ("text", cut_utf8(t)),
                    ("meta", orjson.loads(m)),
                    ("content_hash", h),
                    ("version", ver),
                    ("sparse", sp),
                )
                if k in fields
            }
            for i, vec, t, m, h, ver, sp in zip(
                self.ids,
                self.vectors,
                self.texts,
                self.metas,
                self.content_hashes,
                self.versions,
                sparse,
                strict=True,
            )
        ]


def cut_utf8(text: str, limit: int = TEXT_MAX_BYTES) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (a text of limit / 4 characters or fewer
    always fits: no encoding needed for the common short text)."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore")


def meta_json(meta: dict[str, Any] | None) -> bytes:
    """A row's meta as the JSON bytes Milvus stores; a meta JSON cannot express (an integer
    past 64 bits) is that row's fault, refused like any row Milvus refuses."""
    try:
        return orjson.dumps(meta if meta is not None else {})
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise SinkRejected(f"meta cannot be stored as JSON: {exc}") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _float_column(name: str, vectors: npt.NDArray[np.float32]) -> Any:
    from pymilvus.grpc_gen import schema_pb2

    field = schema_pb2.FieldData(type=schema_pb2.DataType.FloatVector, field_name=name)
    field.vectors.dim = int(vectors.shape[1])
    raw = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
    # FloatArray's only field is `repeated float data = 1` (packed): tag 0x0a, length, bytes.
    field.vectors.float_vector.MergeFromString(b"\x0a" + _varint(len(raw)) + raw)
    return field


def _sparse_column(name: str, rows: Sequence[dict[int, float] | None]) -> Any:
    """Sparse vectors as Milvus stores them (pymilvus's own conversion); an empty one as
    ``embedq.model.sparse.EMPTY``, since Milvus refuses empty sparse vectors."""
    from pymilvus.client.entity_helper import sparse_rows_to_proto
    from pymilvus.grpc_gen import schema_pb2

    field = schema_pb2.FieldData(type=schema_pb2.DataType.SparseFloatVector, field_name=name)
    field.vectors.sparse_float_vector.CopyFrom(sparse_rows_to_proto([r or EMPTY for r in rows]))
    field.vectors.dim = field.vectors.sparse_float_vector.dim
    return field


def _string_column(name: str, values: Sequence[str]) -> Any:
    from pymilvus.grpc_gen import schema_pb2

    field = schema_pb2.FieldData(type=schema_pb2.DataType.VarChar, field_name=name)
    field.scalars.string_data.data.extend(values)
    return field


def _json_column(name: str, metas: Sequence[bytes]) -> Any:
    from pymilvus.grpc_gen import schema_pb2

    field = schema_pb2.FieldData(type=schema_pb2.DataType.JSON, field_name=name)
    field.scalars.json_data.data.extend(metas)
    return field


def field_data(columns: Columns, fields: Sequence[str]) -> list[Any]:
    """The ``FieldData`` of each field the collection has, in its schema's order."""
    build = {
        "id": lambda: _string_column("id", columns.ids),
        "vector": lambda: _float_column("vector", columns.vectors),
        "sparse": lambda: _sparse_column("sparse", columns.sparse),
        "text": lambda: _string_column("text", [cut_utf8(t) for t in columns.texts]),
        "meta": lambda: _json_column("meta", columns.metas),
        "content_hash": lambda: _string_column("content_hash", columns.content_hashes),
        "version": lambda: _string_column("version", columns.versions),
    }
    return [build[name]() for name in fields]


def send(
    client: Any, collection: str, columns: Columns, fields: Sequence[str], timeout_s: float
) -> int | None:
    """Upsert ``columns`` through ``client``'s gRPC stub; the count Milvus confirmed, or None
    when the client has no such stub (the caller sends dict rows instead, and counts it:
    ``embedq_upsert_row_fallback_total``). The stub is private to pymilvus, hence the
    version bound in pyproject.toml. pymilvus errors (a refused status) propagate for
    ``embedq.sink.error_codes.translated``."""
    handler = getattr(client, "_handler", None)
    stub = getattr(handler, "_stub", None)
    get_schema = getattr(handler, "_get_schema", None)
    if stub is None or get_schema is None:
        return None
    from pymilvus.client.utils import check_status
    from pymilvus.grpc_gen import milvus_pb2

    _schema, schema_timestamp = get_schema(collection, timeout=timeout_s)
    request = milvus_pb2.UpsertRequest(
        collection_name=collection,
        fields_data=field_data(columns, fields),
        num_rows=len(columns),
        schema_timestamp=schema_timestamp,
    )
    response = stub.Upsert(request, timeout=timeout_s)
    check_status(response.status)
    return int(response.upsert_cnt)
