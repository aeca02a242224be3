"""The gateway and workers in this test process: uvicorn on a free loopback port in a
thread (real HTTP, the official ``openai`` client), and workers' ``run()`` in threads; and
``ServeProcess``, the one launcher of ``embedq serve`` as its own process."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from embedq.api.app import create_app
from embedq.api.serve import server_config
from embedq.bench.servers import free_port
from embedq.core.config import Settings
from embedq.sink.milvus import Sink
from embedq.worker.loop import Worker

from .fault_fixtures import WorkerProcess
from .servers import wait_for

__all__ = ["ServeProcess", "free_port", "gateway", "gateway_app", "running", "wait_for"]


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


class ServeProcess:
    """``embedq serve ARGS`` in its own process on a free loopback port, its log (JSON
    lines) in ``log``; ``url`` is its base URL once ``wait_ready`` returned."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        where = ["--host", "127.0.0.1", "--port", str(port)]
        self.proc = WorkerProcess(["serve", *where, *args], log, env=env or {})

    def wait_ready(self, path: str = "/readyz", timeout_s: float = 60) -> None:
        """Until ``path`` answers 200; the log's tail if the process exited first."""

        def up() -> bool:
            if self.proc.proc.poll() is not None:
                raise AssertionError(f"embedq serve exited: {self.proc.log_tail()}")
            try:
                return httpx.get(f"{self.url}{path}", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s, f"embedq serve to answer {path}")

    def log_text(self) -> str:
        return self.proc.log_text()

    def stop(self) -> None:
        self.proc.stop()
