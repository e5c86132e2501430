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
