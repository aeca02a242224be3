"""One HTTP port for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` (the liveness probe) answers 200 while the process serves and every liveness
check passes; ``/readyz`` answers 200 when the process can make progress now: for a worker,
the model loaded and stages running, Redis and Milvus answering, and no call backing off;
503 with a JSON body naming the failed checks otherwise. A check that raises counts as
failed; no exception escapes into the HTTP server.

Nothing a probe or a scrape runs waits on Redis or Milvus: dependency checks run in the
background (``Watched``) and a probe reads their last result, so a frozen dependency shows
as "not ready" within seconds instead of a probe that hangs until its timeout (issue 17).

The server runs in daemon threads, so it never holds a stopping worker open. A client that
hangs up mid-answer is logged at debug level, never as a traceback on stderr.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from embedq.core.config import Settings
from embedq.queue.connection import connect
from embedq.queue.stream import Stream
from embedq.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from embedq.core.backoff import Waiting

log = structlog.get_logger("embedq.worker.health")

Check = Callable[[], object]  # falsy or raising: failed

PROBE_TIMEOUT_S = 1.0  # socket timeout of the clients that probes use


class NotReady(Exception):
    """A check's reason, shown in ``/readyz``'s body."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], backlog: int):
        # The listen backlog (socketserver's default is 5) and the family follow the host.
        self.request_queue_size = backlog
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scrape abandoned at its timeout breaks the pipe: one debug line, no traceback
        # (they made up most of a worker's log in issue 17's run).
        exc = sys.exc_info()[1]
        log.debug("http_client_gone", error=f"{type(exc).__name__}: {exc}"[:200])


class HealthServer:
    """Serves a registry and the probes from daemon threads until ``close()``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int,
        # Every address by default: in a pod the kubelet and Prometheus connect from outside
        # the container; --metrics-host 127.0.0.1 keeps the port on the machine.
        host: str = "0.0.0.0",  # noqa: S104 -- see above
        backlog: int = 64,
    ) -> None:
        self.registry = registry
        self._checks: dict[str, Check] = {}
        self._alive: dict[str, Check] = {}
        self._failing: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = _Server(host, port, _handler(self), backlog)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="embedq-health", daemon=True
        )
        self._thread.start()
        self._watched: list[Watched] = []
        log.info("metrics_serving", host=host, port=self.port, paths="/metrics /healthz /readyz")

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def require(self, name: str, check: Check) -> None:
        """Add (or replace) a readiness check."""
        with self._lock:
            self._checks[name] = check

    def require_alive(self, name: str, check: Check) -> None:
        """Add (or replace) a liveness check: failing it makes Kubernetes restart the pod."""
        with self._lock:
            self._alive[name] = check

    def watch(
        self,
        name: str,
        call: Callable[[], None],
        every_s: float = 2.0,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        """A readiness check on ``call`` run in the background (``Watched``)."""
        watched = Watched(name, call, every_s, on_recovered=on_recovered).start()
        self._watched.append(watched)
        self.require(name, watched)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or why not}) — every check runs, in the order added."""
        with self._lock:
            checks = list(self._checks.items())
        results = run_checks(checks)
        failing = {n for n, r in results.items() if r != "ok"}
        with self._lock:
            newly = failing - self._failing
            self._failing = failing
        for name in sorted(newly):  # one line when a check starts failing, not per probe
            log.warning("not_ready", check=name, reason=results[name])
        return bool(checks) and not failing, results

    def liveness(self) -> tuple[bool, dict[str, str]]:
        with self._lock:
            checks = list(self._alive.items())
        results = run_checks(checks)
        return all(r == "ok" for r in results.values()), results

    def close(self) -> None:
        for watched in self._watched:
            watched.stop()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def run_checks(checks: Sequence[tuple[str, Check]]) -> dict[str, str]:
    results: dict[str, str] = {}
    for name, check in checks:
        try:
            results[name] = "ok" if check() else "not ready"
        except Exception as exc:  # a probe answers; it never crashes the server
            results[name] = (str(exc) if isinstance(exc, NotReady) else repr_error(exc))[:300]
    return results


def repr_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.registry))
            elif path in ("/healthz", "/readyz"):
                ok, checks = server.liveness() if path == "/healthz" else server.readiness()
                body = json.dumps({"ready" if path == "/readyz" else "alive": ok, "checks": checks})
                self._send(200 if ok else 503, "application/json", body.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes arrive every few seconds; access lines would drown the worker's log.
            return

    return Handler


class Watched:
    """A dependency check run every ``every_s`` in a thread of its own; calling the object
    reads the last result. Failed when the last run raised, or when no run has succeeded
    for ``stale_after_s`` (a call that hangs). ``on_recovered`` runs when a failing check
    passes again (a worker wakes its backoff waits then)."""

    def __init__(
        self,
        name: str,
        call: Callable[[], None],
        every_s: float = 2.0,
        stale_after_s: float | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.call = call
        self.every_s = every_s
        self.stale_after_s = stale_after_s or max(5.0, 3 * every_s)
        self.on_recovered = on_recovered
        self._ok_at: float | None = None
        self._error = "not checked yet"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"embedq-watch-{name}", daemon=True)

    def start(self) -> Watched:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> None:
        was_failing = self._error != ""
        try:
            self.call()
        except Exception as exc:
            self._error = repr_error(exc)[:300]
            return
        self._ok_at, self._error = time.monotonic(), ""
        if was_failing and self.on_recovered is not None:
            self.on_recovered()

    def __call__(self) -> bool:
        if self._error:
            raise NotReady(self._error)
        age = time.monotonic() - (self._ok_at or 0.0)
        if age > self.stale_after_s:
            raise NotReady(f"no answer for {age:.0f}s")
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.every_s)


def serve_worker_metrics(
    metrics: WorkerMetrics,
    settings: Settings,
    *,
    ready: Check,
    wake: Callable[[], None] = lambda: None,
) -> HealthServer:
    """A worker's metrics and probes on ``settings.metrics_port``, started before the model
    loads (the probes answer meanwhile). ``ready`` is the worker's own state (model loaded,
    stages alive, not stopping); Redis is pinged in the background on a client of its own
    with a short timeout, and ``wake`` runs when it answers again. The worker adds Milvus
    and its backoff state once built (``watch``, ``require``)."""
    server = HealthServer(
        metrics.registry, settings.metrics_port, settings.metrics_host, settings.metrics_backlog
    )
    server.require("worker", ready)
    client = connect(
        settings.redis_url, cluster=settings.redis_cluster, socket_timeout_s=PROBE_TIMEOUT_S
    )
    stream = Stream(client, settings.stream, settings.group, settings.consumer)
    server.watch("redis", stream.ping, on_recovered=wake)
    return server


def not_backing_off(waiting: Callable[[], Sequence[Waiting]]) -> Check:
    """Ready only while no call waits out a backoff (``Retrier.waiting``): a worker in a
    30 s backoff is alive but makes no progress (issue 17: ready for 22 s doing nothing)."""

    def check() -> bool:
        calls = waiting()
        if calls:
            first = calls[0]
            since = time.monotonic() - first.since_s
            raise NotReady(f"{first.action} waits for {first.dependency} since {since:.0f}s")
        return True

    return check


def reachable(call: Callable[[], None]) -> Check:
    """A check from a call that raises when the dependency is down (run at probe time:
    for calls that cannot hang; dependencies go through ``HealthServer.watch``)."""

    def check() -> bool:
        call()
        return True

    return check
