"""Which tests belong to the slow layer, decided from what they use (see tests/conftest.py).

A test is slow when a fixture in its closure is one of ``SLOW_FIXTURES``, or when its code
can start a process: the test function, the fixtures it uses, and every function or class
of the test suite they name (followed transitively, nested functions and lambdas
included) are searched for a name bound to ``subprocess``, ``multiprocessing``,
``os.fork``/``os.system``, ``embedq.worker.replicas.run_per_device``, or a server launcher (a
subclass of ``embedq.bench.servers.Server``). Library and product code is not searched: an
in-process ``CliRunner`` call, or a Milvus Lite file opened through ``pymilvus`` (the
product's embedded default), stays in the fast layer.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import subprocess
import types
from collections.abc import Iterable, Mapping
from typing import Any

from embedq.bench.servers import Server
from embedq.worker.replicas import run_per_device

# Fixtures that start a server or a process, or load the real packaged model (seconds of
# load and of CPU per batch; tiny_encoder is the fast layer's model).
SLOW_FIXTURES = frozenset(
    {
        "private_redis",
        "milvus_lite_server",
        "milvus_standalone",
        "milvus_server_factory",
        "spawn_worker",
        "encoder",
    }
)

_SPAWNERS: tuple[object, ...] = (
    subprocess,
    multiprocessing,
    subprocess.Popen,
    subprocess.run,
    subprocess.call,
    subprocess.check_call,
    subprocess.check_output,
    os.fork,
    os.system,
    run_per_device,  # the product's one process starter: a worker per device
)
# Names that start a process even where they cannot be resolved (an import inside a
# function binds them locally, out of reach of the module's globals).
_SPAWNER_NAMES = frozenset({"subprocess", "Popen", "WorkerProcess"})

_memo: dict[int, bool] = {}
_kept: list[object] = []  # the memo is keyed by id(): keep its objects alive


def _ours(obj: object) -> bool:
    """Defined by the test suite (tests/ and its conftest), not by a library."""
    module = getattr(obj, "__module__", None) or ""
    return module in {"conftest", "tests"} or module.startswith("tests.")


def starts_processes(obj: object) -> bool:
    """True when ``obj`` (a test-suite function, class or method) can start a process."""
    key = id(obj)
    if key in _memo:
        return _memo[key]
    _memo[key] = False  # a cycle (mutual recursion) adds nothing
    _kept.append(obj)
    _memo[key] = found = _search(obj)
    return found


def _search(obj: object) -> bool:
    if any(obj is spawner for spawner in _SPAWNERS):
        return True
    if isinstance(obj, type):
        ours = _ours(obj) and any(starts_processes(v) for v in vars(obj).values())
        return issubclass(obj, Server) or ours
    if isinstance(obj, staticmethod | classmethod):
        return starts_processes(obj.__func__)
    if isinstance(obj, property):
        return any(starts_processes(f) for f in (obj.fget, obj.fset) if f is not None)
    function = inspect.unwrap(obj) if callable(obj) else obj
    ours = isinstance(function, types.FunctionType) and _ours(function)
    return ours and _code_starts(function.__code__, function.__globals__)


def _code_starts(code: types.CodeType, names: Mapping[str, Any]) -> bool:
    for name in code.co_names:
        if name in _SPAWNER_NAMES:
            return True
        if name in names and starts_processes(names[name]):
            return True
    nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
    return any(_code_starts(c, names) for c in nested)


def is_slow(
    function: object, fixture_names: Iterable[str], fixture_funcs: Iterable[object]
) -> bool:
    """The layer rule for one test: its function, its fixture closure by name, and the
    functions of those fixtures."""
    names = set(fixture_names)
    if names & SLOW_FIXTURES:
        return True
    return starts_processes(function) or any(starts_processes(f) for f in fixture_funcs)
