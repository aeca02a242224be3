"""Scoped keys (issue 27 item 6): a key from ``EMBEDQ_API_KEYS_FILE`` carries a filter that
``/v1/search`` ANDs around whatever the client sends, and every hit is checked against it
alone: filters that try to widen the scope never return another tenant's row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from click.testing import CliRunner

from embedq.api.limits import load_keys_file
from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ConfigError
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink
from embedq.worker.launch import assemble

from .support.api_fixtures import gateway, running, wait_for

KEY_A, KEY_B = "sk-tenant-a-0123456789abcdef", "sk-tenant-b-fedcba9876543210"
WIDENING = [
    "",
    'id != ""',
    'id != "" or true',
    'meta["tenant"] == "b"',
    'meta["tenant"] == "a" or meta["tenant"] == "b"',
    'not (meta["tenant"] == "a")',
    '((meta["tenant"] == "b"))',
    'id != "") or (id != ""',  # unbalanced: tries to close the server's parenthesis
    "1 == 1) or (1 == 1",
    'meta["secret"] != "" or meta["tenant"] != "a"',
    'id like "b-%"',
]


@pytest.fixture
def rows_of_two_tenants(
    settings: Settings, redis_client: redis.Redis, tiny_encoder: Encoder, sink: Sink
) -> Iterator[Settings]:
    s = settings.replace(drain=False, block_ms=100, model=str(tiny_encoder.model_dir))
    worker = assemble(s, Stream(redis_client, s.stream, s.group, s.consumer), tiny_encoder, sink)
    rows = [
        {"id": f"{t}-{i}", "text": f"document {i} of tenant {t}", "meta": {"tenant": t}}
        for t in ("a", "b")
        for i in range(20)
    ]
    rows += [{"id": "b-secret", "text": "tenant b secret", "meta": {"tenant": "b", "secret": "x"}}]
    with running(worker):
        with Producer.connect(s.redis_url, stream=s.stream) as producer:
            producer.enqueue(rows)
        wait_for(lambda: sink.count() == len(rows), 60, "the rows to be written")
        yield s


def test_a_scoped_key_never_reads_another_tenants_row(
    rows_of_two_tenants: Settings, sink: Sink, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            [
                {"key": KEY_A, "name": "team-a", "filter": 'meta["tenant"] == "a"'},
                {"key": KEY_B, "name": "team-b", "filter": 'meta["tenant"] == "b"'},
            ]
        )
    )
    scoped = rows_of_two_tenants.replace(api_keys_file=str(keys))
    with gateway(scoped, sink=sink) as url, httpx.Client(base_url=url, timeout=60) as http:
        auth = {"Authorization": f"Bearer {KEY_A}"}
        searched = []
        for where in WIDENING:
            r = http.post(
                "/v1/search",
                json={"query": "tenant b secret document", "k": 50, "filter": where},
                headers=auth,
            )
            assert r.status_code in (200, 422), (where, r.text)
            if r.status_code == 200:
                searched.append(where)
                got = r.json()["data"]
                assert all(h["meta"]["tenant"] == "a" for h in got), (where, got)
                assert all(h["id"].startswith("a-") for h in got), where
        assert len(searched) >= len(WIDENING) - 2, searched
        # Not vacuous: Milvus ran the widening filters (only the unbalanced ones are 422),
        # and the scope itself lets A's own rows through, and B sees B's.
        mine = http.post("/v1/search", json={"query": "document", "k": 50}, headers=auth)
        assert {h["id"] for h in mine.json()["data"]} == {f"a-{i}" for i in range(20)}
        theirs = http.post(
            "/v1/search",
            json={"query": "document", "k": 5},
            headers={"Authorization": f"Bearer {KEY_B}"},
        )
        assert theirs.json()["data"] and all(
            h["meta"]["tenant"] == "b" for h in theirs.json()["data"]
        )
        # An unknown key is still refused.
        assert http.post("/v1/search", json={"query": "x"}).status_code == 401
        metrics = http.get("/metrics").text
    # Metering by key name, never the key: Prometheus and `embedq usage` (Redis, shared).
    assert 'embedq_api_key_inputs_total{key="team-b"} 1.0' in metrics
    assert 'embedq_api_key_tokens_total{key="team-a"}' in metrics
    assert KEY_A not in metrics and KEY_B not in metrics
    s = rows_of_two_tenants
    args = ["usage", "--redis-url", s.redis_url, "--stream", s.stream, "--json"]
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0, shown.output
    table = json.loads(shown.output)
    assert table["team-b"]["requests"] == table["team-b"]["inputs"] == 1
    assert table["team-a"]["requests"] == len(searched) + 1 and table["team-a"]["tokens"] > 0
    assert KEY_A not in shown.output
    assert "team-a" in CliRunner().invoke(main, args[:-1]).output


def test_a_bad_keys_file_is_one_line_without_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps([{"key": KEY_A}]))
    with pytest.raises(ConfigError) as refused:
        load_keys_file(str(bad))
    assert KEY_A not in str(refused.value) and "\n" not in str(refused.value)
    bad.write_text("{not json " + KEY_A)
    with pytest.raises(ConfigError) as unreadable:
        load_keys_file(str(bad))
    assert KEY_A not in str(unreadable.value)
