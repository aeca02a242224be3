"""Listing a whole collection (``Sink.rows``, which ``embedq verify`` and ``embedq migrate``
read) sees every row once, on every backend, whatever order it answers a limited query in.

Issue 25: keyset pages that took the last id of a page as the cursor saw ~1,000 rows of a
larger collection on Milvus Lite, which does not return a limited query's smallest ids.
The collections here hold random uuid4 ids written in random order, as producers send
them; the rows' vectors are random (no model runs).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from embedq.core.deletes import DEFAULT as DEFAULT_MAX_DELETE
from embedq.core.deletes import MaxDelete
from embedq.core.errors import DeletesRefused, SinkUnavailable
from embedq.core.keys import Keys
from embedq.ops.migrate import _signatures
from embedq.ops.verify import refuse_unproven, verify
from embedq.queue.stream import Stream
from embedq.sink.milvus import PAGE_ROWS, Row, Sink

from .support.servers import MilvusLiteServer, MilvusStandalone

DIMENSION = 16
LARGE = 20_000


def _rows(ids: list[str], rng: np.random.Generator) -> list[Row]:
    vectors = rng.standard_normal((len(ids), DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        Row(
            id=doc_id,
            vector=vectors[i],
            text=f"text of {doc_id}",
            meta=None,
            content_hash=f"h{i}",
            version=f"{i + 1}-0",
        )
        for i, doc_id in enumerate(ids)
    ]


def _filled(sink: Sink, ids: list[str], *, sparse: bool = False) -> dict[str, Row]:
    """Write a row per id (in the order given), plus a second write of every tenth id, so
    that upserts leave older copies behind in the backend's segments as in real use."""
    sink.ensure_collection(DIMENSION, "listing-test", sparse=sparse)
    rng = np.random.default_rng(25)
    rows = _rows(ids, rng)
    if sparse:
        rows = [replace(r, sparse={i: 0.5, i + 7: 0.25}) for i, r in enumerate(rows)]
    for start in range(0, len(rows), 5000):
        sink.upsert(rows[start : start + 5000])
    again = [replace(r, version=f"{r.version}-again") for r in rows[::10]]
    sink.upsert(again)
    final = {r.id: r for r in rows}
    final.update((r.id, r) for r in again)
    return final


def _random_ids(n: int) -> list[str]:
    """uuid4 ids, in the random order they are made in (not sorted)."""
    return [uuid.uuid4().hex for _ in range(n)]


def _lists_everything(
    sink: Sink, written: dict[str, Row], redis_client: redis.Redis, stream_name: str
) -> None:
    """Every id once, by ``rows`` with vectors; ``verify`` against an index that matches
    reports clean; migrate's listing sees every id with its version."""
    # Pages as large as without vectors (VECTOR_PAGE_ROWS guards against 1,024-dim ones):
    # every query on Milvus Lite's unsealed rows scans all 20,000 of them.
    listed = list(sink.rows(PAGE_ROWS, vectors=True))
    ids = [str(r["id"]) for r in listed]
    assert len(ids) == len(set(ids)) == len(written)
    assert set(ids) == set(written)
    assert ids == sorted(ids)
    for row in random.sample(listed, 200):
        found = np.asarray(row["vector"], dtype=np.float32)
        assert np.allclose(found, written[str(row["id"])].vector, atol=1e-6)

    # The index as workers leave it (P:index:C, "<version> <content hash>" per id).
    index = Keys(stream_name).index(sink.collection)
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, len(written), 5000):
        batch = list(written.values())[start : start + 5000]
        pipe.hset(index, mapping={r.id: f"{r.version} {r.content_hash}" for r in batch})
    pipe.execute()
    drift, _ = verify([Stream(redis_client, stream_name, "g", "verify")], sink)
    assert drift.clean, (len(drift.missing), len(drift.changed), len(drift.unknown))
    assert (drift.rows, drift.indexed) == (len(written), len(written))

    assert _signatures(sink) == {i: r.version for i, r in written.items()}
    _repairs_at_scale(sink, written, redis_client, stream_name)


def _repairs_at_scale(
    sink: Sink, written: dict[str, Row], redis_client: redis.Redis, stream_name: str
) -> None:
    """``verify --repair``'s guards on 20,000 rows: 50 rows written behind embedq's back are
    within the default bound and would go; an index that lost 20 % of its ids (a partial
    loss, a wrong shard) is refused before anything is sent, and nothing is deleted."""
    streams = [Stream(redis_client, stream_name, "g", "verify")]
    index = Keys(stream_name).index(sink.collection)
    stray = _rows([f"stray-{uuid.uuid4().hex}" for _ in range(50)], np.random.default_rng(7))
    sink.upsert(stray)
    drift, held = verify(streams, sink)
    assert sorted(drift.unknown) == sorted(r.id for r in stray) and not drift.missing
    refuse_unproven(drift, held, streams, MaxDelete.parse(DEFAULT_MAX_DELETE))  # 50 of 20,050
    forgotten = random.sample(sorted(written), len(written) // 5)
    redis_client.hdel(index, *forgotten)
    drift, held = verify(streams, sink)
    assert len(drift.unknown) == len(forgotten) + len(stray)
    with pytest.raises(DeletesRefused, match=f"refused to delete {len(drift.unknown)} of"):
        refuse_unproven(drift, held, streams, MaxDelete.parse(DEFAULT_MAX_DELETE))
    assert sink.count() == len(written) + len(stray)  # refused: nothing was deleted
    assert redis_client.xlen(stream_name) == 0  # nor any delete sent


@pytest.fixture
def lite_file(tmp_path: Path) -> Iterator[Sink]:
    sink = Sink(str(tmp_path / "listing.db"), "", "listing", timeout_s=30)
    yield sink
    sink.close()


@pytest.mark.slow  # 20,000 rows written and listed: half a minute, no server to mark it
def test_every_row_of_a_large_lite_file_is_listed_once(
    lite_file: Sink, redis_client: redis.Redis, stream_name: str
) -> None:
    written = _filled(lite_file, _random_ids(LARGE))
    _lists_everything(lite_file, written, redis_client, stream_name)


def test_every_row_of_a_large_lite_server_is_listed_once(
    milvus_lite_server: MilvusLiteServer, redis_client: redis.Redis, stream_name: str
) -> None:
    sink = Sink(milvus_lite_server.uri, "", "listing", timeout_s=30)
    try:
        written = _filled(sink, _random_ids(LARGE))
        _lists_everything(sink, written, redis_client, stream_name)
    finally:
        sink.close()


def test_every_row_of_a_large_standalone_collection_is_listed_once(
    milvus_standalone: MilvusStandalone, redis_client: redis.Redis, stream_name: str
) -> None:
    collection = f"listing_{uuid.uuid4().hex[:8]}"
    sink = Sink(milvus_standalone.uri, milvus_standalone.token, collection, timeout_s=60)
    try:
        written = _filled(sink, _random_ids(LARGE))
        _lists_everything(sink, written, redis_client, stream_name)
    finally:
        sink.client.drop_collection(collection)
        sink.close()


def test_a_lite_file_of_five_thousand_rows_is_not_cut_at_the_first_page(
    lite_file: Sink,
) -> None:
    # The old keyset listing yielded ~1,003 of these 5,000 rows.
    ids = _random_ids(5000)
    _filled(lite_file, ids)
    listed = [str(r["id"]) for r in lite_file.rows(batch_size=1000)]  # the old page size
    assert sorted(listed) == sorted(ids)
    assert sorted(_signatures(lite_file)) == sorted(ids)


def test_ids_that_need_quoting_are_listed_across_many_pages(lite_file: Sink) -> None:
    # Every id holds a quote, a backslash and a line break, so every bound a page or a
    # cut puts in a filter does.
    odd = ['"', "\\", "\n", "\r", "\t", "'", "é", "\x01"]
    ids = [f'{uuid.uuid4().hex[:6]}{odd[i % 8]}"q\\{odd[i % 5]}\n{i}' for i in range(300)]
    random.shuffle(ids)
    _filled(lite_file, ids, sparse=True)
    listed = list(lite_file.rows(batch_size=7, vectors=True))
    assert sorted(str(r["id"]) for r in listed) == sorted(ids)
    assert len({str(r["id"]) for r in listed}) == len(ids)
    by_id = {str(r["id"]): r for r in listed}
    for i, doc_id in enumerate(ids):
        sparse = by_id[doc_id]["sparse"]
        weights = dict(sparse) if not isinstance(sparse, dict) else sparse
        assert {int(k): round(float(v), 3) for k, v in weights.items()} == {i: 0.5, i + 7: 0.25}
        assert len(by_id[doc_id]["vector"]) == DIMENSION


def test_rows_written_while_listing_make_it_fail_rather_than_come_up_short(
    lite_file: Sink,
) -> None:
    _filled(lite_file, _random_ids(300))
    listing = lite_file.rows(batch_size=50)
    first = next(listing)
    # Ids that sort before every listed one land in a span already listed.
    early = [f"!{i}" for i in range(5)]
    lite_file.upsert(_rows(early, np.random.default_rng(1)))
    with pytest.raises(SinkUnavailable, match="305"):
        list(listing)
    assert str(first["id"]) not in early
