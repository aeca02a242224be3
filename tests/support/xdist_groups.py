"""Tests that share a costly session server run on one pytest-xdist worker (issue 24).

A Milvus 2.3.5 server takes 20-60 s of two cores to start and holds ~1 GiB; under
``-n 2`` each xdist worker used to start its own (``--dist loadgroup`` cannot pin them:
pytest-xdist 3.8 tags a group by rewriting ``item._nodeid``, which pytest 9's structured
node ids ignore). Here the workers say at collection which tests use such a server (from
the fixtures in their closure, as the ``slow`` marker is decided), the controller reads
that list, and a ``LoadScopeScheduling`` whose scope is the server group (every other test
is a scope of its own) sends the whole group to one worker, largest scope first, while the
other workers take the rest one test at a time.

After the groups, the ``slow`` tests (real servers and processes, up to minutes each) go
before the fast ones: in collection order a minutes-long test that starts last (the README
walk-through, ``test_readme.py``) runs on one worker while the others have nothing left to
do, and the fast tests, seconds each, are what evens the workers' ends out.

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
    """On a worker, after collection (and after the ``slow`` marks): write the grouped
    tests ({nodeid: group}) and the slow ones."""
    path = groups_file(config)
    if path is None:
        return
    grouped = {
        item.nodeid: SERVER_GROUPS[name]
        for item in items
        for name in getattr(item, "fixturenames", ())
        if name in SERVER_GROUPS
    }
    slow = [item.nodeid for item in items if item.get_closest_marker("slow") is not None]
    # Every worker collects the same tests and writes the same content; rename is atomic.
    scratch = path.with_suffix(f".{os.getpid()}")
    scratch.write_text(json.dumps({"groups": grouped, "slow": slow}))
    scratch.replace(path)


def make_scheduler(config: pytest.Config, log: Any, path: Path) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        """Scope = the test's server group, or the test itself; groups first (largest
        first), then slow tests, then fast ones, each kind in collection order."""

        _groups: dict[str, str] | None = None
        slow: frozenset[str] = frozenset()

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:
                # Read once the workers have collected (schedule() runs after that).
                found = json.loads(path.read_text()) if path.exists() else {}
                self._groups = found.get("groups", {})
                self.slow = frozenset(found.get("slow", ()))
            return self._groups.get(nodeid, nodeid)

        def remove_node(self, node: Any) -> str | None:
            # A crashed worker's finished scopes stay out of the queue: LoadScopeScheduling
            # (pytest-xdist 3.8) requeues all of them, a node then gets scopes with nothing
            # to run, no test completes to reschedule it, and the run hangs (seen here after
            # a worker crashed: both workers idle until interrupted).
            workload = self.assigned_work.get(node, {})
            for scope in [s for s, unit in workload.items() if all(unit.values())]:
                del workload[scope]
            return super().remove_node(node)  # type: ignore[no-any-return]

        def schedule(self) -> None:
            if self.collection is None and self.collection_is_completed:
                first_schedule(self)
            else:
                super().schedule()

    return ServerGroupScheduling(config, log)


def first_schedule(scheduler: Any) -> None:
    """``LoadScopeScheduling.schedule``'s first call (pytest-xdist 3.8), with the work
    queue in the order ``ServerGroupScheduling`` gives."""
    if not scheduler._check_nodes_have_same_collection():
        scheduler.log("**Different tests collected, aborting run**")
        return
    scheduler.collection = list(next(iter(scheduler.registered_collections.values())))
    if not scheduler.collection:
        return
    scopes: dict[str, dict[str, bool]] = {}
    for nodeid in scheduler.collection:
        scopes.setdefault(scheduler._split_scope(nodeid), {})[nodeid] = False

    def rank(scope: tuple[str, dict[str, bool]]) -> tuple[int, bool]:
        return (-len(scope[1]), not any(nodeid in scheduler.slow for nodeid in scope[1]))

    for scope, nodeids in sorted(scopes.items(), key=rank):  # stable: collection order
        scheduler.workqueue[scope] = nodeids
    for _ in range(len(scheduler.nodes) - len(scheduler.workqueue)):  # more workers than work
        unused, _assigned = scheduler.assigned_work.popitem()
        unused.shutdown()
    for node in scheduler.nodes:
        scheduler._assign_work_unit(node)
    for node in scheduler.nodes:  # at least two work units each if possible (xdist #277)
        scheduler._reschedule(node)
    if not scheduler.workqueue:
        for node in scheduler.nodes:
            node.shutdown()
