"""Real servers and real worker processes for the fault tests.

Each server runs on a free port with its own data directory, in its own process group, and
is stopped by the fixture that started it: a private ``redis-server`` (AOF on, so it can be
restarted mid-run without losing anything), ``milvus-lite server`` (several workers share
one Milvus Lite over gRPC), and a real Milvus 2.3.5 standalone from the ``milvus`` package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def _stop(
    proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, wait_s: float = 15
) -> None:
    """Stop a server this module started, then anything left in its own process group."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own group (start_new_session)
        proc.wait(10)


class RedisServer:
    """A private redis-server; ``restart`` reuses its port and directory (and AOF)."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True) -> None:
        self.dir = data_dir
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(lambda: bool(client.ping()), 20, f"redis-server on port {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL: what a node loss does; with appendfsync always nothing acked is lost."""
        _stop(self.proc, signal.SIGKILL)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        _stop(self.proc)


class MilvusLiteServer:
    """``milvus-lite server`` on a free port; ``pause``/``resume`` freeze it (SIGSTOP), so
    calls time out as they do against a hung or partitioned Milvus."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.dir.parent / f"milvus-lite-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "milvus-lite"),
                "server",
                "--data-dir",
                str(self.dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(lambda: milvus_answers(self.uri), 60, f"milvus-lite server on {self.port}")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        _stop(self.proc)


class MilvusStandalone:
    """A real Milvus 2.3.5 standalone (``milvus-server`` from the ``milvus`` package).

    The embedded etcd's peer port is fixed at 2380 unless an etcd config file says
    otherwise (read through ETCD_CONFIG_PATH), so two instances on one machine clash
    without it; every port here is a free one.
    """

    def __init__(self, data_dir: Path, *, authorization: bool = False) -> None:
        self.dir = data_dir
        self.port = free_port()
        self.authorization = authorization
        # The default root password of a fresh server with authorization on.
        self.token = "root:Milvus" if authorization else ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        etcd_client, etcd_peer = free_port(), free_port()
        etcd_config = self.dir / "embed-etcd.yaml"
        etcd_config.write_text(
            f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{etcd_peer}\n"
            f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
            f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
        )
        ports = {
            "--proxy-port": self.port,
            "--etcd-port": etcd_client,
            "--root-coord-port": free_port(),
            "--proxy-internal-port": free_port(),
            "--query-coord-port": free_port(),
            "--query-node-port": free_port(),
            "--index-coord-port": free_port(),
            "--index-node-port": free_port(),
            "--data-coord-port": free_port(),
            "--data-node-port": free_port(),
        }
        args = [str(BIN / "milvus-server"), "--data", str(self.dir / "data")]
        for flag, port in ports.items():
            args += [flag, str(port)]
        if self.authorization:
            # Only ever "true": the wrapper turns auth on for any value it is given.
            args += ["--authorization-enabled", "true"]
        log = (self.dir / "milvus-server.log").open("ab")
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)},
            start_new_session=True,
        )
        wait_until(
            lambda: milvus_answers(self.uri, self.token), 300, f"milvus-server on {self.port}", 1.0
        )

    def stop(self) -> None:
        # The wrapper stops the milvus binary it spawned on SIGINT (not on SIGTERM).
        _stop(self.proc, signal.SIGINT, wait_s=30)


def milvus_answers(uri: str, token: str = "") -> bool:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, token=token, timeout=3)
    try:
        client.list_collections(timeout=3)
        return True
    finally:
        client.close()


# -- worker processes ------------------------------------------------------------------


class WorkerProcess:
    """``python -m embedq.cli worker ...`` with its log (JSON lines) in a file."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedq.cli", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "true", **env},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker did not exit in {timeout_s} s; log tail:\n{self.log_tail()}"
            ) from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
