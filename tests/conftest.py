"""Shared fixtures: real Redis (127.0.0.1:6379 unless EMBEDQ_TEST_REDIS_URL), real Milvus
Lite files in temp dirs, and the real packaged model, loaded once per session.

Two layers (issue 24). ``make test-fast`` runs ``-m "not slow"``: unit tests, stubs, and
in-process tests against the shared Redis, Milvus Lite files and the tiny model.
``make test`` runs everything. Nobody marks a test ``slow`` by hand: the
``pytest_collection_modifyitems`` hook below marks it from what it uses
(``tests/support/layers.py``):

* a fixture that starts a server or a process, or loads the real packaged model:
  ``private_redis``, ``milvus_lite_server``, ``milvus_standalone``,
  ``milvus_server_factory``, ``spawn_worker``, ``encoder`` (and so ``make_worker``);
* code that can start a process: the test, its fixtures, and every test-suite function or
  class they name, followed transitively, that names ``subprocess``, ``multiprocessing``,
  ``os.fork``/``os.system``, ``embedq.worker.replicas.run_per_device`` or a server launcher
  (``tests/support/servers.py``). A test calling a helper such as ``embedq(...)`` that runs
  ``python -m embedq.cli`` is slow; one calling ``CliRunner`` in-process is not, nor is
  one opening a Milvus Lite file (the product's embedded default) through ``pymilvus``.

Tests stay independent across pytest-xdist workers: each worker process has its own
session fixtures (servers, models), every test has its own stream key (``stream_name``)
and its own files (``tmp_path``), and servers take free ports.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.core.config import Settings
from embedq.model.encoder import Encoder
from embedq.queue.connection import connect
from embedq.queue.stream import Stream
from embedq.sink.milvus import Sink, open_sink
from embedq.worker.launch import assemble
from embedq.worker.loop import Worker

from .support import xdist_groups
from .support.cli import process_globals_restored
from .support.fault_fixtures import WorkerProcess
from .support.layers import is_slow
from .support.servers import MilvusLiteServer, MilvusStandalone, RedisServer
from .support.tiny_models import tiny_bert

REDIS_URL = os.environ.get("EMBEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts servers or processes (see the docstring), and
    tell the xdist controller which tests share a session server."""
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        info = item._fixtureinfo
        fixtures = [d.func for defs in info.name2fixturedefs.values() for d in defs]
        if is_slow(item.function, item.fixturenames, fixtures):
            item.add_marker(pytest.mark.slow)
    xdist_groups.record(config, items)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Controller: hand each xdist worker the file it writes the server groups to."""
    node.workerinput[xdist_groups.INPUT_KEY] = str(_groups_path(node.config))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Controller: tests sharing a Milvus server go to one worker (tests/support/xdist_groups.py);
    an explicit ``--dist`` other than ``load`` keeps xdist's own scheduler."""
    if config.getoption("dist") != "load":
        return None
    return xdist_groups.make_scheduler(config, log, _groups_path(config))


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Each test starts with the logging the session started with, whatever the test
    before it configured in-process (tests/support/cli.py)."""
    with process_globals_restored():
        yield


def _groups_path(config: pytest.Config) -> Path:
    base: Path = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base / "xdist-server-groups.json"


def corpus_rows(name: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of a shared corpus file.

    Without ``../shared/corpus`` (a checkout on its own) the rows come from the repo's
    sample, of the same kind: its Debian descriptions stand in for short.jsonl and its
    Python-docs paragraphs for long.jsonl, repeated under new ids when ``n`` is larger.
    """
    if (CORPUS / name).is_file():
        rows = []
        with (CORPUS / name).open(encoding="utf-8") as handle:
            for line in handle:
                rows.append(json.loads(line))
                if len(rows) == n:
                    break
        return rows
    prefix = "deb-" if name.startswith("short") else "pydoc-"
    with SAMPLE.open(encoding="utf-8") as handle:
        kind = [r for r in map(json.loads, handle) if str(r["id"]).startswith(prefix)]
    # Copies get their own text too: a repeated text is a vector-cache hit, and a backlog
    # of hits drains without the model (the priority and dashboard tests need real work).
    return [
        row
        if i < len(kind)
        else {
            **row,
            "id": f"{row['id']}~{i // len(kind)}",
            "text": f"{row['text']} ({i // len(kind)})",
        }
        for i, row in ((i, kind[i % len(kind)]) for i in range(n))
    ]


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = connect(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"tests need a Redis >= 7 at {REDIS_URL} (see README: make test starts one)")
    yield client
    client.close()


@pytest.fixture
def stream_name(redis_client: redis.Redis) -> Iterator[str]:
    """A unique stream key per test; it and everything under it is deleted afterwards."""
    name = f"embedq-test:{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(redis_client.scan_iter(match=f"{name}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder(device="cpu")


@pytest.fixture
def settings(stream_name: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=REDIS_URL,
        stream=stream_name,
        group="g",
        consumer="c1",
        milvus_uri=str(tmp_path / "milvus.db"),
        collection="vectors",
        block_ms=100,
        drain=True,
        min_idle_s=30,
        reclaim_interval_s=1,
        max_batch_tokens=4096,
        max_batch_rows=64,
    )


@pytest.fixture
def sink(settings: Settings) -> Iterator[Sink]:
    s = open_sink(settings)
    yield s
    s.close()


@pytest.fixture
def make_worker(
    redis_client: redis.Redis, encoder: Encoder, sink: Sink, settings: Settings
) -> Callable[..., Worker]:
    """A worker sharing the session's model and the test's Milvus Lite file."""

    def make(**changes: Any) -> Worker:
        s = settings.replace(**changes)
        return assemble(s, Stream(redis_client, s.stream, s.group, s.consumer), encoder, sink)

    return make


# -- fault-handling work: real servers (tests/support/servers.py) and worker processes


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (AOF, appendfsync always) that it may kill."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def milvus_lite_server(tmp_path: Path) -> Iterator[MilvusLiteServer]:
    """``milvus-lite server`` on a free port, shared by this test's worker processes."""
    server = MilvusLiteServer(tmp_path / "milvus-lite")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def milvus_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusStandalone]:
    """A real Milvus 2.3.5 server (~20 s to start, so one per session; tests use their
    own collections)."""
    server = MilvusStandalone(tmp_path_factory.mktemp("milvus-standalone"))
    try:
        server.start()
    except TimeoutError:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``embedq worker`` subprocesses; any still running at the end are killed."""
    started: list[WorkerProcess] = []

    def spawn(*args: str, name: str = "worker", command: str = "worker") -> WorkerProcess:
        proc = WorkerProcess([command, *args], tmp_path / f"{name}-{len(started)}.log", env={})
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


# -- a real Milvus server with authorization (fleet-operations work) -------------------

MilvusServer = MilvusStandalone


@pytest.fixture(scope="session")
def milvus_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., MilvusStandalone]]:
    """``factory(authorization=True)``: a started Milvus 2.3.5 server, one per setting for
    the whole session (startup takes ~10-20 s). Every port, etcd's peer port included, is a
    free one, so it runs beside ``milvus_standalone``."""
    servers: dict[bool, MilvusStandalone] = {}

    def factory(*, authorization: bool = False) -> MilvusStandalone:
        if authorization not in servers:
            server = MilvusStandalone(
                tmp_path_factory.mktemp("milvus-server"), authorization=authorization
            )
            servers[authorization] = server
            server.start()
        return servers[authorization]

    yield factory
    for server in servers.values():
        server.stop()


# The suite's tiny real BERT (tests/support/tiny_models.py): its embedding table has fewer
# rows than its tokenizer knows tokens, so a model failure on one text is real, not faked.
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model: Path) -> Encoder:
    return Encoder(str(tiny_model), device="cpu")
