"""Tests that share a costly session server run on one pytest-xdist worker (issue 24).

A Milvus 2.3.5 server takes 20-60 s of two cores to start and holds ~1 GiB; under
``-n 2`` each xdist worker used to start its own (``--dist loadgroup`` cannot pin them:
pytest-xdist 3.8 tags a group by rewriting ``item._nodeid``, which pytest 9's structured
node ids ignore). Here the workers say at collection which tests use such a server (from
the fixtures in their closure, as the ``slow`` marker is decided), the controller reads
that list, and a ``LoadScopeScheduling`` whose scope is the server group (every other test
is a scope of its own) sends the whole group to one worker, largest scope first, while the
other worker takes the rest one test at a time.

Without xdist (``-n 0``) none of this runs: the session fixtures start each server once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# fixture -> the group of tests that must share one worker (and so one server process)
SERVER_GROUPS = {
    "milvus_standalone": "milvus-2.3.5",
    "milvus_server_factory": "milvus-2.3.5",
}
INPUT_KEY = "embedq_server_groups"


def groups_file(config: pytest.Config) -> Path | None:
    """Where workers write the groups: handed to them by the controller; None without xdist."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is None or INPUT_KEY not in workerinput:
        return None
    return Path(workerinput[INPUT_KEY])


def record(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker, after collection: write {nodeid: group} for the grouped tests."""
    path = groups_file(config)
    if path is None:
        return
    grouped = {
        item.nodeid: SERVER_GROUPS[name]
        for item in items
        for name in getattr(item, "fixturenames", ())
        if name in SERVER_GROUPS
    }
    # Every worker collects the same tests and writes the same content; rename is atomic.
    scratch = path.with_suffix(f".{os.getpid()}")
    scratch.write_text(json.dumps(grouped))
    scratch.replace(path)


def make_scheduler(config: pytest.Config, log: Any, path: Path) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        """Scope = the test's server group, or the test itself."""

        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                # Read once the workers have collected (schedule() runs after that).
                self._groups = json.loads(path.read_text()) if path.exists() else {}
            return self._groups.get(nodeid, nodeid)

    return ServerGroupScheduling(config, log)
