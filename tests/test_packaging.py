"""The package as a user installs it: a wheel carries the datasets, and a fresh venv runs the CLI from it.

The wheel is built from a copy of the source files (the checkout is left untouched) without network access
(``--no-build-isolation`` with the setuptools of this environment, which the test extra pins). The venv
reuses this environment's installed dependencies (``--system-site-packages``) and installs only the wheel,
so the test is fast and offline; it runs from a folder outside the checkout with PYTHONPATH unset, so only
the installed copy of prima_sim can be imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "prima_sim", "datasets")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_datasets"))
        else:
            shutil.copy2(p, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp / "dist").glob("prima_sim-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (dependencies from this environment)."""
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(v)], check=True
    )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(v / "bin" / "python"), "install", "--no-deps", "--no-index",
         "-q", str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return v


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PRIMA_SIM_DATASETS")}
    return env | extra


def _cli(venv: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "prima-sim"), *args], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_wheel_holds_every_dataset_file_and_no_tests(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {
        "prima_sim/_datasets/" + p.relative_to(ROOT / "datasets").as_posix()
        for p in (ROOT / "datasets").rglob("*")
        if p.is_file() and p.suffix in (".toml", ".md")
    }
    assert want, "the checkout has no datasets"
    assert want <= names, sorted(want - names)
    assert "prima_sim/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_wheel_plans_and_lists_models(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import prima_sim; print(prima_sim.__file__)"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    out = _cli(venv, tmp_path, "plan", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["cluster"] == "default" and plan["model"].startswith("llama3-70b")
    assert sum(d["layers"][-1][1] - d["layers"][0][0] > 0 for d in plan["devices"]) >= 1
    out = _cli(venv, tmp_path, "model-info", "--list", "--json")
    assert out.returncode == 0, out.stderr
    ids = {m["id"] for m in json.loads(out.stdout)["models"]}
    assert {"llama3-70b", "qwen2.5-32b"} <= ids
    out = _cli(
        venv, tmp_path, "plan", "--cluster", "examples/home", "--model", "qwen2.5-32b"
    )  # a bundled example
    assert out.returncode == 0, out.stderr
    assert "halda plan of qwen2.5-32b" in out.stdout


def test_installed_wheel_honours_prima_sim_datasets(venv: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for kind in ("devices", "models"):
        shutil.copytree(ROOT / "datasets" / kind, data / kind)
    (data / "clusters").mkdir()
    (data / "clusters" / "mine.toml").write_text('name = "mine"\ndevices = ["D3", "D2"]\n', encoding="utf-8")
    out = _cli(venv, tmp_path, "plan", "--cluster", "mine", "--model", "llama3-8b", "--json",
               PRIMA_SIM_DATASETS=str(data))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cluster"] == "mine"
    out = _cli(venv, tmp_path, "plan", "--cluster", "default", PRIMA_SIM_DATASETS=str(data))
    assert out.returncode == 2
    assert "bundled: mine" in out.stderr and "Traceback" not in out.stderr
