"""Real worker processes for the fault tests; the servers they run against (a private
``redis-server`` with AOF, ``milvus-lite server``, a Milvus 2.3.5 standalone) come from
``tests/support/servers.py`` through the fixtures in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


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
