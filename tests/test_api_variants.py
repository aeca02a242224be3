"""The gateway searches only collections of its own backend variant (issue 29): workers
record their index fingerprint on a collection (``--backend onnx --quantize int8`` included),
and ``embedq serve --backend/--quantize`` gives the gateway the same, so an int8 index is
refused (503 ``model_mismatch``) by an fp32 gateway and served by an int8 one, and the other
way round. Answers on the lane carry the fingerprint without the variant, so a gateway of
either variant takes the same workers' answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.model import onnx_backend
from embedq.model.encoder import Encoder
from embedq.model.identity import ModelIdentity, configured_identity
from embedq.queue.stream import Stream
from embedq.sink.milvus import Row, Sink
from embedq.worker.launch import assemble

from .support.api_fixtures import gateway_app, running

INT8 = {"backend": "onnx", "quantize": "int8"}


@pytest.fixture
def lane_worker(
    settings: Settings, redis_client: redis.Redis, sink: Sink, tiny_encoder: Encoder
) -> Iterator[Settings]:
    """A worker of the tiny model answering the lane; yields the gateway's settings."""
    base = settings.replace(drain=False, block_ms=100, api_timeout_s=30)
    worker = assemble(
        base.replace(collection="bulk"),
        Stream(redis_client, base.stream, base.group, base.consumer),
        tiny_encoder,
        sink.sibling("bulk", create=True),
    )
    try:
        with running(worker):
            yield base.replace(model=str(tiny_encoder.model_dir))
    finally:
        redis_client.delete(Keys(lane_stream(Keys(base.stream).base), online=True).stream)


def _collection(sink: Sink, name: str, identity: ModelIdentity) -> Sink:
    """Collection ``name`` as a worker of ``identity`` creates it."""
    made = sink.sibling(name, create=True)
    made.ensure_collection(identity.width, identity.name, fingerprint=identity.index_fingerprint)
    return made


def test_a_gateway_searches_only_its_own_variants_collection(
    lane_worker: Settings, sink: Sink, tiny_model: Path
) -> None:
    fp32 = configured_identity(str(tiny_model))
    int8 = configured_identity(str(tiny_model), variant=onnx_backend.variant(**INT8))
    assert fp32.fingerprint == int8.fingerprint != ""  # what answers carry: one model
    assert fp32.index_fingerprint != int8.index_fingerprint  # what collections record
    collections = {"fp32": _collection(sink, "v32", fp32), "int8": _collection(sink, "v8", int8)}
    gateways = {"fp32": lane_worker, "int8": lane_worker.replace(**INT8)}
    for variant, settings in gateways.items():
        for recorded, collection in collections.items():
            with gateway_app(settings, sink=collection) as (url, _app):
                r = httpx.post(f"{url}/v1/search", json={"query": "a query", "k": 3}, timeout=60)
            if recorded == variant:
                assert r.status_code == 200, (variant, recorded, r.text)
            else:
                assert r.status_code == 503, (variant, recorded, r.text)
                assert r.json()["error"]["code"] == "model_mismatch"


def test_a_search_while_adopt_moves_the_name_behind_an_alias_is_answered(
    lane_worker: Settings, sink: Sink, tiny_model: Path
) -> None:
    """``migrate --adopt`` renames the collection, then creates the alias under its old
    name: for a moment the name is nowhere. A search then is answered from the collection
    the alias names once it is there (seen on Milvus 2.3.5: a 500 ``internal error``)."""
    identity = configured_identity(str(tiny_model))
    live = _collection(sink, "live", identity)
    vector = np.full(identity.width, identity.width**-0.5, dtype=np.float32)
    live.upsert([Row("a", vector, "t", None, content_hash="h", version="1-0")])
    with gateway_app(lane_worker.replace(collection="live"), sink=live) as (url, _app):
        search = {"query": "a query", "k": 3}
        assert httpx.post(f"{url}/v1/search", json=search, timeout=60).status_code == 200
        live.client.rename_collection("live", "live__adopted")  # as Migration.adopt does

        def adopted() -> None:
            live.client.load_collection("live__adopted")
            live.client.create_alias("live__adopted", "live")

        realias = threading.Timer(0.1, adopted)
        realias.start()
        try:
            r = httpx.post(f"{url}/v1/search", json=search, timeout=60)
        finally:
            realias.join()
    assert r.status_code == 200, r.text
    assert [hit["id"] for hit in r.json()["data"]] == ["a"]
