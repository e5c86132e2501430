"""The emulation's calibration without cgroups: profile medians and keys, the calibration shards, and the two
probe programs (``python -m prima_sim.exec.stream_probe`` and ``footprint_probe``) run for real on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.emulate.calibrate import (
    ProbeShards,
    median_profile,
    profile_key,
    with_rates,
    write_probe_shards,
)
from prima_sim.emulate.scenario import DeviceSpec
from prima_sim.emulate.spawn import module_command, python_env
from tests.factories import device

real = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the real extra) is not installed"
)


def test_median_profile_takes_the_median_of_every_rate() -> None:
    runs = [
        device("A", memory_bandwidth_bps=bw, decode_overhead_s=t)
        for bw, t in ((5e9, 3e-4), (9e9, 1e-4), (8e9, 2e-4))
    ]
    m = median_profile(runs)
    assert m.memory_bandwidth_bps == 8e9 and m.decode_overhead_s == 2e-4
    assert m.ram_total_bytes == runs[0].ram_total_bytes
    assert "median of 3 profiler runs" in m.sources["repeats"]
    assert median_profile(runs[:1]) is runs[0]


def test_profile_key_is_the_limits(smollm2: Path) -> None:
    model = model_profile_from_gguf(smollm2)
    a = DeviceSpec.model_validate({"name": "A", "memory": "512 MiB", "cpus": 1})
    b = DeviceSpec.model_validate({"name": "B", "memory": "512 MiB", "cpus": 1})
    c = DeviceSpec.model_validate({"name": "C", "memory": "1 GiB", "cpus": 1})
    assert profile_key(a, model, quick=True) == profile_key(b, model, quick=True)
    assert profile_key(a, model, quick=True) != profile_key(c, model, quick=True)
    assert profile_key(a, model, quick=True) != profile_key(a, model, quick=False)


def test_with_rates_sets_the_output_heads_type_apart() -> None:
    prof = device("A", memory_bandwidth_bps=5e9)
    pb = ProbeShards(Path("w.gguf"), Path("h.gguf"), 4, 40 << 20, 20 << 20, ("q6_K",), "m")
    out = with_rates(prof, pb, 7e9, 12e9, "note")
    assert out.memory_bandwidth_bps == 7e9 and out.matvec_bps["q6_K"] == 12e9
    assert out.sources["memory_bandwidth_bps"] == "note" and "q6_K" in out.sources["matvec_bps"]
    plain = with_rates(prof, None, 7e9, 12e9, "note")
    assert plain.memory_bandwidth_bps == 7e9 and plain.matvec_bps == prof.matvec_bps


@real
def test_stream_probe_times_both_shards(tmp_path: Path, smollm2: Path) -> None:
    model = model_profile_from_gguf(smollm2)
    pb = write_probe_shards(smollm2, model, tmp_path / "calibration")
    assert pb is not None and pb.layers.is_file() and pb.head.is_file()
    assert 1 <= pb.n_layers <= 8 and pb.layer_bytes > 0 and pb.out_bytes > 0
    cmd = module_command(
        "prima_sim.exec.stream_probe", str(pb.layers), str(pb.head), "--threads", "1", "--tokens", "3"
    )
    res = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    times = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < times["layers_s"] < 5 and 0 < times["head_s"] < 5


@real
@pytest.mark.parametrize("role", ["worker", "head"])
def test_footprint_probe_reports_both_steps(smollm2: Path, tmp_path: Path, role: str) -> None:
    cmd = module_command("prima_sim.exec.footprint_probe", "--role", role, str(smollm2))
    with subprocess.Popen(cmd, env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == b"runtime"
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == b"vocab"
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.wait(timeout=60) == 0
    cmd = module_command("prima_sim.exec.footprint_probe", str(tmp_path / "missing.gguf"))
    res = subprocess.run(cmd, env=python_env(), input=b"\n\n", capture_output=True, timeout=120)
    assert res.stdout.split() == [b"runtime", b"failed"] and res.returncode == 1


def test_prompt_tokens_are_counted_as_the_head_tokenizes(smollm2: Path) -> None:
    """``python -m prima_sim.exec.count_tokens`` in a child process: the head's tokenization (BOS, specials)."""
    from prima_sim.emulate.models import count_prompt_tokens
    from prima_sim.exec.llamacpp import Model

    text = "The history of the printing press begins in the fifteenth century, when"
    with Model(smollm2, vocab_only=True) as vocab:
        expected = len(vocab.tokenize(text))
    assert count_prompt_tokens(smollm2, text) == expected > 1
    r = subprocess.run(module_command("prima_sim.exec.count_tokens", "/nonexistent.gguf"), input=b"hi",
                       capture_output=True, env=python_env())  # fmt: skip
    assert r.returncode == 1 and r.stderr.decode().startswith("error:")
