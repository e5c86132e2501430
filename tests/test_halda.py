"""Halda: property tests over random heterogeneous clusters, and the ILP optimum against exhaustive search."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.costmodel import DeviceCosts, Workload, predict
from prima_sim.halda.halda import halda, select_devices, valid_ks
from prima_sim.halda.ilp import MASTER_PRIORITY, coefficients, feasible, objective, solve_k
from prima_sim.halda.planner import SCHEDULERS, make_plan, manual_plan
from prima_sim.plan import Plan
from tests.factories import cluster, device, smollm2_model

MODEL16 = smollm2_model(16)
MODEL30 = smollm2_model()
WL = Workload(n_ctx=256, prompt_tokens=16, decode_tokens=16, n_ubatch=256)
MB = 2**20


@st.composite
def devices(draw: st.DrawFn, name: str) -> object:
    """A random device: Linux (maybe CUDA), macOS (maybe Metal) or Android; memory around the model's size."""
    os_ = draw(st.sampled_from(["linux", "linux", "macos", "android"]))
    avail = draw(st.integers(12, 90)) * MB
    over: dict = {
        "os": os_,
        "ram_available_bytes": avail,
        "ram_total_bytes": avail + draw(st.integers(0, 64)) * MB,
        "disk_seq_read_bps": draw(st.sampled_from([0.05e9, 0.5e9, 2e9, 3.5e9])),
        "disk_rand_read_bps": draw(st.sampled_from([0.05e9, 0.2e9, 0.8e9])),
        "memory_bandwidth_bps": draw(st.sampled_from([8e9, 30e9, 100e9])),
        "cpu_flops": {"f32": draw(st.sampled_from([5e10, 2e11])), "f16": 2e11, "q4_1": draw(st.sampled_from([1e11, 6e11])),
                      "q8_0": 3e11},
        "decode_overhead_s": draw(st.sampled_from([0.0, 2e-4])),
    }  # fmt: skip
    if os_ == "android":
        over["swap_total_bytes"] = over["swap_available_bytes"] = 32 * MB
        over["swappable_bytes"] = draw(st.integers(0, 32)) * MB
    gpu = draw(st.booleans())
    if gpu and os_ == "linux":
        free = draw(st.integers(0, 60)) * MB + 700 * MB
        over["gpu"] = {"kind": "cuda", "flops": {"f32": 5e12, "f16": 2e13, "q4_1": 1e13, "q8_0": 1e13},
                       "vram_total_bytes": free + 100 * MB, "vram_free_bytes": free, "memory_bandwidth_bps": 4e11}  # fmt: skip
    elif gpu and os_ == "macos":
        over["unified_memory"] = True
        over["gpu"] = {"kind": "metal", "flops": {"f32": 2e12, "f16": 4e12, "q4_1": 3e12, "q8_0": 3e12},
                       "vram_total_bytes": avail, "vram_free_bytes": avail, "memory_bandwidth_bps": 6e10}  # fmt: skip
    return device(name, **over)


@st.composite
def clusters(draw: st.DrawFn, max_devices: int = 5) -> object:
    n = draw(st.integers(1, max_devices))
    devs = [draw(devices(f"d{i}")) for i in range(n)]
    return cluster(devs, bandwidth=draw(st.sampled_from([40e6, 80e6, 1e9])), latency=draw(st.sampled_from([0.0, 0.003])))


def _check_plan(plan: Plan, c: object, model: object) -> None:
    # every layer exactly once (the Plan validator checks tiling; check it again from the windows and k)
    covered = sorted(i for d in plan.devices for a, b in d.layers for i in range(a, b))
    assert covered == list(range(model.arch.n_layer))
    assert sum(d.window for d in plan.devices) * plan.k == model.arch.n_layer
    for d in plan.devices:
        assert 0 <= d.gpu_layers <= d.window
        assert d.window >= 1
    assert plan.head == c.ring_order[0]
    assert plan.head not in {dr.name for dr in plan.dropped}
    assert {d.name for d in plan.devices} | {dr.name for dr in plan.dropped} == set(c.ring_order)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_halda_plans_are_valid_and_respect_every_constraint(c: object) -> None:
    try:
        sel = select_devices(c, MODEL30, WL)
    except InfeasiblePlanError as exc:
        assert str(exc)
        return
    res = sel.result
    sol = res.solution
    W = MODEL30.arch.n_layer // sol.k
    assert feasible(res.coefs, W, sol.w, sol.n), "the solution violates a constraint of its own program"
    plan = make_plan(c, MODEL30, WL)
    _check_plan(plan, c, MODEL30)
    # the planner's memory rows keep pinned memory and VRAM within limits, so the plan is runnable
    assert math.isfinite(plan.prediction.tpot_s)
    # the objective it minimised is the analytic prediction of its plan (identical layers: exact)
    assert plan.solver.objective_s == pytest.approx(plan.prediction.tpot_s, rel=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(max_devices=3))
def test_ilp_optimum_equals_exhaustive_search(c: object) -> None:
    ring = list(c.ring_order)
    res = halda(c, ring, MODEL16, WL)
    if res is None:
        return
    costs = {n: DeviceCosts(c.device(n), MODEL16, WL) for n in ring}
    L = MODEL16.arch.n_layer
    best_ilp, best_enum = math.inf, math.inf
    for k in valid_ks(L, len(ring)):
        W = L // k
        coefs = coefficients(c, ring, MODEL16, WL, k, res.sets, costs)
        sol = solve_k(coefs, k, W)
        enum = math.inf
        for w in itertools.product(range(1, W + 1), repeat=len(ring)):
            if sum(w) != W:
                continue
            for n in itertools.product(*(range(wi + 1) for wi in w)):
                if feasible(coefs, W, w, n):
                    enum = min(enum, objective(coefs, k, w, n, MASTER_PRIORITY))
        if sol is None:
            assert enum == math.inf, f"k={k}: solver found no solution but exhaustive search did"
            continue
        got = objective(coefs, k, sol.w, sol.n, MASTER_PRIORITY)
        assert got == pytest.approx(enum, rel=1e-9, abs=1e-12), f"k={k}"
        best_ilp, best_enum = min(best_ilp, got), min(best_enum, enum)
    assert best_ilp == pytest.approx(best_enum, rel=1e-9, abs=1e-12)


def test_every_scheduler_gives_a_valid_plan_of_the_same_type() -> None:
    devs = [device("h"), device("g", ram_available_bytes=30 * MB, gpu={
        "kind": "cuda", "flops": {"f32": 5e12, "q4_1": 1e13, "f16": 1e13}, "vram_total_bytes": 2**30,
        "vram_free_bytes": 730 * MB, "memory_bandwidth_bps": 4e11}), device("m", os="macos", ram_available_bytes=20 * MB)]  # fmt: skip
    c = cluster(devs)
    for s in SCHEDULERS:
        p = make_plan(c, MODEL30, WL, s)
        _check_plan(p, c, MODEL30)
        assert Plan.from_json(p.to_json()) == p
        assert p.prediction is not None and p.prediction.tpot_s > 0


def test_manual_windows_follow_prima_ring_order_and_allow_a_partial_last_round() -> None:
    c = cluster([device("h"), device("a"), device("b")])
    p = manual_plan(c, MODEL30, WL, [4, 3, 4])
    assert p.execution_order()[:3] == [("a", (0, 3)), ("b", (3, 7)), ("h", (7, 11))]
    assert p.device("h").layers[-1] == (29, 30)
    assert p.k == 3


def test_slow_device_is_dropped_when_that_lowers_predicted_tpot() -> None:
    # h and f together just hold the model; s is slow and its memory is not needed
    fast = [device("h", ram_available_bytes=80 * MB), device("f", ram_available_bytes=60 * MB)]
    slow = device("s", cpu_flops={"f32": 1e9, "q4_1": 1e9, "f16": 1e9, "q8_0": 1e9}, memory_bandwidth_bps=1e8)
    c = cluster([*fast, slow])
    p = make_plan(c, MODEL30, WL)
    assert [d.name for d in p.dropped] == ["s"]
    kept = make_plan(c, MODEL30, WL, allow_drop=False)
    assert "s" in [d.name for d in kept.devices]
    assert p.prediction.tpot_s < kept.prediction.tpot_s


def test_k_that_does_not_divide_the_layers_is_refused() -> None:
    c = cluster([device("h"), device("a")])
    with pytest.raises(InfeasiblePlanError, match="does not divide"):
        make_plan(c, MODEL30, WL, k=4)


def test_kv_cache_that_fits_nowhere_names_the_resource_and_shortfall() -> None:
    c = cluster([device("h", ram_available_bytes=64 * MB, ram_total_bytes=64 * MB)])
    wl = Workload(n_ctx=200_000, prompt_tokens=16, decode_tokens=16, n_ubatch=16)
    with pytest.raises(InfeasiblePlanError) as info:
        make_plan(c, MODEL30, wl)
    assert info.value.resource == "RAM+VRAM of all devices"
    assert info.value.shortfall_bytes and info.value.shortfall_bytes > 0
    assert "short by" in str(info.value)


def test_prediction_breaks_down_per_device_and_scores_every_plan_the_same_way() -> None:
    c = cluster([device("h"), device("a", disk_seq_read_bps=0.5e9, ram_available_bytes=20 * MB)])
    plans = [make_plan(c, MODEL30, WL, s) for s in SCHEDULERS]
    for p in plans:
        again = predict(p, c, MODEL30, WL)
        assert again.tpot_s == pytest.approx(p.prediction.tpot_s)
        total = sum(t.total_s for t in again.per_device) + again.head_s
        assert total == pytest.approx(again.tpot_s)
    assert min(plans, key=lambda p: p.prediction.tpot_s).scheduler == "halda"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(max_devices=5), st.sampled_from(["M1M3", "M4", "mixed"]))
def test_greedy_solver_matches_highs_on_every_k(c: object, mode: str) -> None:
    """The combinatorial solver used to bound the k loop finds the same optimum as HiGHS."""
    from prima_sim.halda.greedy import solve_k_greedy
    from prima_sim.halda.ilp import DeviceSet, overloaded_set

    ring = list(c.ring_order)
    costs = {n: DeviceCosts(c.device(n), MODEL30, WL) for n in ring}
    L = MODEL30.arch.n_layer
    pick = {n: {"M1M3": True, "M4": False, "mixed": i % 2 == 0}[mode] for i, n in enumerate(ring)}
    sets = {n: (overloaded_set(costs[n]) if pick[n] else DeviceSet.M4) for n in ring}
    for k in valid_ks(L, len(ring)):
        coefs = coefficients(c, ring, MODEL30, WL, k, sets, costs)
        g = solve_k_greedy(coefs, k, L // k, MASTER_PRIORITY)
        h = solve_k(coefs, k, L // k, MASTER_PRIORITY)
        assert (g is None) == (h is None), f"k={k}: feasibility differs"
        if g is not None:
            assert feasible(coefs, L // k, g[1], g[2])
            assert g[0] == pytest.approx(objective(coefs, k, h.w, h.n, MASTER_PRIORITY), rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_set_search_never_worsens_the_published_loop(c: object) -> None:
    ring = list(c.ring_order)
    plain = halda(c, ring, MODEL30, WL, refine=False)
    refined = halda(c, ring, MODEL30, WL)
    assert (plain is None) == (refined is None)
    if plain is not None:
        assert refined.solution.objective_s <= plain.solution.objective_s * (1 + 1e-9) + 1e-12


def test_paper_testbed_halda_beats_every_baseline() -> None:
    """D1-D4 with Llama 3 70B Q4_K_M (the paper's headline setting): Halda's predicted TPOT is the lowest."""
    from prima_sim.devices.catalog import catalog_model
    from prima_sim.devices.cluster import load_cluster

    c = load_cluster("paper-d1-d4")
    m = catalog_model("llama3-70b-q4_k_m")
    wl = Workload(n_ctx=1024, prompt_tokens=64, decode_tokens=128)
    tpot = {s: make_plan(c, m, wl, s).prediction.tpot_s for s in SCHEDULERS}
    for s in SCHEDULERS:
        if s != "halda":
            assert tpot["halda"] < tpot[s], tpot
