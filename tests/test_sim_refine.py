"""Choosing k by simulation: under memory pressure prefetch makes small windows pay; Halda's cost model sees it
too now, and the simulation agrees with its choice."""

from __future__ import annotations

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import load_cluster
from prima_sim.halda.planner import make_plan
from prima_sim.sim.refine import plan_by_simulated_k
from prima_sim.workload import Workload


def test_simulated_k_and_halda_agree_on_several_rounds_under_memory_pressure() -> None:
    cluster = load_cluster("prefetch-4x8g")
    model = catalog_model("llama3-70b")
    wl = Workload(n_ctx=1024, prompt_tokens=16, decode_tokens=6)
    plan, candidates = plan_by_simulated_k(cluster, model, wl)
    analytic = make_plan(cluster, model, wl)
    by_k = {c.k: c for c in candidates if c.plan is not None}
    assert analytic.k >= 2  # prefetch hides reads behind the others' work, which only several rounds allow
    assert plan.k >= 2
    assert by_k[plan.k].simulated_tpot_s < 0.8 * by_k[1].simulated_tpot_s
    assert by_k[analytic.k].simulated_tpot_s <= 1.05 * by_k[plan.k].simulated_tpot_s
    assert plan.solver.details.k_by_simulation
    assert plan.prediction is not None  # the analytic prediction stays attached


def test_simulated_k_keeps_k1_when_everything_fits() -> None:
    cluster = load_cluster("paper-containers")
    model = catalog_model("llama3-8b")
    wl = Workload(n_ctx=1024, prompt_tokens=16, decode_tokens=6)
    plan, _ = plan_by_simulated_k(cluster, model, wl)
    assert plan.k == 1
