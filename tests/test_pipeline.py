"""End to end on embedded defaults: real Redis, real Milvus Lite, the real packaged model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from structlog.testing import capture_logs

from embedq.core.config import Settings
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.producer.client import Producer
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker

from .conftest import corpus_rows


def dlq_entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
        for _, fields in client.xrange(f"{stream}:dlq")
    ]


def test_vectors_match_sentence_transformers(encoder: Encoder) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [r["text"] for r in corpus_rows("long.jsonl", 240)]
    ours = encoder.encode(texts)
    reference = SentenceTransformer(str(packaged_model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=32
    )
    cosine = (
        (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    )
    assert len(texts) >= 200
    assert cosine.min() >= 0.9999, f"worst cosine {cosine.min()}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_drained_run_writes_every_id_once_with_reference_vectors(
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    settings: Settings,
    encoder: Encoder,
) -> None:
    from sentence_transformers import SentenceTransformer

    rows = corpus_rows("long.jsonl", 200) + corpus_rows("short.jsonl", 100)
    producer = Producer(redis_client, settings.stream)
    assert producer.enqueue(rows) == 300

    stats = make_worker().run()

    assert stats.texts == 300
    assert sink.count() == 300
    stored = {r["id"]: r for r in sink.get([r["id"] for r in rows])}
    assert set(stored) == {r["id"] for r in rows}
    reference = SentenceTransformer(str(packaged_model_dir()), device="cpu").encode(
        [r["text"] for r in rows], normalize_embeddings=True
    )
    for row, ref in zip(rows, reference, strict=True):
        vec = np.asarray(stored[row["id"]]["vector"], dtype=np.float32)
        assert float(vec @ ref / np.linalg.norm(vec) / np.linalg.norm(ref)) >= 0.9999
        assert stored[row["id"]]["text"] == row["text"]
    info = make_worker().stream.lag()
    assert info.pending == 0
    assert info.lag == 0
    assert info.length == 300


def test_enqueueing_the_same_ids_again_keeps_one_row_with_the_new_vector(
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    settings: Settings,
    encoder: Encoder,
) -> None:
    producer = Producer(redis_client, settings.stream)
    producer.enqueue(
        [{"id": f"doc-{i}", "text": f"the first version of document {i}"} for i in range(20)]
    )
    make_worker().run()
    # Second round: new texts for the same ids, one id sent twice in the same window.
    producer.enqueue(
        [
            {"id": f"doc-{i}", "text": f"a rewritten text about topic {i}", "meta": {"v": 2}}
            for i in range(20)
        ]
    )
    producer.enqueue([{"id": "doc-3", "text": "the final word on doc three", "meta": {"v": 3}}])
    make_worker().run()

    assert sink.count() == 20
    expected = {f"doc-{i}": f"a rewritten text about topic {i}" for i in range(20)}
    expected["doc-3"] = "the final word on doc three"
    stored = {r["id"]: r for r in sink.get(list(expected))}
    for doc_id, text in expected.items():
        ref = encoder.encode([text])[0]
        vec = np.asarray(stored[doc_id]["vector"], dtype=np.float32)
        assert float(vec @ ref) >= 0.9999, doc_id
        assert stored[doc_id]["text"] == text
    assert stored["doc-3"]["meta"] == {"v": 3}
    assert make_worker().stream.lag().pending == 0


BAD_ENTRIES: list[tuple[dict[str, Any], str]] = [
    ({"text": "no id here"}, "missing_id"),
    ({"id": "bad-no-text"}, "missing_text"),
    ({"id": "bad-utf8", "text": b"caf\xe9 au lait"}, "invalid_utf8"),
    ({"id": "bad-meta-list", "text": "ok text", "meta": "[1, 2, 3]"}, "meta_not_object"),
    ({"id": "bad-meta-json", "text": "ok text", "meta": "{not json"}, "meta_not_object"),
    ({"id": "bad-empty", "text": "   "}, "empty_text"),
]


def test_bad_entries_are_dead_lettered_and_good_ones_in_the_same_batch_land(
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    settings: Settings,
) -> None:
    good = corpus_rows("short.jsonl", 30)
    pipe = redis_client.pipeline()
    for i, row in enumerate(good):
        pipe.xadd(settings.stream, {"id": row["id"], "text": row["text"]})
        if i < len(BAD_ENTRIES):
            pipe.xadd(settings.stream, BAD_ENTRIES[i][0])
    pipe.execute()

    with capture_logs() as logs:
        stats = make_worker().run()

    assert sink.count() == len(good)
    assert stats.dead_lettered == len(BAD_ENTRIES)
    dead = dlq_entries(redis_client, settings.stream)
    assert sorted(d["_dlq_reason"] for d in dead) == sorted(r for _, r in BAD_ENTRIES)
    for fields, reason in BAD_ENTRIES:
        match = [
            d
            for d in dead
            if d["_dlq_reason"] == reason
            and all(
                d.get(k) == (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in fields.items()
            )
        ]
        assert match, f"{reason}: original fields not kept in the dead-letter entry"
        assert match[0]["_dlq_error"]
    # The invalid UTF-8 bytes are kept exactly, so a fixed consumer can inspect them.
    raw = [
        f
        for _, f in redis_client.xrange(f"{settings.stream}:dlq")
        if f[b"_dlq_reason"] == b"invalid_utf8"
    ]
    assert raw[0][b"text"] == b"caf\xe9 au lait"
    logged = [e for e in logs if e["event"] == "dead_lettered"]
    assert len(logged) == len(BAD_ENTRIES) and all("reason" in e for e in logged)
    info = make_worker().stream.lag()
    assert info.pending == 0 and info.lag == 0 and info.dlq_length == len(BAD_ENTRIES)


def test_restarted_worker_first_finishes_its_own_pending_entries(
    redis_client: redis.Redis,
    make_worker: Callable[..., Worker],
    sink: Sink,
    settings: Settings,
) -> None:
    Producer(redis_client, settings.stream).enqueue(corpus_rows("short.jsonl", 40))
    worker = make_worker()
    worker.prepare()
    # Read a window as a worker that then dies before writing: entries stay pending on c1.
    assert len(worker.stream.read_new(25, 100)) == 25
    assert worker.stream.group_pending() == 25

    with capture_logs() as logs:
        make_worker().run()  # same consumer name, as after a pod restart

    assert any(e["event"] == "recovering_pending" and e["count"] == 25 for e in logs)
    assert sink.count() == 40
    assert make_worker().stream.group_pending() == 0


def test_collection_with_another_dimension_is_refused(
    make_worker: Callable[..., Worker], sink: Sink
) -> None:
    from embedq.core.errors import ConfigError

    sink.ensure_collection(128, "some-other-model")
    with pytest.raises(ConfigError, match="128-dimensional vectors but the model makes 384"):
        make_worker().prepare()
