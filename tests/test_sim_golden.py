"""Determinism and a golden per-token CSV.

The golden scenario is small but exercises every mechanism: SmolLM2-135M (a real GGUF) on three toy devices
sharing one Wi-Fi medium, k = 2, one device with room for half its layers (faults, readahead, prefetch and
its evictions), a prefill in two micro-batches, jitter on (every random stream used), seed 7.

Regenerate after an intended change of the simulator or the cost model with
``PRIMA_SIM_UPDATE_GOLDEN=1 pytest tests/test_sim_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.halda.costmodel import DeviceCosts, memory_use
from prima_sim.halda.planner import manual_plan
from prima_sim.sim import SimConfig, simulate
from prima_sim.sim.toy import toy_cluster, toy_device
from prima_sim.workload import Workload

GOLDEN = Path(__file__).parent / "golden" / "sim_smollm2_tokens.csv"
WL = Workload(n_ctx=128, prompt_tokens=12, decode_tokens=5, n_ubatch=8)
CFG = SimConfig(seed=7, jitter=0.05, chunk_bytes=1 << 20)


def scenario(smollm2: Path):
    m = model_profile_from_gguf(smollm2)
    devs = [toy_device("head", flops=50e9, memory_bandwidth_bps=5e9),
            toy_device("tablet", os="android", flops=20e9, memory_bandwidth_bps=2e9, disk_seq_read_bps=0.5e9),
            toy_device("laptop", flops=80e9, memory_bandwidth_bps=8e9, disk_seq_read_bps=1e9)]  # fmt: skip
    c = toy_cluster(devs, bandwidth_bps=30e6, latency_s=0.004, medium_bps=60e6)
    windows = [5, 5, 5]
    plan = manual_plan(c, m, WL, windows)

    def squeeze(name: str, share: float, **extra) -> object:  # room for ``share`` of its layers
        a = plan.device(name)
        use = memory_use(DeviceCosts(c.device(name), m, WL), a, False)
        room = share * sum(m.layer_bytes[i] for r in a.layers for i in range(*r))
        return c.device(name).model_copy(update={"ram_available_bytes": int(use.pinned_ram + room), **extra})

    # the laptop has room for 40% of its layers; the tablet for 50%, and swaps apps out for 30% more
    swap = int(0.3 * sum(m.layer_bytes[0:10]))
    c = c.model_copy(update={"devices": (devs[0], squeeze("tablet", 0.5, swappable_bytes=swap, swap_total_bytes=swap,
                                                          swap_available_bytes=swap), squeeze("laptop", 0.4))})  # fmt: skip
    return manual_plan(c, m, WL, windows), c, m


def test_same_inputs_and_seed_give_byte_identical_outputs(smollm2, tmp_path):
    plan, c, m = scenario(smollm2)
    from prima_sim.reports.timeline import draw_simulation

    ra, rb = simulate(plan, c, m, WL, CFG), simulate(plan, c, m, WL, CFG)
    a = {**ra.write(tmp_path / "a"), **draw_simulation(ra, tmp_path / "a")}
    b = {**rb.write(tmp_path / "b"), **draw_simulation(rb, tmp_path / "b")}
    for key in ("tokens", "summary", "trace", "gantt", "gantt_full"):
        assert a[key].read_bytes() == b[key].read_bytes(), key


def test_the_seed_drives_the_jitter(smollm2):
    plan, c, m = scenario(smollm2)
    one = simulate(plan, c, m, WL, CFG)
    other = simulate(plan, c, m, WL, SimConfig(seed=8, jitter=0.05, chunk_bytes=1 << 20))
    assert one.tpot_s != other.tpot_s
    flat = simulate(plan, c, m, WL, SimConfig(seed=8, jitter=0.0, chunk_bytes=1 << 20))
    assert simulate(plan, c, m, WL, SimConfig(seed=9, jitter=0.0, chunk_bytes=1 << 20)).tpot_s == flat.tpot_s


def test_golden_scenario_exercises_the_mechanisms(smollm2):
    plan, c, m = scenario(smollm2)
    res = simulate(plan, c, m, WL, CFG)
    assert plan.k == 2
    st = res.device_stats["laptop"]
    assert st["page_faults"] > 0 and st["disk_prefetch_bytes"] > 0 and st["evictions"] > 0
    assert any(r.disk_wait_s > 0 for r in res.rows if r.device == "laptop" and r.phase == "decode")
    assert res.device_stats["tablet"]["swapped_out_bytes"] > 0
    assert res.network["media"]["wifi"]["bytes"] > 0
    assert [s[1] for s in res.steps] == ["prefill"] + ["decode"] * 5


def test_golden_csv(smollm2, tmp_path):
    plan, c, m = scenario(smollm2)
    out = simulate(plan, c, m, WL, CFG).write(tmp_path)["tokens"]
    if os.environ.get("PRIMA_SIM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_bytes(out.read_bytes())
        pytest.skip("golden file rewritten")
    assert GOLDEN.exists(), f"{GOLDEN} is missing: run with PRIMA_SIM_UPDATE_GOLDEN=1 to create it"
    assert out.read_text() == GOLDEN.read_text()


def test_trace_reads_back_and_draws_beside_another_run(smollm2, tmp_path):
    from prima_sim.metrics import spans_from_chrome_trace
    from prima_sim.reports.plots import gantt_side_by_side

    plan, c, m = scenario(smollm2)
    res = simulate(plan, c, m, WL, CFG)
    paths = res.write(tmp_path / "run")
    back = spans_from_chrome_trace(paths["trace"])
    assert len(back) == len(res.spans)
    assert sum(s.duration_s for s in back) == pytest.approx(sum(s.duration_s for s in res.spans), rel=1e-6)
    other = simulate(plan, c, m, WL, SimConfig(seed=7, prefetch=False, chunk_bytes=1 << 20))
    dec = [s for s in res.steps if s[1] == "decode"]
    dec2 = [s for s in other.steps if s[1] == "decode"]
    args = (back, other.spans, res.devices)
    kw = {"title": "prefetch on / off", "labels": ("prefetch", "no prefetch"),
          "t_range_a": (dec[0][3], dec[1][4]), "t_range_b": (dec2[0][3], dec2[1][4])}  # fmt: skip
    a = gantt_side_by_side(*args, tmp_path / "a.png", **kw)
    b = gantt_side_by_side(*args, tmp_path / "b.png", **kw)
    assert a.stat().st_size > 10_000 and a.read_bytes() == b.read_bytes()
