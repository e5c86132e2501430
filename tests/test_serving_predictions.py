"""The cost model's serving predictions (issue 14 item 5): per-request TPOT and aggregate throughput against the
number of sequences decoded together, and TPOT with speculative decoding for a given acceptance rate; and the
``--concurrency`` / ``--draft --accept`` flags of ``plan`` and ``simulate``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from prima_sim.cli.common import load_cluster_arg, load_model_arg
from prima_sim.halda.costmodel import expected_tokens, serving_curve, speculation
from prima_sim.halda.planner import make_plan
from prima_sim.workload import Workload


@pytest.fixture(scope="module")
def setup():
    cluster = load_cluster_arg("default")
    model = load_model_arg("llama3-8b")
    wl = Workload(n_ctx=1024)
    return make_plan(cluster, model, wl), cluster, model, wl


def test_expected_tokens_per_pass() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        expected_tokens(1.5, 2)


def test_concurrency_curve(setup) -> None:
    plan, cluster, model, wl = setup
    pts = serving_curve(plan, cluster, model, wl, [1, 2, 4, 8, 16])
    assert pts[0].tpot_s == pytest.approx(plan.prediction.tpot_s)  # one sequence: the plan's own prediction
    tpots = [p.tpot_s for p in pts]
    tput = [p.throughput_tps for p in pts]
    assert tpots == sorted(tpots)  # each request waits for every row of the pass
    assert tput == sorted(tput) and tput[-1] > 2 * tput[0]  # weights are read once per pass: batching pays
    d = wl.decode_tokens
    for p in pts:  # requests back to back: their prompts prefilled together, then d decode passes
        assert p.prefill_s > p.tpot_s
        assert p.throughput_tps == pytest.approx(p.concurrency * (d + 1) / (p.prefill_s + d * p.tpot_s))
        assert p.throughput_tps < p.concurrency / p.tpot_s


def test_a_pass_of_rows_costs_one_token_plus_each_rows_arithmetic(setup) -> None:
    """pass_breakdown: the first row is step_breakdown's token (weights streamed once), every further row adds
    its arithmetic at the matmul rate (the weights are in cache), every further logits row the output head's."""
    from prima_sim.halda.costmodel import DeviceCosts, pass_breakdown, step_breakdown

    plan, cluster, model, wl = setup
    one = pass_breakdown(plan, cluster, model, wl, 1)
    assert one.total_s == pytest.approx(step_breakdown(plan, cluster, model, wl, 1).total_s)
    kv = wl.decode_kv_tokens
    rows = {}
    for n in (2, 3, 5):
        rows[n] = pass_breakdown(plan, cluster, model, wl, n, n_logits=1, n_kv=kv).total_s
    # linear in the rows: each costs the same
    assert rows[5] - rows[3] == pytest.approx(2 * (rows[3] - rows[2]), rel=1e-6)
    costs = {a.name: DeviceCosts(cluster.device(a.name), model, wl) for a in plan.devices}
    arithmetic = sum(
        costs[name].window_rows_s(s, e, plan.device(name).gpu_layers_in((s, e)) if costs[name].device.gpu else 0, kv)
        for name, (s, e) in plan.execution_order()
    )  # fmt: skip
    assert rows[3] - rows[2] == pytest.approx(arithmetic, rel=0.05)  # plus the hops' bytes of one row
    logits = pass_breakdown(plan, cluster, model, wl, 3, n_logits=3, n_kv=kv).total_s
    assert logits - rows[3] == pytest.approx(2 * costs[plan.head].logits_row_s())
    with pytest.raises(ValueError):
        pass_breakdown(plan, cluster, model, wl, 2, n_logits=3)


def test_speculation(setup) -> None:
    plan, cluster, model, wl = setup
    draft = load_model_arg("smollm2-135m")  # a small draft (its vocabulary does not matter to the cost)
    none = speculation(plan, cluster, model, wl, draft, accept=0.0, draft_max=4)
    assert none.plain_tpot_s == pytest.approx(plan.prediction.tpot_s)
    assert none.tpot_s > none.plain_tpot_s  # nothing accepted: drafting and the wider pass are pure cost
    assert none.expected_tokens == 1.0
    good = speculation(plan, cluster, model, wl, draft, accept=0.9, draft_max=4)
    assert good.tpot_s < none.tpot_s
    assert good.tpot_s == pytest.approx((good.verify_s + 4 * good.draft_s) / good.expected_tokens)
    rates = [speculation(plan, cluster, model, wl, draft, a, 4).tpot_s for a in (0.2, 0.5, 0.8, 1.0)]
    assert rates == sorted(rates, reverse=True)
    assert all(math.isfinite(r) for r in rates)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_sim.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)  # fmt: skip


def test_plan_and_simulate_flags(tmp_path: Path) -> None:
    r = _cli("plan", "--model", "llama3-8b", "--concurrency", "4", "--draft", "smollm2-135m", "--accept", "0.6",
             "--json", "--out", str(tmp_path / "p.json"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert [p["concurrency"] for p in obj["concurrency"]] == [1, 2, 4]
    assert obj["speculation"]["accept"] == 0.6 and obj["speculation"]["tpot_s"] > 0
    r = _cli("simulate", "--plan", str(tmp_path / "p.json"), "--tokens", "4", "--concurrency", "3", "--no-gantt",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "serving (prima-sim serve --parallel N" in r.stdout
    r = _cli("plan", "--model", "llama3-8b", "--draft", "llama3-8b", cwd=tmp_path)
    assert r.returncode == 2 and "--accept" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("plan", "--model", "llama3-8b", "--draft", "llama3-8b", "--accept", "1.5", cwd=tmp_path)
    assert r.returncode == 2 and "--accept" in r.stderr and "Traceback" not in r.stderr
    r = _cli("plan", "--model", "llama3-8b", "--concurrency", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--concurrency" in r.stderr


# --- planning for serve --parallel N: the KV cache holds N sequences ------------------------------------------
def test_parallel_sequences_reserve_n_times_the_kv_cache() -> None:
    from prima_sim.halda.costmodel import DeviceCosts

    cluster = load_cluster_arg("paper-d1-d4")
    model = load_model_arg("qwen2.5-32b")
    one, four = Workload(n_ctx=1024), Workload(n_ctx=1024, n_seq=4)
    dev = cluster.devices[0]
    kv1, kv4 = DeviceCosts(dev, model, one).layer_kv_bytes, DeviceCosts(dev, model, four).layer_kv_bytes
    assert kv4 == tuple(4 * b for b in kv1) and sum(kv1) > 0
    p1, p4 = make_plan(cluster, model, one), make_plan(cluster, model, four)
    assert (p1.n_seq, p4.n_seq) == (1, 4)
    # less RAM left for weights: the same cluster can only be slower for four sequences' caches
    assert p4.prediction.tpot_s >= p1.prediction.tpot_s


def test_n_seq_is_in_the_contract_but_leaves_old_fingerprints_alone(setup) -> None:
    from prima_sim.errors import InputError
    from prima_sim.plan import Plan

    plan, cluster, model, _wl = setup
    assert Plan.from_json(plan.to_json()) == plan
    legacy = json.loads(plan.to_json())
    del legacy["n_seq"]  # a plan written before the field
    assert Plan.from_json(json.dumps(legacy)).fingerprint() == plan.fingerprint()
    two = plan.model_copy(update={"n_seq": 2})
    assert two.fingerprint() != plan.fingerprint()  # shards for one sequence are not shards for two
    with pytest.raises(InputError, match=r"n_seq.*--parallel 2"):
        plan.check_against(cluster, model, Workload(n_ctx=plan.n_ctx, n_seq=2))


def test_plan_and_simulate_take_parallel(tmp_path: Path) -> None:
    from prima_sim.cli.main import main

    out = tmp_path / "p.json"
    assert main(["plan", "--cluster", "paper-d1-d4", "--model", "qwen2.5-32b", "--parallel", "4", "--out", str(out),
                 "--json"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["n_seq"] == 4
    assert (
        main(["simulate", "--plan", str(out), "--tokens", "2", "--no-gantt", "--out", str(tmp_path / "s")])
        == 0
    )
    assert main(["simulate", "--plan", str(out), "--parallel", "2", "--tokens", "2", "--no-gantt"]) == 2
    assert (
        main(
            [
                "plan",
                "--cluster",
                "paper-d1-d4",
                "--model",
                "qwen2.5-32b",
                "--ctx",
                "4096",
                "--parallel",
                "64",
            ]
        )
        != 0
    )


# --- the draft model's memory on the head (issue 14 item 5) ---------------------------------------------------
def test_the_draft_is_charged_to_the_head() -> None:
    from prima_sim.halda.costmodel import charge_draft, draft_memory_bytes

    cluster = load_cluster_arg("paper-d1-d4")
    wl = Workload(n_ctx=1024, n_seq=2)
    draft = load_model_arg("llama3-8b")
    head = cluster.device(cluster.head_name)
    need = draft_memory_bytes(head, draft, wl)
    assert need > draft.total_bytes  # its weights, and its KV cache (two sequences) and buffers beside them
    charged = charge_draft(cluster, draft, wl)
    assert charged.device(cluster.head_name).ram_available_bytes == max(
        0, int(head.ram_available_bytes - need)
    )
    others = [d for d in cluster.devices if d.name != cluster.head_name]
    assert [charged.device(d.name) for d in others] == others


def test_plan_with_a_draft_keeps_room_for_it_on_the_head(tmp_path: Path) -> None:
    from prima_sim.plan import Plan

    base = ["plan", "--cluster", "paper-d1-d4", "--model", "qwen2.5-32b", "--json"]
    r = _cli(*base, "--out", str(tmp_path / "plain.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli(
        *base, "--draft", "llama3-8b", "--accept", "0.7", "--out", str(tmp_path / "draft.json"), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    plain, drafted = Plan.load(tmp_path / "plain.json"), Plan.load(tmp_path / "draft.json")
    # 5 GB less RAM on the head: its share of the target is planned smaller or slower, never faster
    assert drafted.prediction is not None and plain.prediction is not None
    assert drafted.prediction.tpot_s >= plain.prediction.tpot_s
    assert drafted != plain
    assert drafted.cluster_fingerprint == plain.cluster_fingerprint  # still a plan of these devices
    r = _cli("simulate", "--plan", str(tmp_path / "draft.json"), "--tokens", "2", "--no-gantt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


# --- the simulator with several sequences per pass (issue 14 item 5) ------------------------------------------
def test_sim_steps_carry_one_row_per_sequence() -> None:
    from prima_sim.sim.config import SimConfig
    from prima_sim.sim.engine import steps_for

    wl = Workload(n_ctx=1024, prompt_tokens=100, decode_tokens=3, n_ubatch=128)
    assert steps_for(wl) == steps_for(wl, 1)
    st = steps_for(wl, 3)
    assert st[0].batches == ((128, 128), (128, 256), (44, 300))  # three prompts prefilled together
    assert [s.batches for s in st[1:]] == [((3, 303),), ((3, 306),), ((3, 309),)]  # every cache, unified
    assert "concurrency" not in SimConfig().to_dict()  # summaries of one sequence read as before
    assert SimConfig(concurrency=4).to_dict()["concurrency"] == 4
    with pytest.raises(ValueError, match="concurrency"):
        SimConfig(concurrency=0)


def test_simulated_passes_cost_what_the_cost_model_says(setup) -> None:
    from dataclasses import replace

    from prima_sim.halda.costmodel import pass_breakdown
    from prima_sim.sim import SimConfig, simulate

    plan, cluster, model, wl = setup
    wl = wl.with_decode_tokens(4)
    tpots = []
    for n in (1, 2, 4):
        res = simulate(plan, cluster, model, wl, replace(SimConfig(), concurrency=n, record_spans=False))
        kv = n * (wl.prompt_tokens + 2)  # the median decode step
        analytic = pass_breakdown(plan, cluster, model, wl, n, n, kv).total_s
        # the same pass, plus what the simulator adds (sampling every row, the embedding)
        assert res.tpot_s == pytest.approx(analytic, rel=0.05)
        tpots.append(res.tpot_s)
    assert tpots == sorted(tpots)


def test_simulate_concurrency_prints_the_simulators_figures(tmp_path: Path) -> None:
    r = _cli("simulate", "--cluster", "default", "--model", "llama3-8b", "--tokens", "3", "--concurrency", "2",
             "--no-gantt", "--json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    pts = json.loads(r.stdout)["concurrency"]
    assert [p["concurrency"] for p in pts] == [1, 2]
    assert all(p["sim_tpot_s"] > 0 and p["sim_throughput_tps"] > 0 for p in pts)
    assert pts[1]["sim_throughput_tps"] > pts[0]["sim_throughput_tps"]


# --- speculative decoding in the simulator -------------------------------------------------------------------
def test_simulated_speculation_follows_the_cost_model(setup) -> None:
    """The simulator drafts on the head, verifies draft_max + 1 rows in one pass, and draws each pass's acceptances;
    with none or all accepted it must land on the cost model's figure, in between on its expectation."""
    from prima_sim.sim import SimConfig, simulate

    plan, cluster, model, wl = setup
    draft = load_model_arg("smollm2-135m")
    quiet = SimConfig(record_spans=False)
    for accept in (0.0, 1.0):
        wl20 = wl.with_decode_tokens(20)  # 20 = 4 passes of 5 tokens when all are accepted
        res = simulate(plan, cluster, model, wl20, SimConfig(record_spans=False, draft_max=4, accept=accept),
                       draft=draft)  # fmt: skip
        s = speculation(plan, cluster, model, wl20, draft, accept, 4)
        assert res.tokens_per_pass == s.expected_tokens
        assert res.tpot_s == pytest.approx(s.tpot_s, rel=0.05)
    wl400 = wl.with_decode_tokens(400)
    res = simulate(
        plan, cluster, model, wl400, SimConfig(record_spans=False, draft_max=4, accept=0.7), draft=draft
    )
    assert sum(res.produced) == 400
    assert res.tokens_per_pass == pytest.approx(expected_tokens(0.7, 4), rel=0.1)
    again = simulate(
        plan, cluster, model, wl400, SimConfig(record_spans=False, draft_max=4, accept=0.7), draft=draft
    )
    assert again.produced == res.produced, "acceptances come from the seeded stream"
    plain = simulate(plan, cluster, model, wl400, quiet)
    assert not plain.produced and plain.tokens_per_pass == 1.0
    with pytest.raises(ValueError, match="draft"):
        simulate(plan, cluster, model, wl400, SimConfig(draft_max=4))
    for bad in ({"draft_max": -1}, {"accept": 1.5}, {"draft_max": 2, "concurrency": 2}):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    assert "draft_max" not in SimConfig().to_dict() and SimConfig(draft_max=3).to_dict()["draft_max"] == 3


def test_simulate_draft_prints_the_simulators_figures(tmp_path: Path) -> None:
    r = _cli("simulate", "--model", "llama3-8b", "--tokens", "12", "--draft", "smollm2-135m", "--accept", "0.8",
             "--no-gantt", "--json", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["speculation"]
    assert s["sim_tpot_s"] > 0 and 1.0 <= s["sim_tokens_per_pass"] <= 5.0 and s["sim_speedup"] > 0
    assert s["sim_plain_tpot_s"] == pytest.approx(s["plain_tpot_s"], rel=0.05)
    # a draft this small takes next to no memory: against no draft at all the speed-up is the same
    assert s["speedup_vs_no_draft"] == pytest.approx(s["speedup"], rel=0.02) and s["speedup_vs_no_draft"] > 1
    assert s["sim_no_draft_tpot_s"] == pytest.approx(s["no_draft_tpot_s"], rel=0.05)
    r = _cli("simulate", "--model", "llama3-8b", "--tokens", "12", "--draft", "smollm2-135m", "--accept", "0.8",
             "--no-gantt", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "simulated (acceptances drawn at 0.80)" in r.stdout
    assert "without a draft" in r.stdout and "does not pay" not in r.stdout


def test_a_draft_whose_memory_makes_the_head_page_is_called_a_loss(tmp_path: Path) -> None:
    """The default cluster runs the 70B model with its head's memory full: an 8B draft there takes the room of
    weights that then page, so speculation beats decoding on the same starved head but loses against decoding
    without a draft, and the output says so (the comparison a user decides by)."""
    r = _cli("simulate", "--tokens", "8", "--draft", "llama3-8b", "--accept", "0.7", "--no-gantt", "--json",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["speculation"]
    assert s["speedup"] > 1 and s["sim_speedup"] > 1  # against the head starved by the draft
    assert s["speedup_vs_no_draft"] < 1 and s["sim_speedup_vs_no_draft"] < 1  # against no draft: slower
    assert s["no_draft_tpot_s"] < s["plain_tpot_s"]
    r = _cli(
        "simulate", "--tokens", "8", "--draft", "llama3-8b", "--accept", "0.7", "--no-gantt", cwd=tmp_path
    )
    assert r.returncode == 0 and "the draft does not pay here" in r.stdout
