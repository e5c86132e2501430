"""Every command, every numeric option, out-of-range values: a one-line error (or a normal result), never a
traceback.

The sweep is generated from the argument parser itself, so a new option is swept without editing this file:
each int option gets -1 and 0, each float option -1, 0, nan, inf and -inf, on top of a valid base command
line. Values that are out of range only in context (more tokens than the context, more threads than any
machine, more rounds than layers) are listed by hand in TOO_LARGE. Commands that would start real work on a
valid value are given a base line that fails fast after validation (shards that are not there), so the sweep
checks validation, not the work.

Most cases run in-process through ``prima_sim.cli.main.main`` (an exception escaping it is exactly what a user
would see as a traceback); commands that load llama.cpp or start servers run as subprocesses.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prima_sim.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS = {"run", "worker", "profile", "netprobe", "emulate", "serve", "chat"}
"""Commands swept in a child process (they load llama.cpp, bind sockets or need root)."""
LONG_RUNNING = {"serve": 8.0, "chat": 8.0}
"""Commands that keep running when their options are valid (a server waiting for its ring): a valid value is one
they are still running with after this many seconds; an invalid one must end them at once with one error line."""
SKIP_OPTIONS = {
    # These only select among valid inputs, or are covered below with their meaningful limits.
    ("emulate", "--suite"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A plan of the bundled default cluster, a small plan for SmolLM2's 30 layers, and output places."""
    tmp = tmp_path_factory.mktemp("sweep")
    assert main(["plan", "--out", str(tmp / "plan.json"), "--json"]) == 0
    assert main(["plan", "--cluster", "examples/home", "--model", "llama3-8b", "--windows", "10,10,6,6", "--cpu-only",
                 "--out", str(tmp / "small.json"), "--json"]) == 0  # fmt: skip
    return {"tmp": str(tmp), "plan": str(tmp / "plan.json"), "small": str(tmp / "small.json")}


def base_args(command: str, f: dict[str, str]) -> list[str]:
    """A valid command line for ``command`` that finishes fast (or fails fast after validating its options)."""
    t = f["tmp"]
    return {
        "model-info": ["llama3-8b"],
        "plan": ["--model", "llama3-8b", "--cluster", "examples/home"],
        "simulate": ["--plan", f["plan"], "--tokens", "2", "--no-gantt"],
        "sweep": [
            "--cluster",
            "examples/home",
            "--model",
            "llama3-8b",
            "--devices",
            "2",
            "--tokens",
            "2",
            "--jobs",
            "1",
            "--out",
            f"{t}/sweep.csv",
            "--quiet",
        ],
        "shard": ["--plan", f["small"], "--model", f"{t}/missing.gguf", "--out", f"{t}/shards"],
        "worker": ["--device", "mac", "--shards", f"{t}/no-shards"],
        "run": ["--local", "--plan", f["small"], "--shards", f"{t}/no-shards", "--prompt", "hello"],
        "serve": ["--local", "--plan", f["small"], "--shards", f"{t}/no-shards"],
        "chat": ["--local", "--plan", f["small"], "--shards", f"{t}/no-shards"],
        "synth-model": [
            "--layers",
            "2",
            "--embd",
            "64",
            "--ff",
            "128",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--quant",
            "Q4_0",
            "--vocab-from",
            f"{t}/missing.gguf",
            "--out",
            f"{t}/m.gguf",
        ],
        "profile": ["--no-write", "--types", "nonsense"],
        "netprobe": ["127.0.0.1:1", "--count", "1", "--pings", "1", "--timeout", "0.2"],
        "emulate": ["--scenario", f"{t}/missing.toml"],
        "report": [f"{t}/missing.csv"],
        "schema": ["device"],
        "init": [f"{t}/init"],
        "cache": [],
    }[command]


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def numeric_cases() -> Iterator[tuple[str, str, str]]:
    for name, p in commands().items():
        for action in p._actions:
            if not action.option_strings or (name, action.option_strings[-1]) in SKIP_OPTIONS:
                continue
            flag = max(action.option_strings, key=len)
            if action.type is int:
                values = ["-1", "0"]
            elif action.type is float:
                values = ["-1", "0", "nan", "inf", "-inf"]
            else:
                continue
            for v in values:
                yield name, flag, v


TOO_LARGE: list[tuple[str, list[str], str]] = [
    # (command, options, what the one error line must name)
    ("plan", ["--ctx", "100000000"], "--ctx"),
    ("plan", ["--k", "81"], "--k"),
    ("plan", ["--prompt-tokens", "5000"], "--prompt-tokens"),
    ("plan", ["--windows", "20,20,20,30", "--model", "llama3-70b"], "--windows"),
    ("plan", ["--windows", "40,40,0,0", "--gpu-layers", "41,0,0,0", "--model", "llama3-70b"], "--gpu-layers"),
    ("plan", ["--windows", "40,40,0,0", "--gpu-layers", "0,0,1,0", "--model", "llama3-70b"], "--gpu-layers"),
    ("simulate", ["--ctx", "2048"], "--ctx"),
    ("simulate", ["--tokens", "100000"], "--tokens"),
    ("simulate", ["--jitter", "5"], "--jitter"),
    ("simulate", ["--k", "2"], "--k"),
    ("sweep", ["--devices", "9"], "--devices"),
    ("sweep", ["--ram-scale", "1e400"], "--ram-scale"),
    ("run", ["-n", "100000"], "-n"),
    ("run", ["--top-p", "2"], "--top-p"),
    ("run", ["--threads", "100000"], "--threads"),
    ("run", ["--draft", "smollm2-135m", "--draft-max", "512"], "--draft-max"),
    ("worker", ["--threads", "100000"], "--threads"),
    ("synth-model", ["--layers", "100000", "--embd", "100000"], "--layers"),
    ("profile", ["--threads", "100000"], "--threads"),
    ("netprobe", ["--size", "1 PiB"], "--size"),
    ("cache", ["--older-than", "-3"], "--older-than"),
]


def _run(command: str, args: list[str], capsys: pytest.CaptureFixture[str], tmp: str) -> tuple[int, str]:
    if command in SUBPROCESS:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PRIMA_SIM_CACHE=f"{tmp}/cache")
        try:
            r = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", command, *args], capture_output=True,
                               text=True, timeout=LONG_RUNNING.get(command, 120), env=env,
                               stdin=subprocess.DEVNULL)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            if command not in LONG_RUNNING:
                raise
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return 0, err  # still running: the options were accepted
        return r.returncode, r.stderr
    capsys.readouterr()
    try:
        rc = main([command, *args])
    except SystemExit as exc:  # argparse: a usage line and one error line
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def _check(command: str, args: list[str], rc: int, err: str, names: str = "") -> None:
    """No traceback; a failure is exactly one error line (naming ``names`` when given)."""
    assert "Traceback" not in err, f"prima-sim {command} {' '.join(args)}:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error:" in ln]
    if rc != 0:
        assert rc in (1, 2, 3), f"prima-sim {command} {' '.join(args)}: exit {rc}\n{err}"
        assert len(errors) == 1, f"prima-sim {command} {' '.join(args)}: expected one error line:\n{err}"
        assert errors[0].startswith(f"prima-sim {command}: error:"), errors[0]
        assert names in errors[0], (
            f"prima-sim {command} {' '.join(args)}: the error does not name {names}: {errors[0]}"
        )


@pytest.mark.parametrize(("command", "flag", "value"), list(numeric_cases()))
def test_numeric_options_out_of_range(command: str, flag: str, value: str, files: dict[str, str],
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PRIMA_SIM_CACHE", f"{files['tmp']}/cache")
    args = [*base_args(command, files), flag, value]
    rc, err = _run(command, args, capsys, files["tmp"])
    invalid = value in ("-1", "nan", "inf", "-inf") or (value == "0" and _zero_is_invalid(command, flag))
    _check(command, args, rc, err, names=flag.lstrip("-") if invalid else "")
    if invalid:
        assert rc != 0, f"prima-sim {command} {flag} {value} was accepted"


def _zero_is_invalid(command: str, flag: str) -> bool:
    """Options where 0 makes no sense (counts of things that must exist, sizes, time limits)."""
    zero_ok = {"--seed", "--jitter", "--temperature", "--top-k", "--head-dim", "--prompt-tokens", "--older-than",
               "--k", "--tokens", "--queue", "--busy-retries"}  # fmt: skip
    if command == "simulate" and flag == "--tokens":
        return False
    return flag not in zero_ok


@pytest.mark.parametrize(
    ("command", "extra", "names"), TOO_LARGE, ids=[f"{c} {' '.join(a)}" for c, a, _n in TOO_LARGE]
)
def test_values_too_large_in_context(command: str, extra: list[str], names: str, files: dict[str, str],
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PRIMA_SIM_CACHE", f"{files['tmp']}/cache")
    args = [*base_args(command, files), *extra]
    rc, err = _run(command, args, capsys, files["tmp"])
    _check(command, args, rc, err, names)
    assert rc != 0, f"prima-sim {command} {' '.join(extra)} was accepted"


def test_sweep_covers_every_command() -> None:
    swept = {c for c, _f, _v in numeric_cases()} | {c for c, _a, _n in TOO_LARGE}
    no_numbers = {"schema", "init", "report", "model-info", "shard"}
    assert set(commands()) <= swept | no_numbers, sorted(set(commands()) - swept - no_numbers)
