"""docs/tutorial.md, followed word by word: a plan for an example home, a simulation, a 3-device real run on one
machine, then the several-machines steps with every device at its own loopback address (127.0.0.10-12),
each worker in its own folder with only its own shards, as if on its own machine.

Every command run here must appear verbatim in the tutorial (``$ <command>``), so the page and the test cannot
drift apart. Two things differ from real machines, both outside the commands: ``scp`` becomes a folder copy,
and hosts.toml's example addresses (192.168.1.x, port 29500) become loopback addresses and free ports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from prima_sim.exec.hosts import free_base_port

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
PROMPT_RUN = '"The three most useful things in a kitchen are" -n 32'

PLANNING = [
    "prima-sim init myhome",
    "prima-sim plan --cluster myhome/home.toml --model qwen2.5-32b --explain",
    "prima-sim plan --cluster myhome/home.toml --model llama3-70b --compare",
    "prima-sim plan --cluster myhome/home.toml --model llama3-70b --out plan-70b.json",
    "prima-sim simulate --plan plan-70b.json --tokens 16 --out sim-70b",
]
ONE_MACHINE = [
    "prima-sim plan --cluster myhome/home.toml --model smollm2-135m --windows 12,10,8,0 --cpu-only --out small.json",
    f"prima-sim run --local --plan small.json --prompt {PROMPT_RUN}",
]
SHARD = "prima-sim shard --plan small.json --out shards"
COPY = "scp -r shards/mac mac.local:shards-mac"
WORKERS = [
    "prima-sim worker --hosts hosts.toml --device mac --shards shards-mac",
    "prima-sim worker --hosts hosts.toml --device laptop --shards shards-laptop",
]
HEAD = ("prima-sim run --real --plan small.json --hosts hosts.toml --shards shards --prompt "
        f"{PROMPT_RUN} --out run-small")  # fmt: skip


def test_every_command_here_is_in_the_tutorial() -> None:
    documented = {m.group(1).strip() for m in re.finditer(r"^\$ (.+?)(?:\s+#.*)?$", TUTORIAL, re.M)}
    for cmd in [*PLANNING, *ONE_MACHINE, SHARD, COPY, *WORKERS, HEAD]:
        assert cmd in documented, f"not in docs/tutorial.md: $ {cmd}"


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PRIMA_SIM_CACHE=str(tmp / "cache"))


def _prima(cmd: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(cmd)
    assert argv[0] == "prima-sim"
    out = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", *argv[1:]], cwd=cwd, env=_env(cwd),
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert out.returncode == 0, f"$ {cmd}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr
    return out


def _loopback_hosts(example: Path, dest: Path) -> dict[str, tuple[str, int]]:
    """The example hosts.toml with each device at 127.0.0.1x and free ports (same shape, same devices)."""
    data = tomllib.loads(example.read_text(encoding="utf-8"))
    addrs = {name: f"127.0.0.{10 + i}" for i, name in enumerate(data["devices"])}
    for name, entry in data["devices"].items():
        entry["host"] = addrs[name]
    data["base_port"] = free_base_port(5, host="127.0.0.10")
    dest.write_text(tomli_w.dumps(data), encoding="utf-8")
    return {n: (a, data["base_port"]) for n, a in addrs.items()}


def test_tutorial_word_by_word(tmp_path: Path) -> None:
    # 2-4: describe the home, plan 32B and 70B, simulate
    outs = [_prima(cmd, tmp_path) for cmd in PLANNING]
    assert "overall:" in outs[1].stdout and "(window: " in outs[1].stdout  # --explain and its glossary
    assert "halda" in outs[2].stdout and "memsched" in outs[2].stdout  # --compare
    plan70 = json.loads((tmp_path / "plan-70b.json").read_text(encoding="utf-8"))
    assert plan70["cluster_source"] == str((tmp_path / "myhome" / "home.toml").resolve())
    assert oct((tmp_path / "plan-70b.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    for f in ("tokens.csv", "summary.json", "trace.json", "gantt.png"):
        assert (tmp_path / "sim-70b" / f).is_file(), f

    # 5: a 3-device ring on this machine
    _prima(ONE_MACHINE[0], tmp_path)
    small = json.loads((tmp_path / "small.json").read_text(encoding="utf-8"))
    assert [d["name"] for d in small["devices"]] == ["desktop", "mac", "laptop"]
    assert [d["name"] for d in small["dropped"]] == ["phone"] and small["cpu_only"]
    local = _prima(ONE_MACHINE[1], tmp_path)
    assert local.stdout.strip(), local.stderr
    assert "cutting the shards of desktop, mac, laptop" in local.stderr and "prima-sim cache" in local.stderr
    cache = _prima("prima-sim cache --json", tmp_path)
    assert [e["kind"] for e in json.loads(cache.stdout)["entries"]] == ["shards"]

    # 6: several machines, each device at its own address with only its own shards
    _prima(SHARD, tmp_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["desktop", "laptop", "mac"]
    for dev in ("mac", "laptop"):  # scp -r shards/<dev> <dev>:shards-<dev>
        shutil.copytree(tmp_path / "shards" / dev, tmp_path / f"shards-{dev}")
    shutil.rmtree(tmp_path / "shards" / "mac")
    shutil.rmtree(tmp_path / "shards" / "laptop")  # the head keeps only its own folder
    addrs = _loopback_hosts(tmp_path / "myhome" / "hosts.toml", tmp_path / "hosts.toml")
    workers = [subprocess.Popen([sys.executable, "-m", "prima_sim.cli.main", *shlex.split(cmd)[1:]], cwd=tmp_path,
                                env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for cmd in WORKERS]  # fmt: skip
    try:
        real = _prima(HEAD, tmp_path)
        for w, dev in zip(workers, ("mac", "laptop"), strict=True):
            out, _ = w.communicate(timeout=60)
            assert w.returncode == 0, out
            assert f" on {addrs[dev][0]}:" in out, out  # it listened at its own address
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert real.stdout == local.stdout, "greedy decoding: the same text on one machine and on several"
    summary = json.loads((tmp_path / "run-small" / "summary.json").read_text(encoding="utf-8"))
    assert summary["devices"] == ["desktop", "mac", "laptop"] and summary["n_decode"] >= 1
    assert (tmp_path / "run-small" / "tokens.csv").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
