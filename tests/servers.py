"""Private servers for tests that must stop, lock or misconfigure them: a redis-server on a
free port with a temp dir, and small helpers to wait on HTTP endpoints."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free port; ``stop()`` makes it unreachable on purpose."""

    def __init__(self, workdir: Path, *args: str, tls_dir: Path | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("these tests need redis-server on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self.tls_dir = tls_dir
        listen = ["--port", str(self.port)]
        if tls_dir is not None:  # TLS only: the plain port is off
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(tls_dir / "server.crt"),
                "--tls-key-file",
                str(tls_dir / "server.key"),
                "--tls-ca-cert-file",
                str(tls_dir / "ca.crt"),
                "--tls-auth-clients",
                "no",
            ]
        self.proc = subprocess.Popen(
            [
                "redis-server",
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log),
                *args,
            ]
        )
        wait_for(self._answers, 30, f"redis-server on port {self.port} ({self.log})")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            self.client(socket_timeout=1).ping()
        except (redis.AuthenticationError, redis.ResponseError):
            return True  # it answers; it wants credentials
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        return True

    def url(self, userinfo: str = "", scheme: str = "redis") -> str:
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        if self.tls_dir is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"gave up after {timeout_s} s waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    """(status, body); connection errors are status 0."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""
