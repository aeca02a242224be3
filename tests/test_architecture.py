"""The shape of the package, checked: no import cycles inside ``embedq``, no import that
points up the layers, the benchmark out of the product's import graph, and modules and
functions of a size one can read.

Imports inside functions count (a deferred import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedq"
MAX_FUNCTION_LINES = 60
# The benchmark and its thin command; nothing else may import the benchmark.
BENCH = ("embedq.bench", "embedq.cli.bench")

# Subpackages, lowest layer first. A module imports only from its own subpackage and from
# lower layers: never upward, never sideways into a peer of the same layer (queue and
# model know nothing of each other; neither do worker and producer, nor ops and api).
# bench sits above everything and only cli.bench imports it (see BENCH). A module directly
# in embedq/ belongs to no layer and is not checked.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("queue", "model"),
    ("sink",),
    ("worker", "producer"),
    ("ops", "api"),
    ("cli",),
    ("bench",),
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

# A module past this many lines is asked to be split (habit 23: a signal, not a target).
# The few that stay longer say why here; the reason is what a reviewer weighs.
REVIEW_LINES = 500
LONG_MODULES: dict[str, str] = {
    "embedq/sink/milvus.py": (
        "the Milvus client's whole surface (collection lifecycle, upsert, delete, search, "
        "properties) behind one translated-errors boundary; split when search grows"
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The embedq modules ``tree`` imports (``from embedq.x import y`` counts ``embedq.x.y``
    when that is a module, else ``embedq.x``)."""
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name in known}
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    found.add(sub if sub in known else child.module)
            todo.append(child)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(tree, known) - {name} for name, tree in trees.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_inside_the_package() -> None:
    edges = graph()
    # The package's own __init__ files import their submodules (the CLI registers its
    # commands); an edge from a submodule to its package is not a dependency on siblings.
    for name, deps in edges.items():
        edges[name] = {d for d in deps if not name.startswith(d + ".")}
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_product_module_imports_the_benchmark() -> None:
    offenders = {
        name: sorted(d for d in deps if d.startswith("embedq.bench"))
        for name, deps in graph().items()
        if not name.startswith(BENCH)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def layer(module: str) -> str | None:
    """The subpackage of LAYERS that ``module`` is in (None: directly in embedq/)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else None


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module by one of the same or a lower layer's other subpackages."""
    found = []
    for name, deps in sorted(edges.items()):
        here = layer(name)
        for dep in sorted(deps):
            there = layer(dep)
            if here is None or there is None or here == there:
                continue
            if there == "bench" and name.startswith(BENCH):
                continue
            if RANK[there] >= RANK[here]:
                found.append(f"{name} ({here}) imports {dep} ({there})")
    return found


def test_no_import_points_upward() -> None:
    assert upward(graph()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    edges = {
        "embedq.core.keys": {"embedq.queue.stream"},
        "embedq.model.encoder": {"embedq.queue.stream"},
        "embedq.cli.bench": {"embedq.bench.run"},
        "embedq.ops.verify": {"embedq.core.keys", "embedq.ops.top"},
        "embedq.api.app": {"embedq.ops.top"},
    }
    assert upward(edges) == [
        "embedq.api.app (api) imports embedq.ops.top (ops)",
        "embedq.core.keys (core) imports embedq.queue.stream (queue)",
        "embedq.model.encoder (model) imports embedq.queue.stream (queue)",
    ]


def test_modules_and_functions_stay_a_readable_size() -> None:
    too_long: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE.parent).as_posix()
        lines = path.read_text().count("\n")
        if lines > REVIEW_LINES and where not in LONG_MODULES:
            too_long.append(f"{where}: {lines} lines (split it, or say why in LONG_MODULES)")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {size} lines")
    assert too_long == []


def test_long_modules_name_a_reason() -> None:
    assert all(len(reason) > 20 for reason in LONG_MODULES.values())


def test_the_readme_layout_names_every_subpackage() -> None:
    """The file list is the architecture: the Layout (docs/architecture.md, issue 28) names
    each subpackage (and any module still directly in embedq/), one line each; the modules
    speak for themselves."""
    readme = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    names |= {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert sorted(n for n in names if n not in layout) == []
