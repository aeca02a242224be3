"""Fixtures for tests that write to Milvus in this process and read it back through
``embedq`` subprocesses. A test file imports the ones it uses, so pytest finds them there
(they would be conftest fixtures, but most tests need neither)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from embedq.core.config import Settings
from embedq.sink.milvus import Sink

from .servers import MilvusLiteServer


@pytest.fixture
def served(settings: Settings, milvus_lite_server: MilvusLiteServer) -> Settings:
    """A served Milvus Lite database: a file opened by one process locks out the rest, so
    this process writes and ``embedq search`` or ``verify`` processes read over gRPC."""
    return settings.replace(milvus_uri=milvus_lite_server.uri)


@pytest.fixture
def closing() -> Iterator[list[Sink]]:
    """Sinks the test opens, closed after it whether it passed or not."""
    sinks: list[Sink] = []
    yield sinks
    for sink in sinks:
        sink.close()
