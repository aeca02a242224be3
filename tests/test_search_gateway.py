"""``embedq search --gateway URL`` (issue 28: each local search loads the model, 15-35 s on
a loaded machine): a running gateway embeds and searches, the command loads no model and
opens no Milvus, and its refusals are one line each."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq.core.config import Settings
from embedq.core.errors import ExitCode
from embedq.core.keys import Keys, lane_stream
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble

from .support.api_fixtures import free_port, gateway, running, wait_for
from .test_cli_errors import Mistake, check, embedq

KEY = "sk-search-gw-1234"
ROWS = [
    {"id": "fox", "text": "The quick brown fox jumps over the lazy dog.", "meta": {"k": 1}},
    {"id": "file", "text": "How do I read a file line by line in Python?", "meta": {"k": 2}},
    {"id": "stream", "text": "Redis streams keep entries until they are acked.", "meta": {"k": 3}},
]


@pytest.fixture
def served(
    settings: Settings,
    redis_client: redis.Redis,
    tiny_model: Path,
    tiny_encoder: Encoder,
    sink: Sink,
) -> Iterator[str]:
    """A worker (the tiny model) that wrote ROWS, and a gateway with a key before it."""
    base = settings.replace(model=str(tiny_model), drain=False, block_ms=100, api_timeout_s=30)
    worker = assemble(
        base, Stream(redis_client, base.stream, base.group, base.consumer), tiny_encoder, sink
    )
    Producer(redis_client, base.stream, group=base.group).enqueue(ROWS)
    try:
        with running(worker):
            wait_for(lambda: sink.count() == len(ROWS), 60, "the worker to write the rows")
            with gateway(base.replace(api_keys=KEY), sink=sink) as url:
                yield url
    finally:
        redis_client.delete(Keys(lane_stream(Keys(base.stream).base), online=True).stream)


def test_search_through_a_gateway_loads_no_model_and_opens_no_milvus(
    served: str, tmp_path: Path
) -> None:
    # A Milvus Lite path in a folder that is not there: the local path would stop on it.
    env = {
        "EMBEDQ_GATEWAY_URL": served,
        "EMBEDQ_GATEWAY_KEY": KEY,
        "EMBEDQ_MILVUS_URI": str(tmp_path / "absent" / "x.db"),
        "EMBEDQ_MODEL": str(tmp_path / "no-model-here"),
    }
    ran = embedq(("search", ROWS[1]["text"], "-k", "2", "--json"), env)
    assert ran.returncode == 0, ran.stderr
    hits = [json.loads(line) for line in ran.stdout.splitlines()]  # JSON Lines, as locally
    assert len(hits) == 2
    assert hits[0] == {
        "id": "file",
        "score": hits[0]["score"],
        "text": ROWS[1]["text"],
        "meta": {"k": 2},
    }
    assert hits[0]["score"] > 0.99
    shown = embedq(("search", ROWS[0]["text"], "-k", "1", "--gateway", served), env)
    assert shown.stdout.split()[1] == "fox", shown.stdout
    assert KEY not in ran.stdout + ran.stderr + shown.stdout + shown.stderr


def test_a_gateway_refusal_or_absence_is_one_line(served: str) -> None:
    wrong = embedq(("search", "x", "--gateway", served), {"EMBEDQ_GATEWAY_KEY": "sk-wrong"})
    check(wrong, Mistake(code=ExitCode.USAGE, says=(f"the gateway at {served} answered 401",)))
    closed = f"http://127.0.0.1:{free_port()}"
    absent = embedq(("search", "x", "--gateway", closed), {})
    check(absent, Mistake(code=ExitCode.CONNECT, says=(f"gateway unavailable at {closed}",)))
    sparse = embedq(("search", "x", "--gateway", served, "--mode", "hybrid"), {})
    check(sparse, Mistake(says=("--mode hybrid", "a gateway searches dense vectors only")))
    scheme = embedq(("search", "x", "--gateway", "127.0.0.1:8000"), {})
    check(scheme, Mistake(says=("--gateway 127.0.0.1:8000", "http://")))
