"""Choosing the number of ring rounds k by simulation (beyond prima.cpp).

Halda's analytic model, like prima.cpp's, has no notion of prefetch: it charges weights that do not fit as
a re-read every token with nothing overlapped, so extra rounds only add hops and it settles on k = 1. Yet
prefetch is the reason the piped ring exists: with k >= 2 each window is small enough to be loaded while
the other devices compute (paper §3.1, Fig. 2; the simulator reproduces it, docs/sim.md). This module
plans the model with Halda for every valid k, simulates each plan for a few decode tokens, and keeps the
plan whose simulated TPOT is lowest. The analytic prediction stays attached to the plan; the simulated
figures are recorded in its solver details.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.halda import valid_ks
from prima_sim.halda.planner import make_plan
from prima_sim.plan import Plan
from prima_sim.sim.config import SimConfig
from prima_sim.sim.engine import simulate
from prima_sim.solver import HaldaDetails, KBySimulation, SolverInfo
from prima_sim.workload import Workload

RANKING_DECODE_TOKENS = 6
"""Decode tokens simulated per candidate: the ring reaches its steady state after the first one or two."""


@dataclass(frozen=True)
class KCandidate:
    """One k tried: Halda's plan for it, its analytic and simulated TPOT."""

    k: int
    plan: Plan | None
    analytic_tpot_s: float
    simulated_tpot_s: float
    note: str = ""


def plan_by_simulated_k(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    config: SimConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Plan, list[KCandidate]]:
    """Halda's plan for the k whose plan simulates fastest, and every candidate tried.

    Raises:
        InfeasiblePlanError: no k gives a feasible plan.
    """
    cfg = config or SimConfig(record_spans=False)
    ranking = workload.with_decode_tokens(min(workload.decode_tokens, RANKING_DECODE_TOKENS) or 1)
    ks = valid_ks(model.arch.n_layer, 1)
    candidates: list[KCandidate] = []
    for i, k in enumerate(ks):
        if progress:
            progress(i, len(ks))
        try:
            plan = make_plan(cluster, model, workload, "halda", k=k)
        except InfeasiblePlanError as exc:
            candidates.append(KCandidate(k, None, math.inf, math.inf, f"infeasible: {exc}"))
            continue
        if plan.k != k:  # fewer devices than the window total needs at this k
            continue
        sim = simulate(plan, cluster, model, ranking, cfg)
        assert plan.prediction is not None  # make_plan attaches it
        candidates.append(KCandidate(k, plan, plan.prediction.tpot_s, sim.tpot_s))
    if progress:
        progress(len(ks), len(ks))
    ok = [c for c in candidates if c.plan is not None and math.isfinite(c.simulated_tpot_s)]
    if not ok:
        raise InfeasiblePlanError(
            "no k gives a feasible Halda plan for this cluster and model", resource="memory"
        )
    best = min(ok, key=lambda c: (c.simulated_tpot_s, c.k))
    chosen = best.plan
    assert chosen is not None
    assert isinstance(chosen.solver.details, HaldaDetails)
    details = chosen.solver.details.model_copy(update={
        "k_by_simulation": tuple(
            KBySimulation(k=c.k, analytic_tpot_s=c.analytic_tpot_s, simulated_tpot_s=c.simulated_tpot_s,
                          windows=tuple(c.plan.windows) if c.plan else None, note=c.note)
            for c in candidates
        ),
        "simulated_tpot_s": best.simulated_tpot_s,
    })  # fmt: skip
    solver = SolverInfo(status=chosen.solver.status, objective_s=chosen.solver.objective_s,
                        solve_time_s=chosen.solver.solve_time_s, details=details)  # fmt: skip
    return chosen.model_copy(update={"solver": solver, "scheduler": "halda"}), candidates
