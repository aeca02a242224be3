"""The gateway and workers in this test process: uvicorn on a free loopback port in a
thread (real HTTP, the official ``openai`` client), and workers' ``run()`` in threads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from embedq.api.app import create_app
from embedq.api.serve import server_config
from embedq.core.config import Settings
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gateway(settings: Settings, sink: Sink | None = None) -> Iterator[str]:
    """``embedq serve``'s app for ``settings`` on a free port; yields its base URL."""
    with gateway_app(settings, sink) as (url, _app):
        yield url


@contextmanager
def gateway_app(settings: Settings, sink: Sink | None = None) -> Iterator[tuple[str, FastAPI]]:
    """``gateway``, yielding the app too (its ``state.gateway`` holds the fleet client)."""
    port = free_port()
    settings = settings.replace(api_host="127.0.0.1", api_port=port)
    app = create_app(settings, sink=sink)
    config = server_config(settings, app)  # embedq serve's own uvicorn settings
    config.lifespan = "on"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-gateway", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "the gateway to start")
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(20)


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    """``worker.run()`` in a thread until the block ends (then a graceful stop)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="test-worker", daemon=True)
    thread.start()
    wait_for(lambda: worker.ready or bool(errors), 60, "the worker to start")
    try:
        yield worker
    finally:
        worker.stop_requested.set()
        thread.join(120)
        assert not thread.is_alive(), "the worker did not stop"
        assert not errors, errors


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
