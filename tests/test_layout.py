"""The code's shape: data flows one way (train <- tune, train <- demo), with no import cycles.

Every import counts, also those inside functions (they are how cycles hide): the graph is read from
the source with ``ast``, so the test needs no imports of the packages themselves.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "tune", "demo")
LEAVES = ("train.errors", "train.distributed", "demo.settings")  # import nothing of reslab


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    files = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).glob("*.py")):
            files[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        pkg = mod.split(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                target = (f"{pkg}.{node.module}" if node.module else pkg) if node.level else (node.module or "")
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in files and n != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The reader itself: a cycle made only by a function-level import is found."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "train" / "a.py").write_text("from .b import x\n")
    (tmp_path / "train" / "b.py").write_text("def f():\n    from train import a\n")
    assert cycles(import_graph(tmp_path)) == [["train.a", "train.b"]]


def test_no_import_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 30  # the packages were read
    assert cycles(graph) == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles(graph))


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_the_project(leaf):
    assert import_graph(ROOT)[leaf] == set()


def test_train_imports_neither_tune_nor_demo():
    graph = import_graph(ROOT)
    upward = {m: sorted(t for t in ts if t.split(".")[0] in ("tune", "demo")) for m, ts in graph.items() if m.startswith("train")}
    assert {m: ts for m, ts in upward.items() if ts} == {}
    assert {m: sorted(ts) for m, ts in graph.items() if m.startswith("tune") and any(t.startswith("demo") for t in ts)} == {}


def test_serving_processes_do_not_load_the_report_libraries():
    """`reslab demo` and `reslab predict` import train.tracking (the store) but never make a report:
    scikit-learn and matplotlib (~1 s of start-up together) load only where metrics or plots are made."""
    code = ("import sys, demo.cli, demo.predict, demo.app, train.tracking, train.usemodel\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
