"""The gateway under abuse and failure: bad bodies and keys, a rate limit two gateway
processes share, no worker at all, a worker SIGKILLed holding a request."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from structlog.testing import capture_logs

from embedq.core.config import Settings
from embedq.core.keys import Keys, lane_stream
from embedq.model.encoder import Encoder
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .support.api_fixtures import ServeProcess, gateway, running, wait_for

KEY, OTHER = "sk-embedq-test-alpha-0123456789", "sk-embedq-test-beta-9876543210"


@pytest.fixture
def tiny_worker(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> Worker:
    s = settings.replace(drain=False, block_ms=200)
    return assemble(s, Stream(redis_client, s.stream, s.group, s.consumer), tiny_encoder, sink)


def _lane(settings: Settings) -> str:
    return lane_stream(Keys(settings.stream).base)


def test_bad_requests_get_their_status_and_a_json_error(
    settings: Settings, tiny_worker: Worker, tiny_encoder: Encoder
) -> None:
    limited = settings.replace(
        api_keys=f"{KEY}, {OTHER}", api_max_inputs=4, model=str(tiny_encoder.model_dir)
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    with running(tiny_worker), gateway(limited) as url:
        post = lambda body, headers=auth, **kw: httpx.post(  # noqa: E731
            f"{url}/v1/embeddings", headers=headers, timeout=30, **kw, **body
        )
        cases: list[tuple[str, httpx.Response, int, str | None]] = [
            ("empty string", post({"json": {"input": "  "}}), 422, "input"),
            ("empty list", post({"json": {"input": []}}), 422, "input"),
            ("non-string item", post({"json": {"input": ["a", 7]}}), 422, "input[1]"),
            ("token arrays", post({"json": {"input": [[101, 102]]}}), 422, "input[0]"),
            ("no input", post({"json": {"model": "x"}}), 422, "input"),
            ("too many", post({"json": {"input": ["a"] * 5}}), 413, "input"),
            ("not JSON", post({"content": b"{not json"}), 400, None),
            ("not an object", post({"json": ["a"]}), 400, None),
            (
                "bad format",
                post({"json": {"input": "a", "encoding_format": "int8"}}),
                422,
                "encoding_format",
            ),
            ("no key", post({"json": {"input": "a"}}, headers={}), 401, None),
            (
                "wrong key",
                post({"json": {"input": "a"}}, headers={"Authorization": "Bearer x"}),
                401,
                None,
            ),
            (
                "not bearer",
                post({"json": {"input": "a"}}, headers={"Authorization": KEY}),
                401,
                None,
            ),
            ("huge body", post({"content": b"x" * (settings.api_max_body_bytes + 1)}), 413, None),
        ]
        for name, response, status, param in cases:
            assert response.status_code == status, (name, response.text)
            error = response.json()["error"]
            assert error["message"], name
            assert error["param"] == param, name
            assert KEY not in response.text
        # After all that the gateway serves, and the other key works too.
        good = post({"json": {"input": ["still", "serving"]}})
        assert good.status_code == 200, good.text
        assert len(good.json()["data"]) == 2
        other = post({"json": {"input": "x"}}, headers={"Authorization": f"Bearer {OTHER}"})
        assert other.status_code == 200
        assert httpx.get(f"{url}/readyz").json()["auth"] is True
        # The official client sees the same errors as its own exception types.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.embeddings.create(input="a", model="all-MiniLM-L6-v2")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError):
            client.embeddings.create(input=[""], model=tiny_encoder.name)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def spawn(settings: Settings, *args: str, env: dict[str, str] | None = None) -> str:
        where = ["--redis-url", settings.redis_url, "--stream", settings.stream]
        where += ["--group", settings.group]
        proc = ServeProcess([*where, *args], tmp_path / f"serve-{len(started)}.log", env)
        started.append(proc)
        proc.wait_ready()
        return proc.url

    yield spawn
    for proc in started:
        text = proc.log_text()
        proc.stop()
        # Keys are never logged, whatever happened.
        assert KEY not in text and OTHER not in text
        assert "api_started" in text


def test_two_gateway_processes_share_one_keys_budget(
    settings: Settings, serve_process: Any
) -> None:
    env = {"EMBEDQ_API_KEYS": f"{KEY},{OTHER}", "EMBEDQ_API_RATE_LIMIT": "0.1"}
    a = serve_process(settings, "--rate-burst", "4", env=env)
    b = serve_process(settings, "--rate-burst", "4", env=env)
    auth = {"Authorization": f"Bearer {KEY}"}
    # A body the gateway refuses (400) only after the key and the rate limit passed: the
    # allowed requests answer at once, no worker needed.
    statuses: dict[str, list[int]] = {a: [], b: []}
    limited: list[httpx.Response] = []
    for i in range(10):
        url = (a, b)[i % 2]
        response = httpx.post(f"{url}/v1/embeddings", content=b"{", headers=auth, timeout=10)
        statuses[url].append(response.status_code)
        if response.status_code == 429:
            limited.append(response)
    allowed = sum(s == 400 for v in statuses.values() for s in v)
    # 4 at once, refilled at 0.1/s: one gateway alone would have let 5 of its own through.
    assert allowed in (4, 5), statuses
    assert 429 in statuses[a] and 429 in statuses[b], statuses
    for response in limited:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own bucket.
    other = httpx.post(
        f"{b}/v1/embeddings", content=b"{", headers={"Authorization": f"Bearer {OTHER}"}
    )
    assert other.status_code == 400
    client = openai.OpenAI(base_url=f"{a}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(input="a", model="all-MiniLM-L6-v2")
    assert refused.value.response.headers["retry-after"]


def test_no_worker_means_503_within_the_deadline_and_late_entries_are_skipped(
    settings: Settings, tiny_worker: Worker, redis_client: redis.Redis, tiny_encoder: Encoder
) -> None:
    quick = settings.replace(api_timeout_s=1.5, model=str(tiny_encoder.model_dir))
    with capture_logs() as logs, gateway(quick) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.embeddings.create(input=["nobody", "home"], model=tiny_encoder.name)
        took = time.monotonic() - started
        assert 1.4 <= took < 1.5 + 2.0
        assert unavailable.value.status_code == 503
        assert unavailable.value.response.headers["retry-after"] == "1"
        assert unavailable.value.response.json()["error"]["code"] == "deadline_exceeded"
        assert "api_auth_disabled" in [e["event"] for e in logs]

        # A worker that comes later acks the expired entries without encoding them.
        with capture_logs() as worker_logs, running(tiny_worker):
            lane = _lane(settings)
            wait_for(
                lambda: (
                    redis_client.xinfo_groups(lane)[0]["lag"] == 0
                    and redis_client.xpending(lane, settings.group)["pending"] == 0
                ),
                30,
                "the worker to settle the expired entries",
            )
            # ...and serves the next request.
            ok = client.embeddings.create(input="now", model=tiny_encoder.name)
            assert len(ok.data) == 1
        expired = [e for e in worker_logs if e["event"] == "online_expired"]
        assert sum(e["count"] for e in expired) == 2
        assert tiny_worker.metrics.encoded_texts._value.get() == 1  # only "now"
    assert not list(redis_client.scan_iter(match=f"{_lane(settings)}:reply:*"))


def test_worker_killed_mid_request_is_redone_by_another(
    settings: Settings, spawn_worker: Any, tiny_model: Path, tmp_path: Path
) -> None:
    def worker_args(name: str, *extra: str) -> list[str]:
        return [
            "--redis-url",
            settings.redis_url,
            "--stream",
            settings.stream,
            "--group",
            settings.group,
            "--consumer",
            name,
            "--milvus-uri",
            str(tmp_path / f"{name}.db"),
            "--model",
            str(tiny_model),
            "--device",
            "cpu",
            "--block-ms",
            "200",
            "--min-idle",
            "1",
            "--milvus-timeout",
            "0.5",
            "--reclaim-interval",
            "0.5",
            *extra,
        ]

    with gateway(settings.replace(api_timeout_s=60, model=str(tiny_model))) as url:
        doomed = spawn_worker(*worker_args("doomed", "--fault-point", "after_read"))
        result: dict[str, Any] = {}

        def ask() -> None:
            started = time.monotonic()
            result["response"] = httpx.post(
                f"{url}/v1/embeddings", json={"input": ["redo me", "and me"]}, timeout=90
            )
            result["took"] = time.monotonic() - started

        asker = threading.Thread(target=ask)
        asker.start()
        # It read the request's entries and died holding them (SIGKILL at after_read).
        assert doomed.wait(60) == -signal.SIGKILL, doomed.log_tail()
        assert "fault_injected" in doomed.log_text()
        spawn_worker(*worker_args("rescuer"), name="rescuer")
        asker.join(90)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert [d["index"] for d in response.json()["data"]] == [0, 1]
        assert result["took"] < 60
