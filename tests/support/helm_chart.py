"""The Helm chart's engine (helm-python-sdk) in a child process of its own.

helm-python-sdk binds Helm's Go SDK with ctypes: the Go runtime starts inside the process
that imports it. Inside a pytest worker that had run the slow tests (gRPC and torch
threads, servers, signal handlers), the first render killed the worker outright in both
full runs of 2026-12-07 ("node down: Not properly terminated", no traceback). The Go runtime
now lives in one spawned child per test process, started on first use; the tests get plain
data back (files, values, lint reports) and ``HelmFailed`` for Helm's errors. The child
costs about a second, once per test process, so the chart's tests stay in the fast layer.
"""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[2] / "helm" / "embedq"


class HelmFailed(Exception):
    """A Helm error in the child: ``kind`` is its class name (``HelmValuesError``...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def _in_child(action: str, values: dict[str, Any], options: dict[str, Any]) -> Any:
    import helm_python as helm

    try:
        if action == "lint":
            return dict(helm.lint(CHART, values, **options))
        with helm.Chart.load(CHART) as chart:
            if action == "render":
                return dict(chart.render(values, **options))
            if action == "merge_values":
                return chart.merge_values(values)
            chart.validate_schema(values)
            return None
    except helm.HelmError as exc:
        raise HelmFailed(type(exc).__name__, str(exc)) from None


@functools.cache
def _child() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


def _run(action: str, values: dict[str, Any], **options: Any) -> Any:
    return _child().submit(_in_child, action, values, options).result()


def render(values: dict[str, Any], **options: Any) -> dict[str, str]:
    """``Chart.render``: the chart's files by name."""
    found: dict[str, str] = _run("render", values, **options)
    return found


def merge_values(values: dict[str, Any]) -> dict[str, Any]:
    """The chart's defaults with ``values`` over them."""
    found: dict[str, Any] = _run("merge_values", values)
    return found


def validate_schema(values: dict[str, Any]) -> None:
    _run("validate_schema", values)


def lint(values: dict[str, Any], **options: Any) -> dict[str, Any]:
    found: dict[str, Any] = _run("lint", values, **options)
    return found
