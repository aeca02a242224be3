"""Sparse models: SPLADE (a SparseEncoder) and BGE-M3 dense + lexical weights from one
forward pass, equal to sentence-transformers and FlagEmbedding; their rows in Milvus Lite;
`embedq search` in dense, sparse and hybrid modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.errors import ConfigError
from embedq.model.encoder import Encoder
from embedq.model.model_spec import ModelSpec
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink import retrieval
from embedq.sink.milvus import Sink, open_sink
from embedq.sink.schema import model_fingerprint
from embedq.worker.launch import assemble

from .support import sink_fixtures
from .support.cli import embedq
from .support.sparse_models import bgem3_flag_model, build_bge_m3, build_splade

# pytest finds fixtures among a module's names; `from ... import served` would read to ruff
# as unused, and each test's `served` argument as a redefinition.
served = sink_fixtures.served
closing = sink_fixtures.closing

TEXTS = [
    "Redis streams deliver each entry to one consumer of a group",
    "a",
    "Milvus stores sparse vectors in an inverted index and scores them by inner product",
    "the quick brown fox jumps over the lazy dog " * 6,
]


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_splade(tmp_path_factory.mktemp("splade") / "model")


@pytest.fixture(scope="module")
def bge_m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bge_m3(tmp_path_factory.mktemp("bge-m3") / "model")


@pytest.fixture(scope="module")
def splade(splade_dir: Path) -> Encoder:
    return Encoder(str(splade_dir), device="cpu")


@pytest.fixture(scope="module")
def bge_m3(bge_m3_dir: Path) -> Encoder:
    return Encoder(str(bge_m3_dir), device="cpu")


def _same_sparse(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)  # the same token ids, nothing extra, nothing missing
    for token, weight in want.items():
        assert got[token] == pytest.approx(weight, rel=rel, abs=rel * 1e-2)


def _counted_forward(encoder: Encoder) -> list[int]:
    calls: list[int] = []
    encoder.model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# -- equality with the reference implementations -------------------------------------------


@pytest.mark.parametrize("strategy", ["max", "sum"])
def test_splade_equals_sparse_encoder(tmp_path: Path, strategy: str) -> None:
    from sentence_transformers import SparseEncoder

    model_dir = build_splade(tmp_path / "m", seed=3, strategy=strategy)
    encoder = Encoder(str(model_dir), device="cpu")
    assert encoder.width == 0 and encoder.head is not None and encoder.head.kind == "splade"
    # One padded batch of texts of very different lengths: padding must not leak in.
    got = encoder.forward([t.ids for t in encoder.tokenize(TEXTS)]).sparse
    want = SparseEncoder(str(model_dir), device="cpu").encode(TEXTS).to_dense().numpy()
    assert got is not None and len(got) == len(TEXTS)
    for row, reference in zip(got, want, strict=True):
        nonzero = np.nonzero(reference)[0]
        assert 0 < len(nonzero) < 30522 // 4  # a real sparse vector, not all or nothing
        _same_sparse(row, {int(i): float(reference[i]) for i in nonzero})


def test_bge_m3_equals_flag_embedding_from_one_forward_pass(
    bge_m3: Encoder, bge_m3_dir: Path
) -> None:
    assert ModelSpec.load(bge_m3_dir).bge_m3
    assert bge_m3.width == 32 and bge_m3.head is not None and bge_m3.head.kind == "bge-m3"
    calls = _counted_forward(bge_m3)
    batch = bge_m3.forward([t.ids for t in bge_m3.tokenize(TEXTS)])
    assert len(calls) == 1  # one pass gave both outputs for the whole batch
    want = bgem3_flag_model(bge_m3_dir).encode(
        TEXTS, max_length=bge_m3.max_seq_length, return_dense=True, return_sparse=True
    )
    np.testing.assert_allclose(batch.vectors, want["dense_vecs"], rtol=1e-5, atol=1e-6)
    assert np.allclose(np.linalg.norm(batch.vectors, axis=1), 1.0)  # CLS, normalised
    assert batch.sparse is not None
    special = {bge_m3.tokenizer.cls_token_id, bge_m3.tokenizer.eos_token_id}
    for got, lexical in zip(batch.sparse, want["lexical_weights"], strict=True):
        _same_sparse(got, {int(k): float(v) for k, v in lexical.items()})
        assert not special & set(got)


def test_bge_m3_head_that_does_not_fit_is_a_config_error(tmp_path: Path, bge_m3_dir: Path) -> None:
    import shutil

    import torch

    broken = tmp_path / "broken"
    shutil.copytree(bge_m3_dir, broken)
    torch.save(torch.nn.Linear(8, 1).state_dict(), broken / "sparse_linear.pt")
    with pytest.raises(ConfigError, match=r"sparse_linear\.pt does not fit"):
        Encoder(str(broken), device="cpu")


# -- through a worker into Milvus Lite, and back out with `embedq search` ------------------


def _drain(
    settings: Settings, client: redis.Redis, encoder: Encoder, rows: list[dict[str, Any]]
) -> Sink:
    Producer(client, settings.stream, group=settings.group).enqueue(rows)
    sink = open_sink(settings)
    stats = assemble(
        settings, Stream(client, settings.stream, settings.group, "c1"), encoder, sink
    ).run()
    assert stats.texts == len(rows)
    return sink


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return [{"id": f"doc-{i}", "text": t, "meta": {"n": i}} for i, t in enumerate(TEXTS)]


def test_splade_rows_land_sparse_only(
    settings: Settings,
    redis_client: redis.Redis,
    splade: Encoder,
    rows: list[dict[str, Any]],
    closing: list[Sink],
) -> None:
    sink = _drain(settings, redis_client, splade, rows)
    closing.append(sink)
    info = sink.client.describe_collection(settings.collection)
    names = {f["name"] for f in info["fields"]}
    assert "sparse" in names and "vector" not in names
    assert info["properties"]["embedq.fingerprint"] == model_fingerprint(splade)
    stored = sink.client.query(
        settings.collection, ids=["doc-2"], output_fields=["sparse"], consistency_level="Strong"
    )
    # The worker ran the four texts in one padded batch, as here.
    want = splade.forward([t.ids for t in splade.tokenize(TEXTS)]).sparse
    assert want is not None
    _same_sparse({int(k): v for k, v in stored[0]["sparse"].items()}, want[2])
    hits = retrieval.search(sink, splade, TEXTS[2], 2)  # auto: sparse, all it has
    assert "doc-2" in [h.id for h in hits]
    with pytest.raises(ConfigError, match=r"--mode hybrid: .* searched sparse"):
        retrieval.search(sink, splade, TEXTS[2], 2, mode="hybrid")


def test_bge_m3_rows_and_search_in_every_mode(
    served: Settings,
    redis_client: redis.Redis,
    bge_m3: Encoder,
    bge_m3_dir: Path,
    rows: list[dict[str, Any]],
) -> None:
    settings = served
    sink = _drain(settings, redis_client, bge_m3, rows)
    got = sink.client.query(
        settings.collection,
        ids=["doc-0"],
        output_fields=["vector", "sparse"],
        consistency_level="Strong",
    )[0]
    sink.close()
    batch = bge_m3.forward([t.ids for t in bge_m3.tokenize(TEXTS)])  # as the worker batched
    np.testing.assert_allclose(got["vector"], batch.vectors[0], rtol=1e-5, atol=1e-6)
    assert batch.sparse is not None
    _same_sparse({int(k): v for k, v in got["sparse"].items()}, batch.sparse[0])

    where = ["--milvus-uri", settings.milvus_uri, "--collection", settings.collection]
    found = {}
    for mode in ("dense", "sparse", "hybrid"):
        result = embedq(
            "search", TEXTS[2], "--model", str(bge_m3_dir), "--mode", mode, "--json", *where
        )
        assert result.returncode == 0, result.stderr
        found[mode] = [json.loads(hit)["id"] for hit in result.stdout.splitlines()]
    assert found["dense"][0] == "doc-2"  # its own text: cosine 1
    assert "doc-2" in found["sparse"][:2]
    assert found["hybrid"][0] == "doc-2"
    assert set(found["hybrid"]) == {r["id"] for r in rows}
    weighted = embedq(
        "search",
        TEXTS[2],
        "--model",
        str(bge_m3_dir),
        "--ranker",
        "weighted",
        "--weights",
        "1,0",
        "--json",
        *where,
    )
    assert json.loads(weighted.stdout.splitlines()[0])["id"] == "doc-2"  # JSON Lines


def test_search_mode_the_collection_cannot_serve_is_refused(
    served: Settings,
    redis_client: redis.Redis,
    encoder: Encoder,
    rows: list[dict[str, Any]],
) -> None:
    settings = served
    _drain(settings, redis_client, encoder, rows).close()
    where = ["--milvus-uri", settings.milvus_uri, "--collection", settings.collection]
    result = embedq("search", "x", "--mode", "sparse", *where)
    assert result.returncode == 2
    assert "--mode sparse" in result.stderr and "searched dense" in result.stderr
    bad = embedq("search", "x", "--ranker", "weighted", "--weights", "x", *where)
    assert bad.returncode == 2 and "--weights" in bad.stderr


def test_a_sparse_model_is_refused_a_dense_collection(
    settings: Settings,
    redis_client: redis.Redis,
    encoder: Encoder,
    splade: Encoder,
    rows: list[dict[str, Any]],
) -> None:
    sink = _drain(settings, redis_client, encoder, rows)
    try:
        with pytest.raises(ConfigError, match="has no sparse field"):
            sink.ensure_collection(splade.width, splade.name, sparse=True)
        with pytest.raises(ConfigError, match="sparse vectors only"):
            sink.ensure_collection(splade.width, splade.name)
        with pytest.raises(ConfigError, match="has no sparse field"):
            sink.ensure_collection(
                384, "bge-m3", sparse=True, fingerprint=model_fingerprint(encoder)
            )
    finally:
        sink.close()
