"""The installed ``prima-sim`` as a user runs it: every ``--json`` prints exactly one JSON object on stdout, and
no solver writes anything (HiGHS prints a banner from C code when it starts, whatever its options)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("prima-sim")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "prima_sim.cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--json"],
        ["plan", "--json", "--explain"],
        ["plan", "--json", "--compare"],
        ["plan", "--json", "--scheduler", "prima"],
        ["plan", "--json", "--cluster", "paper-hetero2", "--model", "qwen2.5-72b"],
        [
            "simulate",
            "--json",
            "--cluster",
            "default",
            "--model",
            "llama3-8b",
            "--tokens",
            "4",
            "--prompt-tokens",
            "8",
        ],
        ["model-info", "--json", "llama3-70b"],
    ],
    ids=lambda a: " ".join(a),
)
def test_json_output_is_exactly_one_object_and_nothing_else(args: list[str], tmp_path: Path) -> None:
    res = _run(args, tmp_path)
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout)  # exactly one JSON document: leading or trailing text would fail here
    for stream in (res.stdout, res.stderr):
        assert "Running HiGHS" not in stream and "Copyright" not in stream


def test_sweep_quiet_prints_no_solver_banner(tmp_path: Path) -> None:
    res = _run(["sweep", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--scheduler", "halda,prima",
                "--tokens", "2", "--prompt-tokens", "4", "--jobs", "2", "--out", str(tmp_path / "s.csv"), "--quiet"],
               tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Running HiGHS" not in res.stdout + res.stderr
    assert (tmp_path / "s.csv").read_text().count("\n") >= 3
