"""Connections as an adversary holds them (issue 27 item 4): a body that never finishes
holds one ``--max-in-flight`` slot and is cut off at ``--request-timeout`` (408), a client
that leaves mid-body is a 499 line rather than a crash, and X-Forwarded-For is trusted only
from ``--forwarded-allow-ips`` (none by default). No worker is needed: nothing here reaches
the fleet."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from structlog.testing import capture_logs

from embedq.core.config import Settings

from .support.api_fixtures import gateway_app, wait_for

HEAD = (
    "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n\r\n"
)


@contextmanager
def trickle(url: str, body: bytes = b'{"input": "a') -> Iterator[socket.socket]:
    """A connection that sends its head and part of a 1000-byte body, then waits."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    try:
        conn.sendall(HEAD.encode() + body)
        yield conn
    finally:
        conn.close()


def _read_all(conn: socket.socket) -> str:
    """What the server sends until its answer's body is complete or it closes."""
    got = b""
    while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        got += chunk
    return got.decode()


def _count(url: str, status: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith("embedq_api_requests_total{") and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_slow_body_holds_a_slot_and_is_cut_off(settings: Settings) -> None:
    bounded = settings.replace(api_max_in_flight=1, api_timeout_s=2.0)
    with gateway_app(bounded) as (url, app), trickle(url) as slow:
        gateway = app.state.gateway
        wait_for(lambda: gateway.in_flight == 1, 10, "the slow body to hold its slot")
        busy = httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "overloaded"
        answer = _read_all(slow)  # the server cuts the trickle off by itself
        assert answer.startswith("HTTP/1.1 408"), answer
        assert '"code":"body_timeout"' in answer
        wait_for(lambda: gateway.in_flight == 0, 10, "the slot to be released")


def test_a_client_leaving_mid_body_is_a_499_not_a_crash(settings: Settings) -> None:
    with capture_logs() as logs, gateway_app(settings) as (url, app):
        with trickle(url):
            wait_for(lambda: app.state.gateway.in_flight == 1, 10, "the body to start")
        wait_for(lambda: _count(url, "499") == 1, 10, "the 499 to be counted")
        assert app.state.gateway.in_flight == 0
        assert _count(url, "500") == 0
    events = [e["event"] for e in logs]
    assert "api_client_left" in events and "api_crashed" not in events


def test_forwarded_headers_are_trusted_only_from_allowed_proxies(settings: Settings) -> None:
    limited = settings.replace(api_rate_limit=0.001, api_rate_burst=1)

    def statuses(url: str) -> list[int]:
        return [
            httpx.post(
                f"{url}/v1/embeddings",
                content=b"not json",
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
                timeout=30,
            ).status_code
            for i in range(4)
        ]

    with gateway_app(limited) as (url, _app):
        # Spoofed addresses from 127.0.0.1 are one caller: the second request is limited.
        assert statuses(url) == [400, 429, 429, 429]
    trusted = limited.replace(
        api_forwarded_allow_ips="127.0.0.1", stream=f"{settings.stream}:proxied"
    )
    with gateway_app(trusted) as (url, _app):
        assert statuses(url) == [400, 400, 400, 400]  # a trusted proxy names each caller
