"""One HTTP port for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process serves at all (the liveness probe: a hung
process stops answering and is restarted). ``/readyz`` runs every readiness check — the
worker's own (model loaded, stages alive), Redis reachable, Milvus reachable — and answers
503 with a JSON body naming the failed ones. A check that raises counts as not ready; no
exception escapes into the HTTP server.

The server runs in a daemon thread, so it never holds a stopping worker open.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from embedq.metrics import StreamCollector, WorkerMetrics
from embedq.stream import Stream

if TYPE_CHECKING:  # the exporter runs in the producer image, which has no pymilvus/numpy
    from embedq.sink import Sink

log = structlog.get_logger("embedq.health")

Check = Callable[[], object]  # falsy or raising: not ready


class HealthServer:
    """Serves a registry and the probes from a daemon thread until ``close()``."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "") -> None:
        # host "" binds every interface: in a pod the kubelet and Prometheus connect from
        # outside the container.
        self.registry = registry
        self._checks: dict[str, Check] = {}
        self._failing: set[str] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="embedq-health", daemon=True
        )
        self._thread.start()
        log.info("metrics_serving", port=self.port, paths="/metrics /healthz /readyz")

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def require(self, name: str, check: Check) -> None:
        """Add (or replace) a readiness check."""
        with self._lock:
            self._checks[name] = check

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or why not}) — every check runs, in the order added."""
        with self._lock:
            checks = list(self._checks.items())
        results: dict[str, str] = {}
        for name, check in checks:
            try:
                results[name] = "ok" if check() else "not ready"
            except Exception as exc:  # a probe answers; it never crashes the server
                results[name] = f"{type(exc).__name__}: {exc}"[:300]
        failing = {n for n, r in results.items() if r != "ok"}
        with self._lock:
            newly = failing - self._failing
            self._failing = failing
        for name in sorted(newly):  # one line when a check starts failing, not per probe
            log.warning("not_ready", check=name, reason=results[name])
        return bool(checks) and not failing, results

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(server.registry))
            elif path == "/healthz":
                self._send(200, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/readyz":
                ready, checks = server.readiness()
                body = json.dumps({"ready": ready, "checks": checks}).encode()
                self._send(200 if ready else 503, "application/json", body)
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


def serve_stream_metrics(
    registry: CollectorRegistry, port: int, streams: Sequence[Stream], host: str = ""
) -> HealthServer:
    """The gauges of ``streams`` (a stream, or every partition of one) plus a Redis
    readiness check on ``port`` (``embedq exporter``)."""
    registry.register(StreamCollector(streams))
    server = HealthServer(registry, port, host)
    server.require("redis", reachable(streams[0].ping))
    return server


def serve_worker_metrics(
    metrics: WorkerMetrics,
    port: int,
    *,
    ready: Check,
    streams: Sequence[Stream],
    sink: Sink | None = None,
    host: str = "",
) -> HealthServer:
    """A worker's metrics, the stream gauges and the probes on ``port``.

    ``ready`` is the worker's own state (model loaded, stage threads alive, not stopping);
    Redis is pinged through ``streams`` (give them a client of their own, so a scrape never
    waits behind a blocked XREADGROUP), Milvus through ``sink`` once there is one
    (``require("milvus", ...)`` adds it later).
    """
    server = serve_stream_metrics(metrics.registry, port, streams, host)
    server.require("worker", ready)
    if sink is not None:
        server.require("milvus", reachable(sink.ping))
    return server


def reachable(call: Callable[[], None]) -> Check:
    """A check from a call that raises when the dependency is down."""

    def check() -> bool:
        call()
        return True

    return check
