"""The emulation's calibration without cgroups: profile medians and keys, the calibration shards, and the two
probe programs (``python -m prima_sim.exec.stream_probe`` and ``footprint_probe``) run for real on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf
from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate.calibrate import (
    ProbeResult,
    ProbeShards,
    median_profile,
    median_rates,
    profile_key,
    with_prefill_times,
    with_rates,
    write_probe_shards,
)
from prima_sim.emulate.scenario import DeviceSpec
from prima_sim.emulate.spawn import module_command, python_env
from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.workload import Workload
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


def _prefill_compute_s(
    prof: DeviceProfile, model: ModelProfile, n_layers: int, n: int
) -> tuple[float, float]:
    costs = DeviceCosts(prof, model, Workload())
    lts = [costs.layer_time(i, False, n, n) for i in range(n_layers)]
    return sum(x.compute_s for x in lts), sum(x.memory_s for x in lts)


def test_with_prefill_times_matches_the_measured_prefill() -> None:
    """The calibrated efficiency makes the cost model's prefill of the probe's layers take what llama.cpp took;
    the profile's other batch sizes move by the same ratio; a memory-bound size is not used."""
    model = catalog_model("llama3-8b")
    prof = device(
        "A", cpu_batch_efficiency={16: 0.8, 128: 1.0}, decode_overhead_s=1e-3, memory_bandwidth_bps=5e9
    )
    comp16, mem16 = _prefill_compute_s(prof, model, 3, 16)
    comp2, mem2 = _prefill_compute_s(prof, model, 3, 2)
    assert comp16 > mem16 and comp2 < mem2  # the premise: 16 tokens compute-bound, 2 tokens memory-bound
    measured = {16: 1e-3 + 1.25 * comp16, 2: 1e-3 + 3 * mem2}
    out = with_prefill_times(prof, model, 3, measured, "probe")
    assert out.cpu_batch_efficiency == pytest.approx({16: 0.64, 128: 0.8}, abs=1e-4)
    assert _prefill_compute_s(out, model, 3, 16)[0] == pytest.approx(measured[16] - 1e-3, rel=1e-3)
    note = out.sources["cpu_batch_efficiency"]
    assert note.startswith("probe: ") and "2 tokens" in note and "not compute-bound" in note
    # nothing compute-bound measured: the profile as it was
    assert with_prefill_times(prof, model, 3, {2: measured[2]}, "probe") is prof
    # a profile without a measured curve gets the measured size alone
    flat = with_prefill_times(device("B"), model, 3, measured, "probe")
    assert list(flat.cpu_batch_efficiency) == [16] and flat.batch_efficiency(16) < 1


def test_median_rates_keeps_the_sizes_every_probe_timed() -> None:
    probes = [ProbeResult(4e9, 9e9, {16: 0.1, 128: 0.8}), ProbeResult(5e9, 8e9, {16: 0.3}),
              ProbeResult(3e9, 7e9, {16: 0.2, 128: 0.9})]  # fmt: skip
    assert median_rates(probes) == (4e9, 8e9, {16: 0.2})


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
    assert 0 < times["layers_s"] < 5 and 0 < times["head_s"] < 5 and "prefill_s" not in times
    # with --prefill: the layers' shard prefilling prompts of those sizes, each slower than one decode token
    res = subprocess.run(
        [*cmd, "--prefill", "16,4"], env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    pre = json.loads(res.stdout.strip().splitlines()[-1])["prefill_s"]
    assert set(pre) == {"4", "16"} and 0 < pre["4"] < 5 and 0 < pre["16"] < 5
    bad = subprocess.run(
        [*cmd, "--prefill", "16,x"], env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "give token counts" in bad.stderr


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
