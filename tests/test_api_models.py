"""One model per answer (issue 26 item 4, issue 27 item 1): during a rollout one worker
serves the old model and one the new on the same lane; the gateway returns only its own
model's vectors, labelled with its name, and ``/v1/search`` never blames the client's filter
for a collection of another model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import redis

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.model.encoder import Encoder
from embedq.model.identity import configured_identity, identity_of
from embedq.queue.online_wire import (
    Stamp,
    entry_fields,
    pack_failure,
    pack_mismatch,
    pack_reply,
    unpack_reply,
)
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble

from .support.api_fixtures import gateway_app, running
from .support.tiny_models import tiny_bert

TEXTS = [f"rollout text number {i}: the same words for both models" for i in range(8)]


@pytest.fixture(scope="module")
def twin_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adversary's case: the tiny model's architecture, dimensions and folder name,
    other weights (a fine-tuned twin), so neither the name nor the size tells them apart."""
    return tiny_bert(tmp_path_factory.mktemp("twin") / tiny_model.name, seed=1)


def _unit(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)  # type: ignore[no-any-return]


def test_an_answer_names_its_model_and_a_worker_refuses_another_models_entry() -> None:
    stamp = Stamp("org/model-a", "0123456789abcdef")
    vector = np.arange(4, dtype=np.float32)
    ok = unpack_reply(pack_reply(stamp, 3, 7, vector))
    assert (ok.index, ok.tokens, ok.model, ok.fingerprint) == (
        3,
        7,
        "org/model-a",
        stamp.fingerprint,
    )
    assert np.array_equal(ok.vector, vector) and not ok.mismatch
    failed = unpack_reply(pack_failure(stamp, 1, "too long"))
    assert failed.vector is None and failed.error == "too long" and failed.model == "org/model-a"
    other = unpack_reply(pack_mismatch(stamp, 2))
    assert other.mismatch and other.vector is None and other.index == 2

    def fields(model: tuple[str, str]) -> dict[bytes, bytes]:
        made = entry_fields("r", 0, "t", "reply", 0, model=model)
        return {k.encode(): v.encode() for k, v in made.items()}

    assert stamp.serves(fields(("org/model-a", stamp.fingerprint)))
    assert not stamp.serves(fields(("org/model-a", "fedcba9876543210")))  # same name, twin
    assert stamp.serves(fields(("", "")))  # an entry naming no model (an older gateway)
    assert not stamp.serves(fields(("org/model-b", "")))  # a gateway that knows names only


def test_the_gateways_identity_is_the_workers(tiny_model: Path, tiny_encoder: Encoder) -> None:
    assert configured_identity(str(tiny_model)) == identity_of(tiny_encoder)
    # --dimensions at the native size truncates nothing: the same fingerprint.
    assert configured_identity(str(tiny_model), tiny_encoder.width) == identity_of(tiny_encoder)


@pytest.fixture
def two_models(
    settings: Settings,
    redis_client: redis.Redis,
    sink: Sink,
    tiny_model: Path,
    twin_model: Path,
) -> Iterator[tuple[Settings, Encoder, Encoder]]:
    """A worker on the tiny model (collection ``va``) and one on its twin (``vb``), both
    serving the one lane of ``settings.stream``."""
    tiny_encoder = Encoder(str(tiny_model), device="cpu")
    twin = Encoder(str(twin_model), device="cpu")
    base = settings.replace(model=str(tiny_model), drain=False, block_ms=100, api_timeout_s=30)
    workers = [
        assemble(
            base.replace(consumer=consumer, collection=collection),
            Stream(redis_client, base.stream, base.group, consumer),
            encoder,
            sink.sibling(collection, create=True),
        )
        for consumer, collection, encoder in (("a", "va", tiny_encoder), ("b", "vb", twin))
    ]
    try:
        with running(workers[0]), running(workers[1]):
            yield base, tiny_encoder, twin
    finally:
        lane = Keys(lane_stream(Keys(base.stream).base), online=True)
        redis_client.delete(lane.stream)


def test_no_response_mixes_models_during_a_rollout(
    two_models: tuple[Settings, Encoder, Encoder], sink: Sink
) -> None:
    settings, model_a, model_b = two_models
    ids = [t.ids for t in model_a.tokenize(TEXTS)]
    want_a = _unit(model_a.forward(ids).vectors)
    want_b = _unit(model_b.forward(ids).vectors)
    assert np.max(np.sum(want_a * want_b, axis=1)) < 0.99  # the twins really differ
    with gateway_app(settings, sink=sink.sibling("va")) as (url, app), httpx.Client() as http:
        for _ in range(25):
            r = http.post(f"{url}/v1/embeddings", json={"input": TEXTS}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == model_a.name
            got = _unit(np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32))
            assert np.min(np.sum(got * want_a, axis=1)) >= 0.9999, "another model's vector"
        fleet = app.state.gateway.fleet
        assert fleet.resent > 0, "the twin's worker never took an input: nothing was tried"
        # The collection of its own model: searched (no rows yet), not refused.
        found = http.post(f"{url}/v1/search", json={"query": TEXTS[0], "k": 3}, timeout=60)
        assert found.status_code == 200, found.text
        # Discovery: the workers published their identities; one serves this model.
        ready = http.get(f"{url}/readyz").json()
        assert ready["ready"] is True and ready["model"] == model_a.name
        assert ready["workers"] == 1 and ready["other_model_workers"] == {model_b.name: 1}
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [model_a.name]
    # vLLM's --served-model-name: those names only, the first in answers.
    named = settings.replace(api_served_model_name="team-embed, alias")
    with gateway_app(named) as (url, _app), httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/v1/embeddings", json={"input": "x", "model": "alias"})
        assert r.status_code == 200 and r.json()["model"] == "team-embed", r.text
        wrong = http.post(f"{url}/v1/embeddings", json={"input": "x", "model": model_a.name})
        assert wrong.status_code == 404 and wrong.json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in http.get(f"{url}/v1/models").json()["data"]] == ["team-embed"]


def test_search_of_another_models_collection_never_blames_the_client(
    two_models: tuple[Settings, Encoder, Encoder], sink: Sink
) -> None:
    settings, _a, _b = two_models
    # The alias moved to the twin's collection under this gateway: a server-side refusal.
    with gateway_app(settings, sink=sink.sibling("vb")) as (url, _app), httpx.Client() as http:
        for where in ("", 'id != ""'):
            r = http.post(
                f"{url}/v1/search", json={"query": TEXTS[0], "k": 3, "filter": where}, timeout=60
            )
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "model_mismatch" and error["type"] == "server_error"
            assert error.get("param") != "filter"
