"""prima.cpp's published Halda (the ``prima`` scheduler): its integer programs against exhaustive search and the
greedy solver, and the set search (random heterogeneous clusters, hypothesis)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.halda.halda import valid_ks
from prima_sim.halda.ilp import MASTER_PRIORITY, coefficients, feasible, objective, solve_k
from prima_sim.halda.published import halda_published as halda
from prima_sim.workload import Workload
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
    return cluster(
        devs, bandwidth=draw(st.sampled_from([40e6, 80e6, 1e9])), latency=draw(st.sampled_from([0.0, 0.003]))
    )


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
