"""``embedq`` as a user runs it: ``python -m embedq.cli`` in a subprocess, the one helper
the test files share (issue 24: five files had a copy each). ``tests/test_cli_errors.py``
runs most of its rows in-process through click's ``CliRunner`` instead; a subprocess is
what proves a real process's exit status, stderr and environment."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import structlog

from embedq.core import logs

# For the tests that read the log events a command writes to stderr, one JSON object a line.
JSON_LOGS = {"EMBEDQ_LOG_JSON": "true"}


def embedq(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: int | str | None = None,
    timeout: float = 240,
    fresh: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``embedq ARGS`` run to its end, whatever its exit status (the tests assert on it),
    with this process's environment, ``HF_HUB_OFFLINE`` (the packaged model is local), and
    ``env`` over both.

    ``stdin`` is text to send, or a file descriptor to read from (a pty's, for a terminal).
    ``fresh`` runs it as from a new shell: without this process's ``EMBEDQ_*`` variables, in
    the temporary directory, where a default ``./embedq.db`` lands instead of the checkout.
    """
    inherited = {k: v for k, v in os.environ.items() if not (fresh and k.startswith("EMBEDQ_"))}
    return subprocess.run(
        [sys.executable, "-m", "embedq.cli", *args],
        env={**inherited, "HF_HUB_OFFLINE": "1", **(env or {})},
        cwd=tempfile.gettempdir() if fresh else None,
        stdin=stdin if isinstance(stdin, int) else None,
        input=stdin if isinstance(stdin, str) else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def process_globals_restored() -> Iterator[None]:
    """``embedq.core.logs.configure`` sets up a process: structlog, the root logger's handler
    (on the runner's stderr, closed after the call), warnings into logging, excepthooks,
    GRPC_VERBOSITY. Put them all back, so the next test logs as before: tests/conftest.py
    wraps every test in this, since a test that runs a command in-process (``CliRunner``,
    ``--log-level error``) would leave the next test's ``capture_logs`` filtered."""
    root = logging.getLogger()
    saved = (structlog.get_config(), root.handlers[:], root.level, sys.excepthook)
    saved_logs = (logs._scrubber, logs._for_a_person, logs._stdlib_handler)
    thread_hook, grpc = threading.excepthook, os.environ.get("GRPC_VERBOSITY")
    try:
        yield
    finally:
        logging.captureWarnings(False)
        structlog.configure(**saved[0])
        root.handlers[:], root.level, sys.excepthook = saved[1], saved[2], saved[3]
        logs._scrubber, logs._for_a_person, logs._stdlib_handler = saved_logs
        threading.excepthook = thread_hook
        if grpc is None:
            os.environ.pop("GRPC_VERBOSITY", None)
        else:
            os.environ["GRPC_VERBOSITY"] = grpc
