"""A request head has ``--header-timeout`` to arrive (issue 27, "header and body read
timeouts"): a client trickling its head a byte a second is cut off then, on a new
connection or on the next request of a kept-alive one, while normal requests on the same
gateway are answered meanwhile; 200 such clients are all let go in time. No worker is
needed: nothing here reaches the fleet."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from structlog.testing import capture_logs

from embedq.core.config import Settings

from .support.api_fixtures import ServeProcess, gateway_app, wait_for

TIMEOUT_S = 2.0
# How late past the timeout a connection may still be closed: the event loop shares two
# cores with other suites, and this process's GIL with the gateway's thread.
SLACK_S = 8.0
# The gateway may accept a connection a moment before the client notes the time it opened.
EARLY_S = 0.1
HEAD = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUser-Agent: slow-but-steady/1.0\r\n\r\n"
KEPT_ALIVE = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def trickle(
    conns: dict[socket.socket, float], meanwhile: Callable[[], None] = lambda: None
) -> dict[socket.socket, float]:
    """Send each connection the next byte of ``HEAD`` every second, from the time it is
    mapped to, until the server closes it; ``meanwhile`` runs once, after the first byte.
    Returns the seconds each connection lasted (past ``TIMEOUT_S + SLACK_S``: missing)."""
    lasted: dict[socket.socket, float] = {}
    selector = selectors.DefaultSelector()
    for conn in conns:
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    give_up = time.monotonic() + TIMEOUT_S + SLACK_S + 1
    sent, next_byte = 0, time.monotonic()
    while len(lasted) < len(conns) and time.monotonic() < give_up:
        if time.monotonic() >= next_byte:
            assert sent < len(HEAD), "the head was sent whole: nothing was slow"
            for conn in conns.keys() - lasted.keys():
                with contextlib.suppress(OSError):  # closed already: the selector reports it
                    conn.send(HEAD[sent : sent + 1])
            sent, next_byte = sent + 1, next_byte + 1.0
            if sent == 1:
                meanwhile()
        for key, _ in selector.select(max(0.0, next_byte - time.monotonic())):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(4096)
            except ConnectionResetError:
                data = b""
            assert not data, f"the server answered a head it never got whole: {data!r}"
            lasted[conn] = time.monotonic() - conns[conn]
            selector.unregister(conn)
    selector.close()
    return lasted


def test_a_head_trickled_a_byte_a_second_is_cut_off_and_others_are_answered(
    settings: Settings,
) -> None:
    answered: list[int] = []

    def normal_request() -> None:
        answered.append(httpx.get(f"{url}/v1/models", timeout=30).status_code)

    bounded = settings.replace(api_header_timeout_s=TIMEOUT_S)
    with capture_logs() as logs, gateway_app(bounded) as (url, _app):
        slow = connect(url)
        try:
            host, port = slow.getsockname()
            peer = f"{host}:{port}"
            lasted = trickle({slow: time.monotonic()}, normal_request)
        finally:
            slow.close()
    assert answered == [200], "a normal request waited on the slow head"
    assert slow in lasted, "the slow head was never cut off"
    assert TIMEOUT_S - EARLY_S <= lasted[slow] <= TIMEOUT_S + SLACK_S, lasted
    cut = [e for e in logs if e["event"] == "api_head_timeout"]
    assert [(e["peer"], e["timeout_s"]) for e in cut] == [(peer, TIMEOUT_S)]


def test_a_slow_head_of_a_kept_alive_connections_next_request_is_cut_off(
    settings: Settings, tmp_path: Path
) -> None:
    """Through ``embedq serve`` itself, its setting given as ``EMBEDQ_API_HEADER_TIMEOUT_S``."""
    args = ["--redis-url", settings.redis_url, "--stream", settings.stream]
    args += ["--group", settings.group]
    env = {"EMBEDQ_API_HEADER_TIMEOUT_S": str(TIMEOUT_S)}
    proc = ServeProcess(args, tmp_path / "serve.log", env)
    url = proc.url
    try:
        proc.wait_ready("/healthz")
        conn = connect(url)
        try:
            # A first request within the timeout, answered, the connection kept alive.
            conn.sendall(KEPT_ALIVE)
            first = b""
            while not first.endswith(b'{"alive":true}'):
                chunk = conn.recv(4096)
                assert chunk, f"the connection closed after {first!r}"
                first += chunk
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first
            time.sleep(TIMEOUT_S)  # the first head's clock would have run out by now
            lasted = trickle({conn: time.monotonic()})
        finally:
            conn.close()
        # The clock starts at the next head's first byte, sent after the time was noted.
        assert conn in lasted, "the next request's slow head was never cut off"
        assert TIMEOUT_S <= lasted[conn] <= TIMEOUT_S + SLACK_S, lasted
        wait_for(lambda: "api_head_timeout" in proc.log_text(), 10, "the log line")
    finally:
        proc.stop()


def test_two_hundred_slow_heads_are_all_let_go_in_time(settings: Settings) -> None:
    answered: list[int] = []

    def normal_request() -> None:
        answered.append(httpx.get(f"{url}/healthz", timeout=30).status_code)

    bounded = settings.replace(api_header_timeout_s=TIMEOUT_S)
    with capture_logs() as logs, gateway_app(bounded) as (url, _app):
        conns: dict[socket.socket, float] = {}
        try:
            for _ in range(200):
                conns[connect(url)] = time.monotonic()
            lasted = trickle(conns, normal_request)
        finally:
            for conn in conns:
                conn.close()
    assert answered == [200]
    assert len(lasted) == 200, f"{200 - len(lasted)} slow heads still open"
    assert min(lasted.values()) >= TIMEOUT_S - EARLY_S, sorted(lasted.values())[:5]
    assert max(lasted.values()) <= TIMEOUT_S + SLACK_S, sorted(lasted.values())[-5:]
    assert sum(e["event"] == "api_head_timeout" for e in logs) == 200
