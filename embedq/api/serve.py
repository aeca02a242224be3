"""The gateway process: uvicorn serving ``embedq.api.app`` on ``--host``/``--port``.

One event loop per process (the gateway only waits on Redis: a loop holds thousands of
waiting requests); run more replicas, not more threads. SIGTERM stops accepting, lets the
requests in hand finish (at most ``--request-timeout``), then exits 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from embedq.api.app import create_app
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode

log = structlog.get_logger("embedq.api")


PROBE_HEADROOM = 32  # connections past --max-in-flight kept for probes and /metrics
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # h11's bound on an incomplete request head


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a bound on how long a request *head* may take (issue 27:
    uvicorn has none; ``h11_max_incomplete_event_size`` bounds its bytes, not its time, and
    a client trickling one header byte a second held its connection for good).

    The clock starts when the connection opens, and on a kept-alive connection when the
    next request's first byte arrives (before that, uvicorn's keep-alive timeout closes an
    idle connection); it stops when h11 has the whole head. On expiry the connection is
    closed without an answer: h11 sends no response before a request's head, and nginx's
    ``client_header_timeout`` also just closes. Subclassed per gateway
    (``head_timeout_protocol``) because uvicorn builds the protocol from its class alone."""

    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head(opened=True)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()  # a pipelined next head may be buffered already

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _watch_head(self, *, opened: bool = False) -> None:
        """Arm the timer when a head is awaited and has begun (bytes of it are buffered, or
        the connection just opened); stop it once h11 has the whole head."""
        awaiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not awaiting:
            self._stop_head_timer()
        elif self._head_timer is None and (opened or self.conn.trailing_data[0]):
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_expired)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("api_head_timeout", peer=peer, timeout_s=self.head_timeout_s)
        self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def head_timeout_protocol(timeout_s: float) -> type[HeadTimeoutProtocol]:
    """``HeadTimeoutProtocol`` bounding request heads at ``timeout_s`` seconds."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": timeout_s})


def server_config(settings: Settings, app: Any) -> Any:
    """uvicorn's settings for the gateway: connections bounded (``--max-in-flight`` plus
    room for probes; past it uvicorn answers 503 at once), idle keep-alive closed, request
    heads bounded in bytes and in time (``--header-timeout``), and forwarded headers
    trusted only from ``--forwarded-allow-ips`` (none by default: uvicorn's own default
    trusts 127.0.0.1)."""
    import uvicorn

    trusted = settings.api_forwarded_allow_ips.strip()
    return uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        http=head_timeout_protocol(settings.api_header_timeout_s),
        log_config=None,  # embedq's logging (structlog, secrets scrubbed) is already set up
        access_log=False,  # one line per refusal instead (embedq.api.app); counts in /metrics
        timeout_graceful_shutdown=int(settings.api_timeout_s) + 1,
        server_header=False,
        limit_concurrency=settings.api_max_in_flight + PROBE_HEADROOM,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )


def check_exposure(settings: Settings) -> None:
    """Refuse (``ConfigError``, one line) to serve an address other machines reach without
    API keys, unless ``--allow-anonymous``: the gateway spends the fleet's GPUs and reads the
    collection for whoever calls it (issue 28: it bound 0.0.0.0 and only warned)."""
    keyed = bool(settings.api_key_list or settings.api_keys_file)
    if keyed or settings.api_allow_anonymous or is_loopback(settings.api_host):
        return
    raise ConfigError(
        f"--host {settings.api_host} serves other machines, and no API key is set: set "
        "EMBEDQ_API_KEYS (or --api-keys-file), or pass --allow-anonymous "
        "(EMBEDQ_API_ALLOW_ANONYMOUS=true) to serve anyone who reaches the port"
    )


def is_loopback(host: str) -> bool:
    """``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False  # "", a name, "0.0.0.0"'s spellings: other machines may reach it


def serve(settings: Settings) -> int:
    import uvicorn

    check_exposure(settings)
    server = uvicorn.Server(server_config(settings, create_app(settings)))
    server.run()
    if not server.started:
        # uvicorn logged why (a port in use, Redis refusing the lane's group).
        raise ConfigError(
            f"the gateway could not start on {settings.api_host}:{settings.api_port} "
            "(see the log line above)"
        )
    log.info("api_stopped")
    return int(ExitCode.OK)
