"""Test helpers around the private servers of ``embedq.bench.servers``: a throwaway TLS
certificate authority, a wait that fails the test, and a plain HTTP GET."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from embedq.bench.servers import wait_until


def make_tls_certs(directory: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need openssl on PATH")
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(command: str) -> None:  # no argument holds a space
        subprocess.run(
            ["openssl", *command.split()], cwd=directory, check=True, capture_output=True
        )

    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=ca")
    openssl("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt"
        " -days 2 -extfile san.cnf"
    )
    return directory


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` (its exceptions fail the test at once); fail after ``timeout_s``."""
    try:
        wait_until(condition, timeout_s, what, every_s=0.1, ignore=())
    except TimeoutError as exc:
        pytest.fail(str(exc))


def http_get(url: str) -> tuple[int, str]:
    """(status, body); connection errors are status 0."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


class ReplyDroppingProxy:
    """A TCP proxy in front of one Redis that, once armed, forwards the next request that
    holds ``marker`` to Redis, swallows Redis's reply and closes the client's connection:
    the command ran, the client never heard so (a lost reply, as a network cut gives)."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        import socket
        import threading

        from embedq.bench.servers import free_port

        self.port = free_port()
        self.upstream_port = upstream_port
        self.marker = marker
        self.armed = threading.Event()
        self.dropped = 0
        self._swallow: set[int] = set()  # client sockets whose next reply is dropped
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._threads: list[threading.Thread] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for source, sink in ((client, upstream), (upstream, client)):
                t = threading.Thread(
                    target=self._pump, args=(source, sink, source is client), daemon=True
                )
                t.start()

    def _pump(self, source: object, sink: object, from_client: bool) -> None:
        import socket

        src, dst = source, sink
        assert isinstance(src, socket.socket) and isinstance(dst, socket.socket)
        try:
            while data := src.recv(65536):
                if from_client and self.armed.is_set() and self.marker in data:
                    self.armed.clear()
                    self._swallow.add(id(src))  # the reply to this request, on its way back
                elif not from_client and id(dst) in self._swallow:
                    self._swallow.discard(id(dst))
                    self.dropped += 1
                    return  # the reply is not forwarded; `finally` cuts the connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
