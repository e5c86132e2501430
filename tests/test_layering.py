"""Architecture rules: the planner and simulator never reach the executor, llama.cpp or ZeroMQ."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e .[test]")
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and " 0 broken" in out.stdout


def test_planning_imports_neither_llama_cpp_nor_zmq() -> None:
    """Planning must work with the base install: importing the planner pulls in no exec dependency."""
    code = (
        "import sys; import prima_sim.halda.planner, prima_sim.cli.plan; "
        "bad = [m for m in ('llama_cpp', 'zmq', 'prima_sim.exec') if m in sys.modules]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def import_cycles(package: str = "prima_sim") -> list[list[str]]:
    """Strongly connected groups of modules that import each other (type-checking imports included)."""
    import grimp

    g = grimp.build_graph(package)
    edges = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycles() -> None:
    assert import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\n")
    (pkg / "b.py").write_text("from cyc import a\n")
    (pkg / "c.py").write_text("from cyc import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyc") == [["cyc.a", "cyc.b"]]


def test_a_long_module_says_why_it_is_one_module() -> None:
    """Modules stay small (issue 13): one of more than 500 lines says at its top why it is one module."""
    import ast

    root = Path(__file__).resolve().parents[1] / "prima_sim"
    silent = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 500:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module of this size" not in doc:
                silent.append(str(path.relative_to(root.parent)))
    assert not silent, f"split these, or say at their top why each is one module: {silent}"


def test_no_python_code_runs_from_strings() -> None:
    """Child processes run real modules (``python -m``), linted and tested, never code strings (``python -c``)."""
    import re

    root = Path(__file__).resolve().parents[1] / "prima_sim"
    found = [
        str(p.relative_to(root.parent))
        for p in sorted(root.rglob("*.py"))
        if re.search(r"sys\.executable,\s*\"-c\"", p.read_text(encoding="utf-8"))
    ]
    assert not found, f"run these as modules (python -m) instead of code strings: {found}"
