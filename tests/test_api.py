"""The online gateway driven by the official ``openai`` client: vectors from the fleet's
worker equal sentence-transformers', base64 and float agree, usage counts tokens, search
finds a known row, and online requests never reach Milvus."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.producer.client import Producer
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker

from .support.api_fixtures import gateway, running, wait_for

TEXTS = [
    "How do I read a file line by line in Python?",
    "The quick brown fox jumps over the lazy dog.",
    "Redis streams keep entries until they are acknowledged.",
]


@pytest.fixture(scope="module")
def reference() -> Callable[[list[str]], np.ndarray[Any, Any]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")
    return lambda texts: np.asarray(model.encode(texts), dtype=np.float32)


@pytest.fixture
def fleet(
    settings: Settings, make_worker: Callable[..., Worker], sink: Sink
) -> Iterator[tuple[str, Worker]]:
    """One worker (the packaged model) and a gateway in front of it."""
    worker = make_worker(drain=False, block_ms=200)
    with running(worker), gateway(settings, sink=sink) as url:
        yield url, worker


def _cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)  # type: ignore[no-any-return]


def test_openai_client_gets_the_workers_vectors(
    fleet: tuple[str, Worker],
    reference: Callable[[list[str]], np.ndarray[Any, Any]],
    encoder: Encoder,
    sink: Sink,
) -> None:
    url, _worker = fleet
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    # The client asks for base64 by default and decodes it; float is asked explicitly too.
    got = client.embeddings.create(input=TEXTS, model="all-MiniLM-L6-v2")
    floats = client.embeddings.create(input=TEXTS, model=encoder.name, encoding_format="float")
    one = client.embeddings.create(input=TEXTS[1], model="all-MiniLM-L6-v2")

    assert [d.index for d in got.data] == [0, 1, 2]
    assert got.model == encoder.name
    vectors = np.asarray([d.embedding for d in got.data], dtype=np.float32)
    assert vectors.shape == (3, encoder.width)
    assert _cosines(vectors, reference(TEXTS)).min() >= 0.9999
    as_floats = np.asarray([d.embedding for d in floats.data], dtype=np.float32)
    assert np.array_equal(as_floats, vectors)  # float JSON and base64 carry the same float32
    assert np.array_equal(np.asarray(one.data[0].embedding, dtype=np.float32), vectors[1])

    tokens = sum(len(t.ids) for t in encoder.tokenize(TEXTS))
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    assert one.usage.prompt_tokens == len(encoder.tokenize([TEXTS[1]])[0].ids)
    # Online embeddings are answered, never written.
    assert sink.count() == 0


def test_raw_http_base64_and_float_agree(fleet: tuple[str, Worker], encoder: Encoder) -> None:
    url, _ = fleet
    body = {"input": TEXTS[:2], "model": "all-MiniLM-L6-v2"}
    as_float = httpx.post(f"{url}/v1/embeddings", json=body, timeout=30).json()
    as_b64 = httpx.post(
        f"{url}/v1/embeddings", json={**body, "encoding_format": "base64"}, timeout=30
    ).json()
    assert as_float["object"] == "list"
    for f, b in zip(as_float["data"], as_b64["data"], strict=True):
        assert f["object"] == b["object"] == "embedding"
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.array_equal(np.asarray(f["embedding"], dtype=np.float32), decoded)
        assert decoded.shape == (encoder.width,)
    assert as_float["usage"] == as_b64["usage"]


def test_search_finds_a_known_row(
    fleet: tuple[str, Worker], settings: Settings, sink: Sink
) -> None:
    url, _ = fleet
    rows = [
        {"id": "fox", "text": TEXTS[1], "meta": {"lang": "en", "kind": "pangram"}},
        {"id": "file", "text": TEXTS[0], "meta": {"lang": "en", "kind": "howto"}},
        {"id": "stream", "text": TEXTS[2], "meta": {"lang": "en", "kind": "doc"}},
    ]
    with Producer.connect(settings.redis_url, stream=settings.stream) as producer:
        producer.enqueue(rows)
    wait_for(lambda: sink.count() == 3, 60, "the worker to write the rows")

    found = httpx.post(
        f"{url}/v1/search", json={"query": "a fox jumping over a dog", "k": 2}, timeout=30
    ).json()
    assert found["data"][0]["id"] == "fox"
    assert len(found["data"]) == 2
    assert found["data"][0]["text"] == TEXTS[1]
    assert found["data"][0]["meta"] == {"lang": "en", "kind": "pangram"}
    assert found["usage"]["prompt_tokens"] > 0

    filtered = httpx.post(
        f"{url}/v1/search",
        json={"query": "a fox jumping over a dog", "k": 3, "filter": 'meta["kind"] == "doc"'},
        timeout=30,
    ).json()
    assert [h["id"] for h in filtered["data"]] == ["stream"]

    bad = httpx.post(
        f"{url}/v1/search", json={"query": "x", "filter": "meta[[ nonsense"}, timeout=30
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "filter"


def test_probes_metrics_and_model_names(
    fleet: tuple[str, Worker], redis_client: redis.Redis, settings: Settings
) -> None:
    url, _ = fleet
    assert httpx.get(f"{url}/healthz").status_code == 200
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["auth"] is False

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(input="hello", model="text-embedding-3-small")
    assert "all-MiniLM-L6-v2" in str(missing.value)
    client.embeddings.create(input="hello", model="sentence-transformers/all-MiniLM-L6-v2")

    metrics = httpx.get(f"{url}/metrics").text
    assert 'embedq_api_requests_total{endpoint="/v1/embeddings",status="200"} 1.0' in metrics
    assert 'embedq_api_requests_total{endpoint="/v1/embeddings",status="404"} 1.0' in metrics
    assert "embedq_api_queue_wait_seconds_count 1.0" in metrics
    assert "embedq_api_in_flight_requests 0.0" in metrics
    assert 'embedq_api_request_duration_seconds_bucket{endpoint="/v1/embeddings"' in metrics

    # The lane holds nothing pending once answered; the reply list is gone (all popped).
    lane = lane_stream(Keys(settings.stream).base)
    assert redis_client.xpending(lane, settings.group)["pending"] == 0
    assert not list(redis_client.scan_iter(match=f"{lane}:reply:*"))
