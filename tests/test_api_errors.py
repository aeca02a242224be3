"""Every gateway error in OpenAI's shape (issue 27 item 2) and ``dimensions`` (item 3):
unknown routes and methods, lone surrogates, oversize and invalid filters (no schema
internals), the native size accepted, a smaller one only for a Matryoshka model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from embedq.core.config import Settings
from embedq.model.encoder import Encoder
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .support.api_fixtures import gateway, running

SCHEMA_WORDS = ("FieldSchema", "VarChar", "field_name", "DataType", "JSON", "vector", "schema")


@pytest.fixture
def tiny_worker(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> Iterator[Worker]:
    s = settings.replace(drain=False, block_ms=100)
    worker = assemble(s, Stream(redis_client, s.stream, s.group, s.consumer), tiny_encoder, sink)
    with running(worker):
        yield worker


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body  # OpenAI's shape, not FastAPI's {"detail": ...}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_every_error_is_openai_shaped_and_blames_the_right_party(
    settings: Settings, tiny_worker: Worker, tiny_encoder: Encoder, sink: Sink
) -> None:
    served = settings.replace(model=str(tiny_encoder.model_dir))
    with gateway(served, sink=sink) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert _error(http.get("/v1/nothing"), 404)["code"] == "not_found"
        wrong_method = http.get("/v1/embeddings")
        assert _error(wrong_method, 405)["code"] == "method_not_allowed"
        assert "POST" in wrong_method.headers["allow"]
        assert _error(http.put("/v1/search"), 405)["code"] == "method_not_allowed"

        # A lone surrogate is valid JSON, not Unicode: 422 naming the input, never a 500.
        lone = b'{"input": ["fine", "a\\ud800b"]}'
        headers = {"content-type": "application/json"}
        error = _error(http.post("/v1/embeddings", content=lone, headers=headers), 422)
        assert error["param"] == "input[1]" and "input[1]" in error["message"]
        one = b'{"input": "\\udfff"}'
        assert _error(http.post("/v1/embeddings", content=one, headers=headers), 422)
        query = b'{"query": "x\\ud83d"}'
        error = _error(http.post("/v1/search", content=query, headers=headers), 422)
        assert error["param"] == "query"

        # A huge id list is the client's to shorten: 413, never a 503 inviting retries.
        ids = ", ".join(f'"{i:08d}"' for i in range(200_000))
        huge = http.post("/v1/search", json={"query": "x", "filter": f"id in [{ids}]"})
        error = _error(huge, 413)
        assert error["param"] == "filter" and "retry-after" not in huge.headers

        # An invalid filter is 422 without the collection's schema in the answer.
        for where in ("meta[[ nonsense", "no_such_field == 3", "vector > 1"):
            bad = http.post("/v1/search", json={"query": "x", "filter": where})
            error = _error(bad, 422)
            assert error["param"] == "filter", where
            assert not [w for w in SCHEMA_WORDS if w in error["message"]], error["message"]
            assert "vectors" not in error["message"]  # the collection's name either

        # dimensions: the native size is accepted (OpenAI's clients send it).
        native = tiny_encoder.width
        plain = http.post("/v1/embeddings", json={"input": ["a b c"]}).json()
        sized = http.post("/v1/embeddings", json={"input": ["a b c"], "dimensions": native})
        assert sized.status_code == 200, sized.text
        assert sized.json()["data"][0]["embedding"] == plain["data"][0]["embedding"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        got = client.embeddings.create(input="a b c", model=tiny_encoder.name, dimensions=native)
        assert len(got.data[0].embedding) == native
        # A model not trained for shortening: smaller is refused; larger always is.
        for dimensions in (native // 2, native + 1, 0, -3):
            r = http.post("/v1/embeddings", json={"input": "a", "dimensions": dimensions})
            assert _error(r, 422)["param"] == "dimensions", dimensions
        # Still serving after all that.
        assert http.post("/v1/embeddings", json={"input": "ok"}).status_code == 200


def test_a_matryoshka_model_answers_shortened_renormalised_vectors(
    settings: Settings, tiny_worker: Worker, tiny_model: Path, tmp_path: Path
) -> None:
    # The same weights (the same fingerprint) with a model card declaring Matryoshka.
    card = tmp_path / "tiny-matryoshka"
    shutil.copytree(tiny_model, card)
    (card / "README.md").write_text("---\ntags:\n- matryoshka\n---\n# tiny\n")
    with gateway(settings.replace(model=str(card))) as url, httpx.Client(timeout=60) as http:
        full = http.post(f"{url}/v1/embeddings", json={"input": "shorten me"}).json()
        short = http.post(f"{url}/v1/embeddings", json={"input": "shorten me", "dimensions": 8})
        assert short.status_code == 200, short.text
        assert short.json()["model"] == "tiny-matryoshka"
        vector = np.asarray(full["data"][0]["embedding"], dtype=np.float32)
        want = vector[:8] / np.linalg.norm(vector[:8])
        got = np.asarray(short.json()["data"][0]["embedding"], dtype=np.float32)
        assert got.shape == (8,) and np.allclose(got, want, atol=1e-6)
