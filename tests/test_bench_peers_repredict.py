"""``benchmarks/bench_peers.py --repredict``: a finished run's systems predicted again from what the run saved (no
root, nothing runs): the run's own predictions come back from its saved inputs, a run from before those inputs
existed is rebuilt from its CSV and printed log with its medians exact, and the rewritten CSV says per device what
was predicted."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from prima_sim.devices.catalog import catalog_model
from prima_sim.emulate.records import PlanPrediction
from prima_sim.halda.planner import manual_plan
from prima_sim.sim.toy import toy_cluster, toy_device
from prima_sim.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
WL = Workload(n_ctx=256, prompt_tokens=13, decode_tokens=4, n_ubatch=64)
MIB = 2**20


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_peers_repredict", ROOT / "benchmarks" / "bench_peers.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers_repredict"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def m8():
    return catalog_model("llama3-8b")


def args(**kw):
    base = {"prima_build": None, "rpc_build": None, "tokens": WL.decode_tokens}
    return argparse.Namespace(**{**base, **kw})


def a_run(bench, m8, out: Path):
    """A run of the group "fits" as the benchmark leaves it (cluster, plans, inputs), its rows predicted the way
    the benchmark predicts them; devices with 8 GiB each (an 8B model pages a little on them)."""
    name, spec, cases = next(g for g in bench.GROUPS if g[0] == "fits")
    sc = bench.group_scenario(name, spec, cases, WL.decode_tokens, 2)
    # saved as a run saves it: its devices' read-limited disks marked blk-throttled
    cluster = bench.with_read_limits(
        toy_cluster([toy_device(f"D{i}", ram_total_bytes=8 * 2**30) for i in range(3)], bandwidth_bps=1e9), sc
    )
    assert all(d.disk_throttle_slice_s for d in cluster.devices)
    gdir = out / name
    (gdir / "plans").mkdir(parents=True)
    (gdir / "cluster.json").write_text(cluster.model_dump_json())
    plan = manual_plan(cluster, m8, WL, [12, 10, 10])
    plan.save(gdir / "plans" / "fits.json")
    one = cluster.model_copy(update={"devices": (cluster.device("D0"),), "head": "D0", "links": ()})
    single = manual_plan(one, m8, WL, [32])
    single.save(gdir / "plans" / "single-D0.json")
    b = bench.Bench(args())
    probe = bench.probe_for(m8)
    rates = {"D0": (3.0e9, 7.0e9)}
    key_of = {"D0": "D0", "D1": "D0", "D2": "D0"}
    rows = []
    for system, kind, label, p, cl in [
        ("prima.cpp", "prima.cpp", "fits", plan, cluster),
        ("prima-sim", "prima-sim", "fits", plan, cluster),
        (bench.RPC_SYSTEM, bench.RPC_SYSTEM, "fits", plan, cluster),
        ("llama.cpp", "stock", "single-D0", single, one),
    ]:
        r = bench.Row("fits", system, "3 x toy", list(p.windows), p.k, kind=kind, label=label)
        r.tpot, r.ttft = [0.30, 0.34], [0.5, 0.6]
        r.read_meas = [100.0 * MIB, 120.0 * MIB]
        r.read_meas_dev = [{"D0": 60.0 * MIB, "D1": 40.0 * MIB}, {"D0": 70.0 * MIB, "D1": 50.0 * MIB}]
        if kind.startswith("prima.cpp") or kind == bench.RPC_SYSTEM:
            r.anon_peak = {"D0": 49 * MIB + 12345, "D1": 40 * MIB, "D2": 42 * MIB}
        pr = PlanPrediction(label, p, cl)
        b.predict_from_profiles(r, sc, pr, m8, WL, 1280 * 1024)
        b.predict_at_run(
            r, sc, pr, bench.run_rates_cluster(cl, key_of, probe, rates), m8, WL, 1280 * 1024, True
        )
        rows.append(r)
    bench.save_inputs(gdir / bench.INPUTS_FILE, name, b, WL, 1280 * 1024, rates, key_of, probe, rows)
    return rows


def test_repredict_gives_back_the_runs_predictions(bench, m8, tmp_path):
    rows = a_run(bench, m8, tmp_path / "run")
    # the RPC split's servers cannot hold an 8B model's windows in 512 MiB: infeasible, no prediction
    assert [math.isfinite(r.tpot_pred) for r in rows] == [True, True, False, True]
    assert rows[2].predicted_as.startswith("infeasible")
    assert rows[0].read_pred_dev.keys() == {"D0", "D1", "D2"}
    b = bench.Bench(args())
    notes = b.repredict(tmp_path / "run", [], None, model=m8)
    assert notes == []
    assert [(r.scenario, r.system) for r in b.rows] == [(r.scenario, r.system) for r in rows]
    for old, new in zip(rows, b.rows, strict=True):
        assert new.tpot_pred == pytest.approx(old.tpot_pred, rel=1e-9, nan_ok=True)
        assert new.tpot_pred_before == pytest.approx(old.tpot_pred_before, rel=1e-9, nan_ok=True)
        assert new.read_pred == pytest.approx(old.read_pred, rel=1e-9, nan_ok=True)
        assert new.predicted_as == old.predicted_as
        assert (new.tpot, new.ttft, new.anon_peak, new.read_meas_dev) == (old.tpot, old.ttft, old.anon_peak,
                                                                          old.read_meas_dev)  # fmt: skip
    # a run saved before the devices' disks were marked blk-throttled is predicted as if it had been
    saved = tmp_path / "run" / "fits" / "cluster.json"
    marked = saved.read_text()
    unmarked = json.loads(marked)
    for d in unmarked["devices"]:
        d["disk_throttle_slice_s"] = None
    saved.write_text(json.dumps(unmarked))
    b2 = bench.Bench(args())
    b2.repredict(tmp_path / "run", [], None, model=m8)
    assert [r.tpot_pred for r in b2.rows] == pytest.approx(
        [r.tpot_pred for r in b.rows], rel=1e-9, nan_ok=True
    )
    b.write(tmp_path / "reports")
    out = {c["system"]: c for c in csv.DictReader((tmp_path / "reports" / "peers.csv").open())}
    assert out["prima.cpp"]["disk_mib_per_token_meas_dev"] == "D0:65 D1:45"
    assert out["prima.cpp"]["disk_mib_per_token_pred_dev"].startswith("D0:")
    assert float(out["prima-sim"]["tpot_meas_s"]) == pytest.approx(0.32)


def test_repredict_rebuilds_an_older_run_from_its_csv_and_log(bench, m8, tmp_path):
    """A run without predict-inputs.json: the CSV's medians stay exact (also of two repetitions), the rates and
    the WILLNEED cap come from the printed log, and the notes say what was rebuilt."""
    a_run(bench, m8, tmp_path / "run")
    (tmp_path / "run" / "fits" / bench.INPUTS_FILE).unlink()
    b = bench.Bench(args())
    b.rows = a_run(bench, m8, tmp_path / "other")
    b.write(tmp_path / "old")
    measured = list(csv.DictReader((tmp_path / "old" / "peers.csv").open()))
    med = {c["system"]: c["tpot_meas_s"] for c in measured}
    log = tmp_path / "run.log"
    log.write_text("[10:58:21] fits: one WILLNEED reads at most 512 KiB on /dev/loop0\n"
                   "[10:59:25] fits: rates during the runs (D0): layers 3.00 GB/s, output head 7.00 GB/s\n"
                   "[10:59:26] slowlink: rates during the runs (D0): layers 9.99 GB/s, output head 9.99 GB/s\n")  # fmt: skip
    assert bench.legacy_log(log, "fits") == (512 * 1024, {"D0": (3.0e9, 7.0e9)})
    b2 = bench.Bench(args())
    notes = b2.repredict(tmp_path / "run", measured, log, model=m8)
    assert len(notes) == 1 and "no predict-inputs.json" in notes[0] and str(log) in notes[0]
    rows = b2.csv_rows()
    assert {r["system"]: f"{r['tpot_meas_s']:.6g}" for r in rows} == med
    pc = next(r for r in b2.rows if r.system == "prima.cpp")
    assert pc.anon_peak == {"D0": 49 * MIB, "D1": 40 * MIB, "D2": 42 * MIB}  # whole MiB, as the CSV has them
    assert "--willneed-cap-kib 512" in pc.predicted_as and "rates: measured" in pc.predicted_as
    assert [math.isfinite(r.tpot_pred) for r in b2.rows] == [True, True, False, True]


def test_save_inputs_writes_bytes_and_the_rates(bench, m8, tmp_path):
    a_run(bench, m8, tmp_path)
    obj = json.loads((tmp_path / "fits" / bench.INPUTS_FILE).read_text())
    assert obj["rates"] == {"D0": [3.0e9, 7.0e9]} and obj["willneed_cap_bytes"] == 1280 * 1024
    assert obj["rows"][0]["anon_peak"]["D0"] == 49 * MIB + 12345
    assert obj["workload"]["prompt_tokens"] == WL.prompt_tokens
