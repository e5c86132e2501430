"""What a new user meets: readable plan tables, CPU-only plans, plans that remember their inputs, the cache,
progress off a terminal, file modes, hosts files shared by several plans, and real runs that explain
themselves instead of failing (a GPU plan on a CPU build, more tokens than the context)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prima_sim.cache import entries
from prima_sim.cli.main import main
from prima_sim.errors import InputError
from prima_sim.exec.hosts import HostEntry, HostsFile, resolve
from prima_sim.plan import Plan
from prima_sim.progress import Progress
from prima_sim.schema import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_sim.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=300)  # fmt: skip


def test_plan_table_has_one_header_per_column(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("device"))
    header, rows = lines[i], lines[i + 2 : i + 6]
    names = re.findall(r"\S+(?: \S+)?", header)
    assert names == ["device", "role", "window", "GPU/window", "layers", "compute", "memory", "disk", "network",
                     "overhead", "total", "layer ranges"]  # fmt: skip
    # every numeric cell ends where its header ends (right-aligned under it)
    for col in ("window", "GPU/window", "layers", "compute", "total"):
        end = header.index(col) + len(col)
        for row in rows:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), (col, row)
    assert any("predicted time per token (TPOT)" in ln for ln in lines)


def test_explain_ends_with_a_glossary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--explain"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("(window: the consecutive layers")


def test_cpu_only_plan_simulates_from_another_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "myhome"
    assert main(["init", str(home)]) == 0
    plan_file = tmp_path / "p.json"
    assert main(["plan", "--cluster", str(home / "home.toml"), "--model", "qwen2.5-32b", "--cpu-only", "--out",
                 str(plan_file), "--json"]) == 0  # fmt: skip
    plan = Plan.load(plan_file)
    assert plan.cpu_only and all(d.gpu_layers == 0 for d in plan.devices)
    assert plan.cluster_source == str((home / "home.toml").resolve()) and plan.model_source == "qwen2.5-32b"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = cli("simulate", "--plan", str(plan_file), "--tokens", "2", "--json", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tpot_s"] > 0
    # the cluster changes: the error says how
    text = (home / "home.toml").read_text(encoding="utf-8")
    (home / "home.toml").write_text(text.replace('"laptop", "phone"]', '"laptop"]'), encoding="utf-8")
    out = cli("simulate", "--plan", str(plan_file), "--tokens", "2", cwd=elsewhere)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the plan's devices are" in out.stderr and "re-plan" in out.stderr
    (home / "home.toml").write_text(
        text.replace('latency_s = "3 ms"', 'latency_s = "4 ms"'), encoding="utf-8"
    )
    out = cli("simulate", "--plan", str(plan_file), "--tokens", "2", cwd=elsewhere)
    assert out.returncode == 2 and "same devices, but their profiles or links changed" in out.stderr


def test_version_1_plans_are_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--out", str(tmp_path / "p.json"), "--json"]) == 0
    data = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert data["schema_version"] == 2
    for key in ("cluster_source", "model_source", "cpu_only"):
        del data[key]
    data["schema_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(data), encoding="utf-8")
    plan = Plan.load(tmp_path / "v1.json")
    assert plan.schema_version == 2 and plan.cluster_source == "" and Plan.from_json(plan.to_json()) == plan
    assert main(["simulate", "--plan", str(tmp_path / "v1.json"), "--tokens", "2", "--json"]) == 0
    data["schema_version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match=r"plan schema 3 is not supported by this prima-sim \(reads 1, 2\)"):
        Plan.load(tmp_path / "v3.json")


def test_outputs_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.json", "{}\n")
        assert p.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_text(tmp_path / "b.json", "{}\n").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_cache_lists_and_cleans(tmp_path: Path) -> None:
    shards = tmp_path / "cache" / "shards" / "abc" / "D1"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"model_file": "/models/m.gguf"}), encoding="utf-8")
    (shards / "w0.gguf").write_bytes(b"x" * 100_000)
    model = tmp_path / "cache" / "models" / "synth-a.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"y" * 10_000)
    out = cli("cache", PRIMA_SIM_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    assert "shards of /models/m.gguf for 1 device(s): D1" in out.stdout and "synth-a.gguf" in out.stdout
    assert "2 entries" in out.stdout and "--clean" in out.stdout
    out = cli("cache", "--clean", "--models", "--json", PRIMA_SIM_CACHE=str(tmp_path / "cache"))
    assert json.loads(out.stdout)["removed"] and not model.exists() and shards.exists()
    assert [e.kind for e in entries(root=tmp_path / "cache")] == ["shards"]
    out = cli("cache", "--clean", PRIMA_SIM_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0 and not (tmp_path / "cache" / "shards" / "abc").exists()


def test_progress_off_a_terminal_is_plain_periodic_lines() -> None:
    buf = io.StringIO()
    with Progress(4 * 2**20, "shard", "B", stream=buf, interval_s=0.0) as bar:
        for _ in range(4):
            bar.set_description("w0.gguf")
            bar.update(2**20)
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert lines[0] == "shard: started, 4.00 MiB to do"
    assert lines[1].startswith("shard: 25% (1.00 MiB of 4.00 MiB)") and lines[1].endswith("w0.gguf")
    assert lines[-1].startswith("shard: done, 100% (4.00 MiB of 4.00 MiB)")
    quiet = io.StringIO()
    Progress(10, "x", stream=quiet, disable=True).update(5)
    assert quiet.getvalue() == ""


def test_a_hosts_file_may_list_devices_a_plan_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--cluster", "examples/home", "--model", "llama3-8b", "--windows", "12,10,10,0",
                 "--out", str(tmp_path / "p.json"), "--json"]) == 0  # fmt: skip
    plan = Plan.load(tmp_path / "p.json")
    hosts = HostsFile(devices={n: HostEntry(host=f"10.0.0.{i}") for i, n in enumerate(["desktop", "mac", "laptop",
                                                                                        "phone"])})  # fmt: skip
    assert resolve(hosts, plan).data["mac"] == ("10.0.0.1", 29501)
    typo = HostsFile(devices={"lapotp": HostEntry()})
    with pytest.raises(InputError, match=r"devices\.lapotp.*not a device of the plan"):
        resolve(typo, plan)


@pytest.mark.real
def test_run_local_on_a_cpu_build_runs_gpu_layers_on_the_cpu_and_refuses_too_many_tokens(
    tmp_path: Path,
) -> None:
    from prima_sim.exec.llamacpp import supports_gpu_offload

    if supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    env = {"PRIMA_SIM_CACHE": str(tmp_path / "cache")}
    out = cli("plan", "--cluster", "examples/home", "--model", "smollm2-135m", "--windows", "10,10,10,0",
              "--gpu-layers", "4,0,0,0", "--ctx", "64", "--prompt-tokens", "16", "--tokens", "16", "--out", str(tmp_path / "gpu.json"), **env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    out = cli("run", "--local", "--plan", str(tmp_path / "gpu.json"), "--prompt", "Hello", "-n", "4", "--threads",
              "1", "--ignore-eos", "--json", **env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "no GPU backend: the plan's GPU layers per window (desktop 4) run on the CPU" in out.stderr
    assert json.loads(out.stdout)["n_decode"] >= 1
    out = cli("run", "--local", "--plan", str(tmp_path / "gpu.json"), "--prompt", "Hello there, how are you today?",
              "-n", "60", "--threads", "1", **env)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "-n/--n-predict" in errors[0] and "context of 64 tokens" in errors[0], (
        out.stderr
    )
