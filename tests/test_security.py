"""Credentials: Redis over TLS (rediss://) with ACL users and passwords, Milvus with a token
(a real Milvus 2.3.5 server with authorization on), and no secret in any output.

Every server here is real and private to the test: a TLS-only redis-server with a password
for the default user and an ACL user, made with a throwaway CA, and milvus-server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from embedq.core.errors import ConfigError
from embedq.sink.milvus import Row, Sink

from .conftest import MilvusServer, corpus_rows
from .support.cli import embedq
from .support.servers import RedisServer, make_tls_certs

DEFAULT_PASSWORD = "default-pw-7f3a91"
ACL_PASSWORD = "acl-pw-c0ffee42"
READONLY_PASSWORD = "ro-pw-5eed1234"
WRONG_TOKEN = "root:not-the-token-9c1e"
# At debug level the most is logged: a secret must stay out of that too.
DEBUG_LOGS = {"EMBEDQ_LOG_LEVEL": "debug"}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    base = tmp_path_factory.mktemp("tls-redis")
    server = RedisServer(
        base / "data",
        "--requirepass",
        DEFAULT_PASSWORD,
        # An ACL user for embedq, and one that may only read (to see NOPERM handled).
        "--user",
        "embedq",
        "on",
        f">{ACL_PASSWORD}",
        "~*",
        "&*",
        "+@all",
        "--user",
        "reader",
        "on",
        f">{READONLY_PASSWORD}",
        "~*",
        "+@read",
        "+ping",
        tls_dir=make_tls_certs(base / "tls"),
    ).start()
    yield server
    server.stop()


def tls_url(server: RedisServer, userinfo: str, with_ca: bool = True) -> str:
    assert server.tls_dir is not None
    query = f"?ssl_ca_certs={server.tls_dir / 'ca.crt'}" if with_ca else ""
    return server.url_for(userinfo) + query


def assert_no_secret(*outputs: str) -> None:
    for secret in (DEFAULT_PASSWORD, ACL_PASSWORD, READONLY_PASSWORD, WRONG_TOKEN, "Milvus"):
        for out in outputs:
            # "Milvus" as a word appears in messages; the token is "root:Milvus".
            needle = "root:Milvus" if secret == "Milvus" else secret
            assert needle not in out, f"{needle!r} leaked"


def test_worker_over_tls_with_an_acl_user_writes_to_milvus_with_a_token(
    tls_redis: RedisServer,
    milvus_server_factory: Callable[..., MilvusServer],
    tmp_path: Path,
) -> None:
    milvus = milvus_server_factory(authorization=True)
    rows = corpus_rows("short.jsonl", 30)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows))
    env = {
        **DEBUG_LOGS,
        "EMBEDQ_REDIS_URL": tls_url(tls_redis, f"embedq:{ACL_PASSWORD}"),
        "EMBEDQ_STREAM": "secure:tasks",
        "EMBEDQ_MILVUS_URI": milvus.uri,
        "EMBEDQ_MILVUS_TOKEN": milvus.token,
        "EMBEDQ_COLLECTION": "secure_vectors",
    }
    sent = embedq("enqueue", str(source), env=env)
    assert sent.returncode == 0, sent.stderr
    ran = embedq("worker", "--drain", "--block-ms", "200", env=env)
    assert ran.returncode == 0, ran.stderr
    assert f"embedded {len(rows)} texts" in ran.stdout
    lag = embedq("lag", "--json", env=env)
    assert lag.returncode == 0 and '"pending": 0' in lag.stdout, lag.stderr
    assert_no_secret(sent.stdout, sent.stderr, ran.stdout, ran.stderr, lag.stdout, lag.stderr)

    sink = Sink(milvus.uri, milvus.token, "secure_vectors", timeout_s=10)
    try:
        sink.ensure_collection(384, "m")
        assert sink.count() == len(rows)
    finally:
        sink.close()


def test_worker_with_a_wrong_redis_password_stops_with_one_clear_line(
    tls_redis: RedisServer, tmp_path: Path
) -> None:
    env = {
        **DEBUG_LOGS,
        "EMBEDQ_REDIS_URL": tls_url(tls_redis, "embedq:wrong-" + ACL_PASSWORD),
        "EMBEDQ_MILVUS_URI": str(tmp_path / "m.db"),
    }
    ran = embedq("worker", "--drain", env=env)
    assert ran.returncode == 2, ran.stderr
    assert "redis rejected the credentials" in ran.stderr and "Traceback" not in ran.stderr
    assert "wrong-" not in ran.stdout + ran.stderr
    assert_no_secret(ran.stdout, ran.stderr)


def test_an_acl_user_without_write_rights_gets_noperm_not_a_crash(tls_redis: RedisServer) -> None:
    env = {**DEBUG_LOGS, "EMBEDQ_REDIS_URL": tls_url(tls_redis, f"reader:{READONLY_PASSWORD}")}
    init = embedq("init", "--stream", "secure:ro", env=env)
    assert init.returncode == 2 and "NOPERM" in init.stderr and "Traceback" not in init.stderr
    # The same user may read: lag works.
    lag = embedq("lag", "--json", "--stream", "secure:ro", env=env)
    assert lag.returncode == 0, lag.stderr
    assert_no_secret(init.stdout, init.stderr, lag.stdout, lag.stderr)


def test_rediss_without_the_ca_fails_without_leaking_the_password(tls_redis: RedisServer) -> None:
    url = tls_url(tls_redis, f":{DEFAULT_PASSWORD}", with_ca=False)
    lag = embedq("lag", env={**DEBUG_LOGS, "EMBEDQ_REDIS_URL": url})
    assert lag.returncode == 3, lag.stderr  # CONNECT
    assert "redis unavailable" in lag.stderr and "Traceback" not in lag.stderr
    assert_no_secret(lag.stdout, lag.stderr)
    ok = tls_url(tls_redis, f":{DEFAULT_PASSWORD}")
    init = embedq("init", "--stream", "secure:default", env={**DEBUG_LOGS, "EMBEDQ_REDIS_URL": ok})
    assert init.returncode == 0 and "created at 0" in init.stdout, init.stderr
    assert_no_secret(init.stdout, init.stderr)


def test_a_wrong_milvus_token_is_a_config_error_that_hides_the_token(
    milvus_server_factory: Callable[..., MilvusServer],
) -> None:
    milvus = milvus_server_factory(authorization=True)
    good = Sink(milvus.uri, milvus.token, "auth_probe", timeout_s=10)
    try:
        good.ensure_collection(4, "m")
        good.upsert([Row(id="a", vector=np.ones(4, dtype=np.float32), text="t", meta={"k": 1})])
        assert good.count() == 1
    finally:
        good.close()
    for token in (WRONG_TOKEN, ""):
        bad = Sink(milvus.uri, token, "auth_probe", timeout_s=10)
        with pytest.raises(ConfigError) as caught:
            bad.ensure_collection(4, "m")
        message = str(caught.value)
        assert "authentication failed" in message and "--milvus-token" in message
        assert_no_secret(message)
    # Through the CLI: exit 2 with that line, and the token nowhere.
    init = embedq(
        "init",
        "--with-collection",
        "--stream",
        "secure:milvus",
        env={
            **DEBUG_LOGS,
            "EMBEDQ_REDIS_URL": os.environ.get("EMBEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            "EMBEDQ_MILVUS_URI": milvus.uri,
            "EMBEDQ_MILVUS_TOKEN": WRONG_TOKEN,
        },
    )
    assert init.returncode == 2, init.stderr
    assert "authentication failed" in init.stderr and "Traceback" not in init.stderr
    assert_no_secret(init.stdout, init.stderr)
