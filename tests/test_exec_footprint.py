"""The executor's own memory: what a worker's and the head's process import (docs/exec.md, "Memory of the executor's
processes"), the probe that measures it, and how the emulation charges it to a device. No timing, no cgroups."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from prima_sim.cli.main import COMMAND_MODULES, _commands_for, build_parser
from prima_sim.exec.footprint_probe import ROLE_IMPORTS

ROOT = Path(__file__).resolve().parents[1]
real = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("zmq") is None,
    reason="llama-cpp-python and pyzmq (the real extra) are not installed",
)
NOT_IN_A_WORKER = (
    # the planner, the simulator and the solvers; the GGUF writer's gguf (and its yaml); the device profiles;
    # llama-cpp-python's high-level API (Llama, chat formats, jinja2)
    "prima_sim.halda", "prima_sim.sim", "prima_sim.devices.profile", "prima_sim.exec.shard", "pulp", "highspy",
    "simpy", "gguf", "yaml", "llama_cpp.llama", "jinja2",
)  # fmt: skip


def test_a_command_line_imports_only_its_command() -> None:
    assert _commands_for(["worker", "--device", "D1"]) == ("worker",)
    assert _commands_for(["model-info", "x.gguf"]) == ("model_info",)
    # no command, an option first, an unknown or misspelt command: every module (the full help or error)
    for argv in ([], ["--version"], ["-h"], ["bogus"], ["model_info"]):
        assert _commands_for(argv) == COMMAND_MODULES


def test_one_command_parses_as_the_full_parser_does() -> None:
    argv = ["worker", "--device", "D1", "--shards", "s", "--threads", "2", "--no-prefetch", "--batch", "64"]
    assert vars(build_parser(_commands_for(argv)).parse_args(argv)) == vars(build_parser().parse_args(argv))


def _run_function_imports(module: str) -> set[str]:
    """The prima_sim modules a ``prima_sim.cli`` module's ``run`` imports inside the function."""
    src = inspect.getsource(importlib.import_module(module))
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "run")
    return {n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("role", sorted(ROLE_IMPORTS))
def test_the_probe_imports_what_the_command_imports(role: str) -> None:
    command, modules = ROLE_IMPORTS[role]
    assert _run_function_imports(f"prima_sim.cli.{command}") <= set(modules)


@real
@pytest.mark.parametrize("role", sorted(ROLE_IMPORTS))
def test_an_executor_process_holds_no_planner_gguf_or_high_level_llama(role: str) -> None:
    not_in = NOT_IN_A_WORKER + (("numpy",) if role == "worker" else ())  # the head's API returns arrays
    code = (
        "import sys\n"
        "from prima_sim.exec.footprint_probe import import_role\n"
        f"import_role({role!r})\n"
        "from prima_sim.exec.llamacpp import load_runtime\n"
        "load_runtime()\n"
        f"print([m for m in {not_in!r} if m in sys.modules], 'llama_cpp.llama_cpp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[] True"


@real
def test_the_package_still_imports_after_the_bindings() -> None:
    """bindings() loads llama_cpp.llama_cpp without the package's __init__; 'import llama_cpp' later gets the real
    package (its high-level API) over the same bindings module."""
    code = (
        "import sys\n"
        "from prima_sim.exec.llamacpp import bindings\n"
        "lc = bindings()\n"
        "assert 'llama_cpp' not in sys.modules and 'llama_cpp.llama' not in sys.modules\n"
        "import llama_cpp\n"
        "from llama_cpp.llama_chat_format import Jinja2ChatFormatter\n"
        "assert llama_cpp.llama_cpp is lc and llama_cpp.llama_decode is lc.llama_decode and bindings() is lc\n"
        "print(llama_cpp.Llama.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "Llama"


def test_the_head_is_charged_its_runtime_and_the_tokenizer() -> None:
    from prima_sim.emulate.calibrate import NOT_MEASURED, Footprint, executor_overhead

    fp = Footprint(worker=28, head=29, vocab=15)
    assert executor_overhead(fp, is_head=True) == 44 and executor_overhead(fp, is_head=False) == 28
    assert executor_overhead(NOT_MEASURED, is_head=True) == 0


@real
def test_a_workers_window_without_arrays_computes_the_same_bytes(smollm2: Path, tmp_path: Path) -> None:
    """A worker's Window (arrays=False: memoryviews in and out, no numpy) gives the bytes the head's (arrays) does,
    for a prompt's batch and a decoded token, through run_hidden and run_rows."""
    import numpy as np

    from prima_sim.exec.llamacpp import Model, Window
    from prima_sim.exec.manifest import shard_path
    from prima_sim.exec.shard import write_shards
    from prima_sim.plan import Plan, make_assignments

    plan = Plan(model_id="m", n_layers=30, cluster_name="c", k=1, n_ctx=64, scheduler="manual",
                devices=make_assignments(["D0", "D1"], (20, 10), [0, 0], 30))  # fmt: skip
    man = write_shards(smollm2, plan, tmp_path)["D1"]
    with Model(shard_path(tmp_path / "D1", man, man.shards[0])) as model:
        h = np.random.default_rng(0).standard_normal((5, model.n_embd), dtype=np.float32)
        with Window(model, "hidden", 64, 8, 1) as a, Window(model, "hidden", 64, 8, 1, arrays=False) as b:
            want = [a.run_hidden(h, 0).copy(), a.run_hidden(h[:1], 5).copy()]
            got = [bytes(b.run_hidden(memoryview(h.tobytes()).cast("f"), 0))]
            got.append(bytes(b.run_hidden(memoryview(h[:1].tobytes()).cast("f"), 5)))
            assert [w.tobytes() for w in want] == got
            pos, seq = memoryview(np.arange(6, 8, dtype=np.int32)), memoryview(np.zeros(2, dtype=np.int32))
            rows_a = a.run_rows(h[:2], np.arange(6, 8, dtype=np.int32), np.zeros(2, dtype=np.int32), set())
            rows_b = b.run_rows(memoryview(h[:2].tobytes()).cast("f"), pos, seq, set())
            assert isinstance(rows_b, memoryview) and rows_a.tobytes() == bytes(rows_b)
