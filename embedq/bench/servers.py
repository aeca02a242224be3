"""Private servers on free ports, for the benchmark and the tests: ``redis-server``,
``milvus-lite server`` and a Milvus 2.3.5 standalone (``milvus-server``).

Each one gets its own data directory (its log file lives there too), runs in its own
process group, is ready when ``start()`` returns, and is stopped by whoever started it:
``stop()``, or the end of its ``with`` block. Nothing here touches a server someone else
runs. A missing binary, or a server that exits while starting, is a ``ConfigError`` that
names the log; a server that never answers is a ``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from embedq.errors import ConfigError

# milvus-lite and milvus-server are console scripts of packages in this environment.
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    every_s: float = 0.2,
    *,
    ignore: tuple[type[BaseException], ...] = (Exception,),
) -> None:
    """Poll ``check`` until it is true; an exception of a type in ``ignore`` counts as
    "not yet". ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(*ignore):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


def find_binary(name: str, hint: str) -> str:
    """``name`` from this environment's bin folder, else from PATH."""
    if (BIN / name).is_file():
        return str(BIN / name)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not on PATH ({hint})")
    return found


class _Server:
    """What the three servers share: one process in a group of its own, a log, a wait
    for readiness that notices an early exit, and a stop that leaves nothing behind."""

    name = "server"
    stop_signal = signal.SIGTERM
    stop_wait_s = 15.0

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.port = free_port()
        self.log = data_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def _launch(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def _wait_ready(self, answers: Callable[[], bool], timeout_s: float, every_s: float) -> None:
        proc = self.proc
        assert proc is not None, "start() launches the process first"

        def ready() -> bool:
            code = proc.poll()
            if code is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise ConfigError(f"{self.name} exited with code {code} while starting:\n{tail}")
            try:
                return answers()
            except Exception:  # not listening yet
                return False

        try:
            wait_until(ready, timeout_s, f"{self.name} on port {self.port} ({self.log})",
                       every_s=every_s, ignore=())  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop(self.proc, self.stop_signal, self.stop_wait_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, wait_s: float) -> None:
    """Signal a server we started; past ``wait_s``, SIGKILL its whole process group."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own group (start_new_session)
        proc.wait(10)


class RedisServer(_Server):
    """A private ``redis-server``; ``restart`` reuses its port and directory (and AOF).

    ``appendonly`` turns on AOF with ``appendfsync always`` (a SIGKILL loses nothing it
    acknowledged); ``maxmemory`` (e.g. ``"2mb"``) with ``noeviction`` makes it refuse
    writes when full; ``cluster`` starts a cluster-mode node with a bus port of its own
    (the default, port + 10000, overflows for free ports above 55535); ``tls_dir`` holds
    ``ca.crt``, ``server.crt`` and ``server.key`` and makes the port TLS-only. ``args``
    go last and win (``--requirepass``, ``--user``...).
    """

    name = "redis-server"

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        appendonly: bool = False,
        maxmemory: str | None = None,
        cluster: bool = False,
        tls_dir: Path | None = None,
    ) -> None:
        super().__init__(data_dir)
        self.args = args
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.cluster_port = free_port() if cluster else None
        self.tls_dir = tls_dir

    @property
    def url(self) -> str:
        return self.url_for()

    def url_for(self, userinfo: str = "") -> str:
        """The URL with ``user:password`` in it; ``rediss://`` when TLS is on."""
        scheme = "redis" if self.tls_dir is None else "rediss"
        auth = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        if self.tls_dir is not None:
            kwargs |= {"ssl": True, "ssl_ca_certs": str(self.tls_dir / "ca.crt")}
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def command(self) -> list[str]:
        binary = find_binary("redis-server", "apt-get install redis-server")
        args = [binary, *self._listen(), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--maxmemory-policy", "noeviction", "--logfile", str(self.log),
                "--appendonly", "yes" if self.appendonly else "no"]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always"]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory]
        if self.cluster_port is not None:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port),
                     "--cluster-config-file", str(self.dir / "nodes.conf")]  # fmt: skip
        return [*args, *self.args]

    def _listen(self) -> list[str]:
        if self.tls_dir is None:
            return ["--port", str(self.port)]
        return ["--port", "0", "--tls-port", str(self.port),  # TLS only: the plain port is off
                "--tls-cert-file", str(self.tls_dir / "server.crt"),
                "--tls-key-file", str(self.tls_dir / "server.key"),
                "--tls-ca-cert-file", str(self.tls_dir / "ca.crt"),
                "--tls-auth-clients", "no"]  # fmt: skip

    def start(self) -> Self:
        self._launch(self.command())
        self._wait_ready(self._answers, 30, 0.05)
        return self

    def _answers(self) -> bool:
        client = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        except (redis.AuthenticationError, redis.ResponseError):
            pass  # it answers; it wants credentials
        finally:
            client.close()
        return True

    def kill(self) -> None:
        """SIGKILL: what a node loss does; with ``appendonly`` nothing acked is lost."""
        _stop(self.proc, signal.SIGKILL, self.stop_wait_s)

    def restart(self) -> None:
        self.kill()
        self.start()


class MilvusLiteServer(_Server):
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
        binary = find_binary("milvus-lite", "pip install milvus-lite")
        self._launch([binary, "server", "--data-dir", str(self.dir),
                      "--host", "127.0.0.1", "--port", str(self.port)])  # fmt: skip
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


class MilvusStandalone(_Server):
    """A real Milvus 2.3.5 standalone (``milvus-server`` from the ``milvus`` package), ready
    in ~10-20 s. ``authorization`` makes it require ``token`` (``root:Milvus``).

    The embedded etcd's peer port is fixed at 2380 unless an etcd config file says
    otherwise (read through ETCD_CONFIG_PATH), so two instances on one machine clash
    without it; every port here is a free one. The wrapper runs ``milvus run standalone``
    as a child and stops it on SIGINT (not on SIGTERM); that child is remembered by pid
    and stopped by pid too, since it can outlive the wrapper's process group.
    """

    name = "milvus-server"
    stop_signal = signal.SIGINT
    stop_wait_s = 30.0

    def __init__(
        self, data_dir: Path, *, authorization: bool = False, config: Sequence[str] = ()
    ) -> None:
        super().__init__(data_dir)
        self.authorization = authorization
        # milvus.yaml overrides, "key.subkey=value" (e.g. quotaAndLimits settings).
        self.config = list(config)
        # The default root password of a fresh server with authorization on.
        self.token = "root:Milvus" if authorization else ""
        self.children: list[tuple[int, str]] = []  # (pid, start time) of `milvus run`

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
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
        args = [find_binary("milvus-server", "pip install milvus==2.3.5"),
                "--data", str(self.dir / "data"),
                "--proxy-port", str(self.port), "--etcd-port", str(etcd_client)]  # fmt: skip
        for role in ("root-coord", "proxy-internal", "query-coord", "query-node",
                     "index-coord", "index-node", "data-coord", "data-node"):  # fmt: skip
            args += [f"--{role}-port", str(free_port())]
        if self.authorization:
            # Only ever "true": the wrapper turns auth on for any value it is given.
            args += ["--authorization-enabled", "true"]
        for item in self.config:
            args += ["--extra-config", item]
        self._launch(args, env={**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)})
        self._wait_ready(self._answers, 300, 1.0)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        self.children = self.children or [_identity(p) for p in _children(self.proc.pid)]
        return milvus_answers(self.uri, self.token)

    def cpu_s(self) -> float:
        """CPU seconds the server process (``milvus run``) has used so far."""
        total = 0
        for pid, started in self.children:
            with contextlib.suppress(OSError, IndexError):
                fields = _stat(pid)
                if fields[19] == started:
                    total += int(fields[11]) + int(fields[12])  # utime + stime, in ticks
        return total / os.sysconf("SC_CLK_TCK")

    def quiesce(self, *, below: float = 0.15, timeout_s: float = 90.0) -> float:
        """Wait until the server's background work (sealing, index builds, compaction
        after the last writes) is done: under ``below`` of a core for a whole second.
        Seconds waited; gives up quietly at ``timeout_s`` (an idle 2.3.5 uses ~0.04)."""
        started = time.monotonic()
        last = self.cpu_s()
        while time.monotonic() - started < timeout_s:
            time.sleep(1.0)
            now = self.cpu_s()
            if now - last < below:
                break
            last = now
        return time.monotonic() - started

    def stop(self) -> None:
        super().stop()
        for pid, started in self.children:
            _stop_pid(pid, started, self.stop_wait_s)
        self.children = []


def milvus_answers(uri: str, token: str = "") -> bool:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, token=token, timeout=3)
    try:
        client.list_collections(timeout=3)
        return True
    finally:
        client.close()


# -- processes by pid (Linux /proc) ----------------------------------------------------


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..., start time at [19]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _identity(pid: int) -> tuple[int, str]:
    """A pid and its start time, which tells it from a later process that reuses the pid."""
    return pid, _stat(pid)[19]


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(int(entry.name))[1]) == parent:
                    found.append(int(entry.name))
    return found


def _alive(pid: int, started: str) -> bool:
    try:
        fields = _stat(pid)
    except (OSError, IndexError):
        return False
    return fields[19] == started and fields[0] != "Z"


def _stop_pid(pid: int, started: str, wait_s: float) -> None:
    """SIGTERM a process we started (checked by start time), SIGKILL past ``wait_s``."""
    for sig, patience_s in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10.0)):
        if not _alive(pid, started):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not _alive(pid, started), patience_s, f"pid {pid} to exit")
