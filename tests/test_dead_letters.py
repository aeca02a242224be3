"""Bad input end to end: each kind of bad entry reaches the dead-letter stream with its own
reason while the good entries batched with it land; ``embedq dlq`` lists, shows, retries
and purges dead letters. Real ``embedq worker`` processes, real Redis, real Milvus Lite.

The model here is a tiny real BERT (random weights, one layer, 64 positions) whose
embedding table has 30000 rows while its tokenizer — the packaged all-MiniLM-L6-v2 one —
knows 30522 tokens. That mismatch is a real misconfiguration (a tokenizer with added or
extra tokens paired with a smaller checkpoint), and torch really raises ``IndexError:
index out of range in self`` in the forward pass of any batch holding a token id of 30000
or more, e.g. the ``##ⁿ`` of "xⁿ". No fake: the worker meets a model that raises on one
text, as a model with a corrupt or mismatched vocabulary does in production.
"""

from __future__ import annotations

import json
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest
import redis

from embedq.model.encoder import Encoder
from embedq.sink.milvus import Sink

from .conftest import REDIS_URL, corpus_rows
from .support.cli import JSON_LOGS
from .support.cli import embedq as run_cli
from .support.tiny_models import EMBEDDING_ROWS

RAISES = "the velocity xⁿ grows"  # "##ⁿ" is token 30080: past the embedding table


def good_rows(encoder: Encoder, n: int) -> list[dict[str, Any]]:
    """Short corpus texts whose tokens the tiny model's embedding table covers."""
    rows = corpus_rows("short.jsonl", n + 20)
    tokens = encoder.tokenize([r["text"] for r in rows])
    return [r for r, t in zip(rows, tokens, strict=True) if max(t.ids) < EMBEDDING_ROWS][:n]


def embedq(*args: str) -> CompletedProcess[str]:
    """The CLI with JSON logs: the tests read the worker's log events from its stderr."""
    return run_cli(*args, env=JSON_LOGS)


def drain(stream: str, milvus_uri: str, model: Path, *extra: str) -> str:
    """Run one ``embedq worker --drain`` to the end; its log."""
    done = embedq(
        "worker",
        *("--redis-url", REDIS_URL, "--stream", stream, "--group", "g", "--consumer", "w"),
        *("--milvus-uri", milvus_uri, "--collection", "bad", "--model", str(model)),
        *("--device", "cpu", "--drain", "--block-ms", "100", "--read-count", "16"),
        *("--max-text-bytes", "4000", "--max-meta-bytes", "256"),
        *extra,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


OVERLONG = "a sentence that keeps going " * 40  # ~200 tokens, the model takes 64

# (fields, reason with --on-overlong reject, reason with truncate; None: it lands)
BAD_INPUT: list[tuple[dict[str, Any], str, str | None]] = [
    ({"text": "a text without an id"}, "missing_id", "missing_id"),
    ({"id": "no-text"}, "missing_text", "missing_text"),
    ({"id": "empty", "text": ""}, "empty_text", "empty_text"),
    ({"id": "blank", "text": " \t\n "}, "empty_text", "empty_text"),
    ({"id": "latin1", "text": b"caf\xe9 au lait"}, "invalid_utf8", "invalid_utf8"),
    ({"id": "overlong", "text": OVERLONG}, "overlong", None),
    ({"id": "huge-text", "text": "x" * 5000}, "text_too_large", "text_too_large"),
    (
        {"id": "huge-meta", "text": "ok", "meta": json.dumps({"k": "v" * 300})},
        "meta_too_large",
        "meta_too_large",
    ),
    ({"id": "i" * 600, "text": "an id longer than the primary key"}, "id_too_long", "id_too_long"),
    ({"id": "meta-list", "text": "ok", "meta": "[1, 2]"}, "meta_not_object", "meta_not_object"),
    ({"id": "meta-junk", "text": "ok", "meta": "{oops"}, "meta_not_object", "meta_not_object"),
    ({"id": "model-raises", "text": RAISES}, "encode_failed", "encode_failed"),
]


def dlq_by_key(client: redis.Redis, stream: str) -> dict[bytes, dict[bytes, bytes]]:
    """Dead-letter entries keyed by their id field (or text, for the one without an id)."""
    return {f.get(b"id") or f[b"text"]: f for _, f in client.xrange(f"{stream}:dlq", "-", "+")}


def key_of(fields: dict[str, Any]) -> bytes:
    value = fields.get("id", fields.get("text"))
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.mark.parametrize("policy", ["reject", "truncate"])
def test_each_bad_input_is_dead_lettered_with_its_reason_and_the_good_ones_land(
    policy: str,
    redis_client: redis.Redis,
    stream_name: str,
    tmp_path: Path,
    tiny_encoder: Encoder,
) -> None:
    good = good_rows(tiny_encoder, 60)
    pipe = redis_client.pipeline(transaction=False)
    for i, row in enumerate(good):
        pipe.xadd(stream_name, {"id": row["id"], "text": row["text"]})
        if i % 5 == 2 and i // 5 < len(BAD_INPUT):  # one bad entry among every five
            pipe.xadd(stream_name, BAD_INPUT[i // 5][0])
    pipe.execute()
    milvus_uri = str(tmp_path / "milvus.db")

    log = drain(stream_name, milvus_uri, tiny_encoder.model_dir, "--on-overlong", policy)

    expected = {
        key_of(f): (reject if policy == "reject" else truncate) for f, reject, truncate in BAD_INPUT
    }
    dead = dlq_by_key(redis_client, stream_name)
    assert {k: f[b"_dlq_reason"].decode() for k, f in dead.items()} == {
        k: r for k, r in expected.items() if r is not None
    }
    for fields, _, _ in BAD_INPUT:
        if key_of(fields) in dead:
            letter = dead[key_of(fields)]
            assert letter[b"_dlq_error"], "every dead letter says why"
            for name, value in fields.items():  # the original bytes, kept exactly
                raw = value if isinstance(value, bytes) else str(value).encode()
                assert letter[name.encode()] == raw
    assert b"IndexError" in dead[b"model-raises"][b"_dlq_error"]
    assert '"batch_split"' in log  # the good texts batched with it were not given up

    landing = good + ([{"id": "overlong", "text": OVERLONG}] if policy == "truncate" else [])
    sink = Sink(milvus_uri, "", "bad", timeout_s=10)
    try:
        sink.client.load_collection("bad")
        assert sink.count() == len(landing)
        stored = {r["id"]: r for r in sink.get([r["id"] for r in landing])}
        reference = tiny_encoder.encode([r["text"] for r in landing])
        for row, ref in zip(landing, reference, strict=True):
            vec = np.asarray(stored[row["id"]]["vector"], dtype=np.float32)
            cosine = vec @ ref / np.linalg.norm(vec) / np.linalg.norm(ref)
            assert cosine >= 0.9999, row["id"]
    finally:
        sink.close()
    stopped = next(json.loads(line) for line in log.splitlines() if '"worker_stopped"' in line)
    assert stopped["truncated"] == (1 if policy == "truncate" else 0)
    assert redis_client.xpending(stream_name, "g")["pending"] == 0


def test_dlq_list_show_retry_purge_and_a_retried_entry_lands_once_fixed(
    redis_client: redis.Redis, stream_name: str, tmp_path: Path, tiny_model: Path
) -> None:
    redis_client.xadd(stream_name, {"id": "long-one", "text": OVERLONG, "meta": '{"v": 1}'})
    redis_client.xadd(stream_name, {"id": "blank-one", "text": "  "})
    redis_client.xadd(stream_name, {"id": "fine", "text": "a short text"})
    milvus_uri = str(tmp_path / "milvus.db")
    drain(stream_name, milvus_uri, tiny_model, "--on-overlong", "reject")
    common = ("--redis-url", REDIS_URL, "--stream", stream_name)

    listed = embedq("dlq", "list", "--json", *common)
    assert listed.returncode == 0, listed.stderr
    letters = {d["id"]: d for d in (json.loads(line) for line in listed.stdout.splitlines())}
    assert {k: (d["reason"], d["deliveries"]) for k, d in letters.items()} == {
        "long-one": ("overlong", 1),
        "blank-one": ("empty_text", 1),
    }
    assert all(0 <= d["age_s"] < 600 for d in letters.values())
    table = embedq("dlq", "list", *common)
    assert "overlong" in table.stdout and "2 shown, 2 in" in table.stdout
    shown = embedq("dlq", "show", letters["long-one"]["dlq_id"], "--json", *common)
    detail = json.loads(shown.stdout)
    assert detail["fields"] == {"id": "long-one", "text": OVERLONG, "meta": '{"v": 1}'}
    assert "exceeds the model's 64 tokens" in detail["error"]
    assert embedq("dlq", "show", "1-1", *common).returncode == 1

    # The fix: the operator accepts truncation, then sends the entry back.
    retried = embedq("dlq", "retry", letters["long-one"]["dlq_id"], *common)
    assert retried.returncode == 0, retried.stderr
    assert "retried 1 of 1" in retried.stdout
    drain(stream_name, milvus_uri, tiny_model, "--on-overlong", "truncate")

    sink = Sink(milvus_uri, "", "bad", timeout_s=10)
    try:
        sink.client.load_collection("bad")
        assert sorted(r["id"] for r in sink.get(["long-one", "fine"], with_vectors=False)) == [
            "fine",
            "long-one",
        ]
        assert sink.get(["long-one"])[0]["meta"] == {"v": 1}
    finally:
        sink.close()
    remaining = [
        json.loads(x) for x in embedq("dlq", "list", "--json", *common).stdout.split("\n") if x
    ]
    assert [d["id"] for d in remaining] == ["blank-one"]
    assert embedq("dlq", "retry", *common).returncode == 2  # ids or --all, never nothing
    purged = embedq("dlq", "purge", "--all", *common)
    assert "purged 1" in purged.stdout
    assert redis_client.xlen(f"{stream_name}:dlq") == 0
    assert redis_client.xpending(stream_name, "g")["pending"] == 0
