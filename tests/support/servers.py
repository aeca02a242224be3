"""The servers the tests start, and helpers around them.

The launchers extend the benchmark's (``embedq.bench.servers``: a private process on a
free port, in its own process group, ready when ``start()`` returns, stopped by whoever
started it) with what only tests need: a Redis with AOF that can be SIGKILLed and
restarted, or with TLS, ``maxmemory`` or cluster mode; ``milvus-lite server``, which can be
frozen; a Milvus 2.3.5 server with authorization or ``milvus.yaml`` overrides. Then a
throwaway TLS certificate authority, a wait that fails the test, a plain HTTP GET, and a
proxy that loses one reply.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import pytest
import redis

from embedq.bench import servers as bench
from embedq.bench.servers import free_port, milvus_answers, wait_until

__all__ = [
    "MilvusLiteServer",
    "MilvusStandalone",
    "RedisServer",
    "ReplyDroppingProxy",
    "free_port",
    "http_get",
    "make_tls_certs",
    "wait_for",
    "wait_until",
]


class RedisServer(bench.RedisServer):
    """A private ``redis-server``; ``restart`` reuses its port and directory (and AOF).

    ``appendonly`` turns on AOF with ``appendfsync always`` (a SIGKILL loses nothing it
    acknowledged); ``maxmemory`` (e.g. ``"2mb"``) with ``noeviction`` makes it refuse
    writes when full; ``cluster`` starts a cluster-mode node with a bus port of its own
    (the default, port + 10000, overflows for free ports above 55535); ``tls_dir`` holds
    ``ca.crt``, ``server.crt`` and ``server.key`` and makes the port TLS-only. ``args``
    go last and win (``--requirepass``, ``--user``...).
    """

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        appendonly: bool = False,
        maxmemory: str | None = None,
        cluster: bool = False,
        tls_dir: Path | None = None,
    ) -> None:
        super().__init__(data_dir, *args)
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.cluster_port = free_port() if cluster else None
        self.tls_dir = tls_dir

    def url_for(self, userinfo: str = "") -> str:
        """The URL with ``user:password`` in it; ``rediss://`` when TLS is on."""
        url = super().url_for(userinfo)
        return url if self.tls_dir is None else "rediss" + url.removeprefix("redis")

    def client(self, **kwargs: Any) -> redis.Redis:
        if self.tls_dir is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        return super().client(**kwargs)

    def _listen(self) -> list[str]:
        if self.tls_dir is None:
            return super()._listen()
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),  # TLS only: the plain port is off
            "--tls-cert-file",
            str(self.tls_dir / "server.crt"),
            "--tls-key-file",
            str(self.tls_dir / "server.key"),
            "--tls-ca-cert-file",
            str(self.tls_dir / "ca.crt"),
            "--tls-auth-clients",
            "no",
        ]

    def _options(self) -> list[str]:
        args = ["--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        if self.cluster_port is not None:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.cluster_port),
                "--cluster-config-file",
                str(self.dir / "nodes.conf"),
            ]
        return args

    def kill(self) -> None:
        """SIGKILL: what a node loss does; with ``appendonly`` nothing acked is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(self.stop_wait_s)

    def restart(self) -> None:
        self.kill()
        self.start()


class MilvusLiteServer(bench.Server):
    """``milvus-lite server`` on a free port, so several processes share one Milvus Lite
    over gRPC. ``pause``/``resume`` freeze it (SIGSTOP), so calls time out as they do
    against a hung or partitioned Milvus. The log sits beside ``data_dir``, which the
    server keeps to itself."""

    name = "milvus-lite"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.log = data_dir.parent / f"milvus-lite-{self.port}.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        binary = bench.find_binary("milvus-lite", "pip install milvus-lite")
        self._launch(
            [
                binary,
                "server",
                "--data-dir",
                str(self.dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        )
        self._wait_ready(lambda: milvus_answers(self.uri), 60, 0.2)
        return self

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
        super().stop()


class MilvusStandalone(bench.MilvusStandalone):
    """The benchmark's Milvus 2.3.5 standalone; ``authorization`` makes it require
    ``token`` (``root:Milvus``), ``config`` holds ``milvus.yaml`` overrides,
    ``"key.subkey=value"`` (e.g. quotaAndLimits settings)."""

    def __init__(
        self, data_dir: Path, *, authorization: bool = False, config: Sequence[str] = ()
    ) -> None:
        super().__init__(data_dir)
        self.authorization = authorization
        self.config = list(config)
        # The default root password of a fresh server with authorization on.
        self.token = "root:Milvus" if authorization else ""

    def _options(self) -> list[str]:
        # Only ever "true": the wrapper turns auth on for any value it is given.
        args = ["--authorization-enabled", "true"] if self.authorization else []
        for item in self.config:
            args += ["--extra-config", item]
        return args


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
