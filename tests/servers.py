"""Test helpers around the private servers of ``embedq.bench.servers``: a throwaway TLS
certificate authority, a wait that fails the test, and a plain HTTP GET."""

from __future__ import annotations

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
