"""``prima-sim simulate`` and ``prima-sim sweep``: outputs, JSON keys, plan files, errors (exit 2, one line)."""

from __future__ import annotations

import csv
import json

import pytest

from prima_sim.cli.main import main
from prima_sim.metrics import TOKEN_COLUMNS, read_token_csv
from prima_sim.sim.sweep import SWEEP_COLUMNS

BASE = ["--cluster", "paper-d1-d4", "--model", "llama3-8b", "--prompt-tokens", "8", "--tokens", "4"]


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_required_keys(capsys):
    obj = run_json(capsys, ["simulate", *BASE, "--scheduler", "memsched", "--json"])
    for key in ("tpot_s", "ttft_s", "per_device", "memory_pressure", "tpot_mean_s", "tpot_p90_s", "analytic"):
        assert key in obj
    assert set(obj["per_device"]) == set(obj["memory_pressure"]) == set(obj["ring"])
    assert obj["tpot_s"] > 0 and obj["n_decode"] == 4
    assert all(0 <= p < 1 for p in obj["memory_pressure"].values())


def test_out_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["simulate", *BASE, "--scheduler", "even", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TPOT median" in text and "wrote" in text
    for name in ("tokens.csv", "summary.json", "trace.json", "gantt.png", "gantt_full.png"):
        assert (out / name).stat().st_size > 0
    rows = read_token_csv(out / "tokens.csv")
    assert (out / "tokens.csv").read_text().splitlines()[0] == ",".join(TOKEN_COLUMNS)
    assert len(rows) == 5 * 4  # (prefill + 4 decode steps) x 4 devices
    trace = json.loads((out / "trace.json").read_text())
    cats = {e.get("cat") for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {"compute", "head", "send", "recv_wait", "transfer"} <= cats


def test_simulating_a_saved_plan_gives_the_same_result(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", *BASE[:4], "--scheduler", "memsched", "--prompt-tokens", "8", "--tokens", "4",
                 "--out", str(plan)]) == 0  # fmt: skip
    capsys.readouterr()
    direct = run_json(capsys, ["simulate", *BASE, "--scheduler", "memsched", "--json"])
    from_file = run_json(
        capsys, ["simulate", "--plan", str(plan), "--prompt-tokens", "8", "--tokens", "4", "--json"]
    )
    assert from_file["tpot_s"] == direct["tpot_s"] and from_file["ttft_s"] == direct["ttft_s"]


def test_manual_windows_and_no_prefetch(capsys):
    obj = run_json(capsys, ["simulate", "--cluster", "prefetch-4x8g", "--model", "llama3-8b", "--windows", "8,8,8,8",
                            "--tokens", "2", "--prompt-tokens", "4", "--no-prefetch", "--cold", "--json"])  # fmt: skip
    assert (
        obj["windows"] == [8, 8, 8, 8]
        and obj["config"]["prefetch"] is False
        and obj["config"]["warm"] is False
    )


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["simulate", "--cluster", "no-such-cluster", "--model", "llama3-8b"], "no-such-cluster"),
        (["simulate", "--plan", "/nonexistent/plan.json"], "plan.json"),
        (["simulate", *BASE, "--jitter", "5"], "jitter"),
        (["simulate", *BASE, "--tokens", "5000"], "exceed n_ctx"),
        (["simulate", *BASE, "--windows", "1,2"], "4 devices"),
        (
            ["sweep", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--devices", "9", "--out", "x.csv"],
            "--devices: must be a number >= 1 and <= 4",
        ),
        (
            [
                "sweep",
                "--cluster",
                "paper-d1-d4",
                "--model",
                "llama3-8b",
                "--ram-scale",
                "a",
                "--out",
                "x.csv",
            ],
            "numbers",
        ),
        (
            [
                "sweep",
                "--cluster",
                "paper-d1-d4",
                "--model",
                "llama3-8b",
                "--scheduler",
                "magic",
                "--out",
                "x.csv",
            ],
            "magic",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"prima-sim {argv[0]}: error:") and match in err


def test_plan_for_another_context_is_refused(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["plan", *BASE[:4], "--ctx", "2048", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--plan", str(plan), "--ctx", "1024"]) == 2
    assert "2048" in capsys.readouterr().err


def test_sweep_writes_one_row_per_variant_in_grid_order_whatever_the_jobs(tmp_path, capsys):
    args = ["sweep", "--cluster", "paper-d1-d4", "--model", "llama3-8b", "--devices", "2,4", "--ram-scale", "0.02,1",
            "--scheduler", "halda,even", "--tokens", "2", "--prompt-tokens", "4", "--quiet"]  # fmt: skip
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main([*args, "--jobs", "1", "--out", str(one)]) == 0
    assert main([*args, "--jobs", "2", "--out", str(two)]) == 0
    assert "8 runs" in capsys.readouterr().out
    assert one.read_bytes() == two.read_bytes()
    rows = list(csv.DictReader(one.open()))
    assert tuple(rows[0]) == SWEEP_COLUMNS and len(rows) == 8
    assert [(r["n_devices"], r["ram_scale"], r["scheduler"]) for r in rows[:4]] == [
        ("2", "0.02", "halda"),
        ("2", "0.02", "even"),
        ("2", "1", "halda"),
        ("2", "1", "even"),
    ]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(float(r["sim_tpot_s"]) > 0 for r in ok)
    assert any(r["status"] == "infeasible" and r["error"] for r in rows), (
        "2% of the RAM cannot hold the KV cache"
    )
