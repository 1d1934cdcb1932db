"""The package's shape: imports flow one way, from the stages down to the core, without cycles, and
an import inside a function says why it is there. Read from the source files (not imported), so
a new upward import or cycle fails here before anyone has to untangle it."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package each one is (setup.cfg package_dir).
FOLDERS = {"nas_dose": "nas_dose", "search_spaces": "nas_dose.search_spaces", "strategies": "nas_dose.strategies",
           "distill": "nas_dose.distill"}
# Bottom to top; a module is in the layer of the longest prefix that names it ("nas_dose" alone
# is the package's own __init__). A module may import from its own layer or below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("nas_dose", "nas_dose.errors", "nas_dose.io", "nas_dose.config", "nas_dose.progress",
              "nas_dose.runtime", "nas_dose.distributed", "nas_dose.parallel", "nas_dose.registry")),
    ("data", ("nas_dose.data",)),
    ("measures", ("nas_dose.scores", "nas_dose.plots")),
    ("search space", ("nas_dose.search_spaces",)),
    ("models", ("nas_dose.models",)),
    ("engine", ("nas_dose.training", "nas_dose.cascade.patches", "nas_dose.cascade.windows", "nas_dose.pool",
                "nas_dose.selection", "nas_dose.inference")),
    ("methods", ("nas_dose.strategies", "nas_dose.distill", "nas_dose.cascade")),
    ("stages", ("nas_dose.train", "nas_dose.predict", "nas_dose.evaluate", "nas_dose.ensemble", "nas_dose.api",
                "nas_dose.export", "nas_dose.view", "nas_dose.strategies.search", "nas_dose.distill.distill",
                "nas_dose.distill.student_search")),
    ("pipeline", ("nas_dose.recipe", "nas_dose.pipeline")),
    ("command line", ("nas_dose.cli", "nas_dose.__main__")),
]


# The one import that goes up: the package's __init__ names the API (the stages' nas_dose.api)
# inside its module __getattr__, on first use (PEP 562), so `import nas_dose` loads the core only
# and no cycle is made at import time (test_import_nas_dose_loads_no_layer_above_the_core).
LAZY_FACADE = ("nas_dose", "nas_dose.api")


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    out = {}
    for folder, package in FOLDERS.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = [p for p in file.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = (file, file.name == "__init__.py")
    return out


def layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact = prefix == "nas_dose"
            if (module == prefix or (not exact and module.startswith(prefix + "."))) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise AssertionError(f"{module}: in no layer of tests/test_architecture.py; add it")
    return rank


def imports(name: str, file: Path, package: bool, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported nasdose module, node, inside a function) for each import of `file`."""
    tree = ast.parse(file.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    here = name.split(".") if package else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            lazy = id(node) in in_function
            if target in known and target != name and not (lazy and (name, target) == LAZY_FACADE):
                found.append((target, node, lazy))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, ast.stmt, bool]]]:
    mods = modules()
    return {name: imports(name, file, package, set(mods)) for name, (file, package) in mods.items()}


def test_imports_flow_down_the_layers(graph):
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, edges in graph.items() for b, _, _ in edges if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    edges = defaultdict(set)
    for a, found in graph.items():
        edges[a].update(b for b, _, _ in found)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_imports_inside_functions_say_why():
    """Only where they avoid loading a heavy optional dependency, with a comment saying so (on a
    line of the run of imports, or just above it)."""
    silent = set()
    for name, (file, _) in modules().items():
        lines = file.read_text().splitlines()
        for f in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            found = sorted((n for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))),
                           key=lambda n: n.lineno)
            runs: list[list[ast.stmt]] = []
            for node in found:
                if runs and node.lineno == runs[-1][-1].end_lineno + 1:
                    runs[-1].append(node)
                else:
                    runs.append([node])
            for run in runs:
                if not any("#" in line for line in lines[run[0].lineno - 2:run[-1].end_lineno]):
                    silent.add(f"{file.relative_to(ROOT)}:{run[0].lineno}")
    assert not silent, sorted(silent)


def test_a_wrong_layer_is_caught():
    assert layer("nas_dose.models.factory") < layer("nas_dose.training.engine") < layer("nas_dose.train")
    assert layer("nas_dose.strategies.base") < layer("nas_dose.strategies.search") < layer("nas_dose.cli.search")
    assert layer("nas_dose.pool.diversity") < layer("nas_dose.strategies.evolution")
    assert layer("nas_dose.pool.diversity") < layer("nas_dose.ensemble")


def test_import_nas_dose_loads_no_layer_above_the_core():
    """`import nas_dose` is cheap (no torch, no stage); `nas_dose.load` then brings the API."""
    code = ("import sys, nas_dose; before = set(sys.modules); nas_dose.load; "
            "print(sorted(m for m in before if m.startswith('nas_dose.') or m == 'torch'), "
            "'nas_dose.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]
