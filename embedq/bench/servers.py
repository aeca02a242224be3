"""Private servers on free ports for the benchmark: ``redis-server`` and a Milvus 2.3.5
standalone (``milvus-server``). The tests' launchers (tests/support/servers.py) build on
these, adding what only tests need: AOF, TLS, cluster mode, kill and restart, authorization,
``milvus-lite server`` and its freezing.

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

from embedq.core.errors import ConfigError

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


class Server:
    """What every server shares: one process in a group of its own, a log, a wait
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
            wait_until(
                ready,
                timeout_s,
                f"{self.name} on port {self.port} ({self.log})",
                every_s=every_s,
                ignore=(),
            )
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


class RedisServer(Server):
    """A private ``redis-server`` with no persistence; ``args`` go last and win.

    ``command`` asks ``_listen`` for the port flags and ``_options`` for the rest, so a
    subclass (the tests' TLS and AOF servers) changes those and nothing else.
    """

    name = "redis-server"

    def __init__(self, data_dir: Path, *args: str) -> None:
        super().__init__(data_dir)
        self.args = args

    @property
    def url(self) -> str:
        return self.url_for()

    def url_for(self, userinfo: str = "") -> str:
        """The URL, with ``user:password`` in it when ``userinfo`` is given."""
        auth = f"{userinfo}@" if userinfo else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def command(self) -> list[str]:
        binary = find_binary("redis-server", "apt-get install redis-server")
        return [
            binary,
            *self._listen(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(self.log),
            *self._options(),
            *self.args,
        ]

    def _listen(self) -> list[str]:
        return ["--port", str(self.port)]

    def _options(self) -> list[str]:
        return ["--appendonly", "no"]

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


class MilvusStandalone(Server):
    """A real Milvus 2.3.5 standalone (``milvus-server`` from the ``milvus`` package), ready
    in ~10-20 s. A subclass adds flags with ``_options`` and sets ``token`` when the server
    wants one (the tests' authorization).

    The embedded etcd's peer port is fixed at 2380 unless an etcd config file says
    otherwise (read through ETCD_CONFIG_PATH), so two instances on one machine clash
    without it; every port here is a free one. The wrapper runs ``milvus run standalone``
    as a child and stops it on SIGINT (not on SIGTERM); that child is remembered by pid
    and stopped by pid too, since it can outlive the wrapper's process group.
    """

    name = "milvus-server"
    stop_signal = signal.SIGINT
    stop_wait_s = 30.0
    token = ""  # what readiness checks log in with

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
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
        args = [
            find_binary("milvus-server", "pip install milvus==2.3.5"),
            "--data",
            str(self.dir / "data"),
            "--proxy-port",
            str(self.port),
            "--etcd-port",
            str(etcd_client),
        ]
        for role in (
            "root-coord",
            "proxy-internal",
            "query-coord",
            "query-node",
            "index-coord",
            "index-node",
            "data-coord",
            "data-node",
        ):
            args += [f"--{role}-port", str(free_port())]
        args += self._options()
        self._launch(args, env={**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)})
        self._wait_ready(self._answers, 300, 1.0)
        return self

    def _options(self) -> list[str]:
        return []

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
