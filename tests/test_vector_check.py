"""Issue 25: ``embedq verify`` checks vectors, not only content hashes and versions.

Workers record a digest of each written row's vectors in the index (``embedq.sink.digest``);
``verify`` reports a row whose vectors are not those (rewritten by hand, hash and version
kept) as changed, and ``verify --sample N`` embeds rows again with the model and compares
(``embedq.ops.sampling``). Real Redis, Milvus Lite, the 2.3.5 server for the round trip.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import Keys
from embedq.model.encoder import Encoder
from embedq.model.sparse import EMPTY
from embedq.ops.sampling import sample
from embedq.ops.verify import repair, verify
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.queue.versions import Held, Versions, Written
from embedq.sink.digest import collection_tag, row_digest, vector_digest
from embedq.sink.milvus import Row, Sink, open_sink
from embedq.worker.launch import assemble

from .conftest import REDIS_URL
from .support import sink_fixtures
from .support.cli import embedq
from .support.servers import MilvusStandalone
from .support.sparse_models import build_bge_m3, build_splade

# pytest finds fixtures among a module's names; `from ... import served` would read to ruff
# as unused, and each test's `served` argument as a redefinition.
served = sink_fixtures.served
closing = sink_fixtures.closing

TEXTS = [f"vector check text number {i} about {w}" for i, w in enumerate("abcdefghijkl")]


def _rows(n: int = len(TEXTS)) -> list[dict[str, Any]]:
    return [{"id": f"d{i:02d}", "text": TEXTS[i], "meta": {"n": i}} for i in range(n)]


def _drain(
    settings: Settings, client: redis.Redis, encoder: Encoder, sink: Sink, rows: list[Any]
) -> None:
    Producer(client, settings.stream, group=settings.group).enqueue(rows)
    stream = Stream(client, settings.stream, settings.group, settings.consumer)
    stats = assemble(settings, stream, encoder, sink).run()
    assert stats.texts == len(rows)


def _streams(settings: Settings, client: redis.Redis) -> list[Stream]:
    return [Stream(client, settings.stream, settings.group, "verify")]


def _index(settings: Settings, client: redis.Redis) -> dict[str, str]:
    raw: Any = client.hgetall(Keys(settings.stream).index(settings.collection))
    return {k.decode(): v.decode() for k, v in raw.items()}


def _rewrite(sink: Sink, doc_id: str, vector: Any = None, sparse: Any = None) -> None:
    """Upsert ``doc_id`` by hand with other vectors, its text, hash and version kept."""
    fields = ["vector"] if sink.dimension != 0 else []
    fields += ["sparse"] if sink.sparse else []
    fields += ["text"] if sink.store_text else []
    stored = sink.client.query(
        sink.collection,
        ids=[doc_id],
        output_fields=["meta", "content_hash", "version", *fields],
        consistency_level="Strong",
    )[0]
    dense = np.asarray(stored["vector"], np.float32) if "vector" in stored else np.zeros(0)
    sink.upsert(
        [
            Row(
                id=doc_id,
                vector=(dense if vector is None else vector).astype(np.float32),
                text=stored.get("text", ""),
                meta=stored["meta"],
                content_hash=stored["content_hash"],
                version=stored["version"],
                sparse=stored.get("sparse") if sparse is None else sparse,
            )
        ]
    )


def _unit(rng: np.random.Generator, dim: int) -> Any:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _cli(settings: Settings, *args: str) -> Any:
    return embedq(
        "verify",
        "--json",
        "--redis-url",
        REDIS_URL,
        "--stream",
        settings.stream,
        "--group",
        settings.group,
        "--milvus-uri",
        settings.milvus_uri,
        "--collection",
        settings.collection,
        *args,
    )


# -- the digest and the index value --------------------------------------------------------


def test_digest_is_of_float32_bytes_sorted_sparse_pairs_and_a_collection_tag() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(16).astype(np.float32)
    tag = collection_tag("vectors")
    d = vector_digest(v, None, tag)
    assert len(d) == 13 and d.endswith("@" + tag) and d[:8] != "00000000"
    # What Milvus returns is a list of Python floats: the same float32 values, same digest.
    assert row_digest({"vector": v.tolist()}, tag, dense=True, sparse=False) == d
    w = v.copy()
    w[3] = np.nextafter(w[3], np.float32(10))  # one float, one ulp
    assert vector_digest(w, None, tag) != d
    assert vector_digest(v, None, collection_tag("vectors__abc")) != d  # other tag
    sparse = {7: 0.5, 2: float(np.float32(0.1)), 30000: 1.25}
    both = vector_digest(v, sparse, tag)
    shuffled = dict(reversed(list(sparse.items())))
    assert (
        row_digest({"vector": v.tolist(), "sparse": shuffled}, tag, dense=True, sparse=True) == both
    )
    assert both != d
    # An empty sparse vector is stored as EMPTY; a dense-only collection ignores sparse.
    assert vector_digest(None, {}, tag, has_sparse=True) == vector_digest(None, EMPTY, tag)
    assert vector_digest(None, None, tag, has_sparse=True) == vector_digest(None, EMPTY, tag)
    assert row_digest({"sparse": EMPTY}, tag, dense=False, sparse=True) == vector_digest(
        np.zeros(0, np.float32), {}, tag, has_sparse=True
    )


def test_settle_records_the_digest_deletes_keep_none_and_old_values_parse(
    redis_client: redis.Redis, stream_name: str
) -> None:
    v = Versions(redis_client, Keys(stream_name), "c")
    v.settle("g", "A", [Written("x", "1-0", "h1", "abcd0123@beef"), Written("y", "1-0", "h2")], [])
    v.settle("g", "A", [Written("z", "1-0", "-")], [])
    raw = redis_client.hgetall(Keys(stream_name).index("c"))
    assert raw == {b"x": b"1-0 h1 abcd0123@beef", b"y": b"1-0 h2", b"z": b"1-0 -"}
    assert v.held(["x", "y", "z", "w"]) == [
        Held("1-0", "h1", "abcd0123@beef"),
        Held("1-0", "h2", ""),  # written by an older worker: no digest
        Held("1-0", "-", ""),
        None,
    ]
    assert v.held(["z"])[0].deleted  # type: ignore[union-attr]
    assert dict(v.scan())["x"] == Held("1-0", "h1", "abcd0123@beef")
    # A newer write replaces the digest; a refused one leaves the index as it was.
    v.settle("g", "A", [Written("x", "2-0", "h3", "ffff0000@beef")], [])
    v.settle("g", "A", [Written("x", "3-0", "", "")], [])
    assert v.held(["x"]) == [Held("2-0", "h3", "ffff0000@beef")]
    # fence.lua reads only the version: the three-field value is still "this or newer".
    assert v.acquire("B", 60_000, [("x", "2-0"), ("x", "1-5")]) == ["stale", "stale"]


# -- verify compares digests ---------------------------------------------------------------


def test_verify_reports_a_vector_rewritten_by_hand_and_repair_fixes_it(
    served: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, closing: list[Sink]
) -> None:
    settings = served
    sink = open_sink(settings)
    closing.append(sink)
    _drain(settings, redis_client, tiny_encoder, sink, _rows())
    tag = collection_tag(sink.target)
    index = _index(settings, redis_client)
    assert all(len(value.split(" ")) == 3 and value.endswith("@" + tag) for value in index.values())
    streams = _streams(settings, redis_client)
    drift, _ = verify(streams, sink)
    assert drift.clean and drift.rows == len(TEXTS) and drift.vector_changed == []

    _rewrite(sink, "d03", vector=_unit(np.random.default_rng(3), 32))
    drift, found = verify(streams, sink)
    assert (drift.changed, drift.vector_changed, drift.missing, drift.unknown) == (
        ["d03"],
        ["d03"],
        [],
        [],
    )
    result = _cli(settings)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["changed"] == ["d03"] and report["vector_changed"] == ["d03"]

    assert repair(drift, found, streams).resent == 1
    assemble(
        settings, Stream(redis_client, settings.stream, settings.group, "c1"), tiny_encoder, sink
    ).run()
    drift, _ = verify(streams, sink)
    assert drift.clean, drift


def test_legacy_entries_and_other_collections_digests_are_not_compared(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> None:
    _drain(settings, redis_client, tiny_encoder, sink, _rows(4))
    key = Keys(settings.stream).index(settings.collection)
    index = _index(settings, redis_client)
    version, content_hash, digest = index["d00"].split(" ")
    redis_client.hset(key, "d00", f"{version} {content_hash}")  # an older worker wrote it
    version, content_hash, digest = index["d01"].split(" ")
    other = digest.split("@")[0] + "@" + collection_tag("vectors__elsewhere")
    redis_client.hset(key, "d01", f"{version} {content_hash} {other}")  # before a migration
    rng = np.random.default_rng(5)
    for doc_id in ("d00", "d01", "d02"):
        _rewrite(sink, doc_id, vector=_unit(rng, 32))
    drift, _ = verify(_streams(settings, redis_client), sink)
    assert (drift.changed, drift.vector_changed) == (["d02"], ["d02"])
    # The producer's --dedup reads the content hash from three-field values too.
    held = Versions(redis_client, Keys(settings.stream), settings.collection).held(["d02"])
    assert held[0] is not None and held[0].content_hash == index["d02"].split(" ")[1]


@pytest.mark.parametrize("kind", ["splade", "bge-m3"])
def test_sparse_digests_round_trip_through_milvus_lite(
    settings: Settings,
    redis_client: redis.Redis,
    tmp_path: Path,
    closing: list[Sink],
    kind: str,
) -> None:
    build = build_splade if kind == "splade" else build_bge_m3
    encoder = Encoder(str(build(tmp_path / "model")), device="cpu")
    sink = open_sink(settings)
    closing.append(sink)
    rows = [*_rows(6), {"id": "empty", "text": "a"}]  # BGE-M3 may weigh "a" at nothing
    _drain(settings, redis_client, encoder, sink, rows)
    assert sink.sparse and (sink.dimension == 0) == (kind == "splade")
    streams = _streams(settings, redis_client)
    drift, index = verify(streams, sink)
    assert drift.clean, drift
    digests = {k: v.split(" ")[2] for k, v in _index(settings, redis_client).items()}
    assert len(digests) == len(rows)
    again = sample(index, set(), sink, encoder, 100)  # the sparse weights embed the same
    assert (again.sampled, again.mismatched) == (len(rows), []), again

    stored = sink.client.query(
        settings.collection, ids=["d01"], output_fields=["sparse"], consistency_level="Strong"
    )[0]["sparse"]
    changed = {int(k): float(w) for k, w in stored.items()}
    first = min(changed)
    changed[first] = float(np.float32(changed[first] * 1.5))
    _rewrite(sink, "d01", sparse=changed)
    drift, _ = verify(streams, sink)
    assert drift.vector_changed == ["d01"]


def test_digests_round_trip_on_the_milvus_server(
    settings: Settings,
    redis_client: redis.Redis,
    tiny_encoder: Encoder,
    milvus_standalone: MilvusStandalone,
    closing: list[Sink],
) -> None:
    settings = settings.replace(
        milvus_uri=milvus_standalone.uri, collection=f"vc_{settings.stream.split(':')[-1]}"
    )
    sink = open_sink(settings)
    closing.append(sink)
    try:
        _drain(settings, redis_client, tiny_encoder, sink, _rows())
        streams = _streams(settings, redis_client)
        drift, _ = verify(streams, sink)
        assert drift.clean and drift.rows == len(TEXTS), drift
        _rewrite(sink, "d07", vector=_unit(np.random.default_rng(7), 32))
        drift, _ = verify(streams, sink)
        assert drift.vector_changed == ["d07"]
    finally:
        sink.client.drop_collection(settings.collection)


# -- --sample: embed again with the model ----------------------------------------------------


def test_sample_passes_a_clean_collection_and_flags_vectors_of_another_model(
    served: Settings, redis_client: redis.Redis, encoder: Encoder, closing: list[Sink]
) -> None:
    """Rows whose vectors came from another model, recorded with their digests as a worker
    with the wrong model would (a collection without a fingerprint): the digest check
    passes them, the sample does not."""
    settings = served
    sink = open_sink(settings)
    closing.append(sink)
    _drain(settings, redis_client, encoder, sink, _rows())
    streams = _streams(settings, redis_client)
    drift, index = verify(streams, sink)
    assert drift.clean
    clean = sample(index, set(), sink, encoder, 100)  # the packaged model, as the CLI's
    assert (clean.sampled, clean.mismatched, clean.unsampleable) == (len(TEXTS), [], [])
    assert clean.min_cosine is not None and clean.min_cosine > 0.999

    rng = np.random.default_rng(11)
    key = Keys(settings.stream).index(settings.collection)
    tag = collection_tag(sink.target)
    for doc_id in ("d02", "d09"):
        vector = _unit(rng, 384)
        _rewrite(sink, doc_id, vector=vector)
        version, content_hash, _ = _index(settings, redis_client)[doc_id].split(" ")
        digest = vector_digest(vector, None, tag)
        redis_client.hset(key, doc_id, f"{version} {content_hash} {digest}")
    assert verify(streams, sink)[0].clean

    result = _cli(settings, "--sample", "100")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["sampled"] == len(TEXTS) and report["sample_mismatch"] == ["d02", "d09"]
    assert report["changed"] == ["d02", "d09"] and report["vector_changed"] == []
    assert report["sample_min_cosine"] < 0.5


def test_sample_takes_the_text_from_the_stream_when_the_collection_stores_none(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, closing: list[Sink]
) -> None:
    settings = settings.replace(store_text=False)
    sink = open_sink(settings)
    closing.append(sink)
    _drain(settings, redis_client, tiny_encoder, sink, _rows(6))
    streams = _streams(settings, redis_client)
    drift, index = verify(streams, sink)
    assert drift.clean and not sink.store_text
    redis_client.xdel(settings.stream, index["d04"][0].version)  # trimmed: no text left
    _rewrite(sink, "d01", vector=_unit(np.random.default_rng(1), 32))
    found = sample(index, set(), sink, tiny_encoder, 10, rng=random.Random(0))
    assert found.sampled == 5 and found.unsampleable == ["d04"]
    assert found.mismatched == ["d01"] and found.min_cosine is not None
