"""Making plans: Halda, the baselines and manual windows, all scored by the same analytic model.

:func:`make_plan` is the library entry point behind ``prima-sim plan``. Whatever the scheduler, the result
is a :class:`~prima_sim.plan.Plan` whose ``prediction`` comes from :func:`prima_sim.halda.costmodel.predict`,
so comparisons between schedulers are fair.
"""

from __future__ import annotations

import time
from typing import Any

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError, InputError
from prima_sim.halda.baselines import BASELINES, baseline_windows
from prima_sim.halda.costmodel import Workload, check_memory, predict
from prima_sim.halda.halda import select_devices
from prima_sim.halda.ilp import MASTER_PRIORITY
from prima_sim.plan import Dropped, Plan, SolverInfo, make_assignments, rounds_for

SCHEDULERS: tuple[str, ...] = ("halda", *BASELINES)
"""Scheduler names accepted by :func:`make_plan`."""


def model_fingerprint(model: ModelProfile) -> str:
    """Short hash of the model's tensor table (what shards and workers must agree on)."""
    return model.fingerprint


def _finish(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> Plan:
    return plan.model_copy(update={"prediction": predict(plan, cluster, model, workload)})


def make_plan(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    scheduler: str = "halda",
    k: int | None = None,
    master_priority: float = MASTER_PRIORITY,
    allow_drop: bool = True,
) -> Plan:
    """Plan ``model`` on ``cluster`` with ``scheduler`` (one of :data:`SCHEDULERS`).

    ``allow_drop=False`` turns Halda's device selection off (every device keeps a window).

    Raises:
        InfeasiblePlanError: nothing fits (names the binding resource and the shortfall).
        InputError: unknown scheduler.
    """
    if scheduler not in SCHEDULERS:
        raise InputError("--scheduler", "", f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    L = model.arch.n_layer
    if scheduler == "halda":
        sel = select_devices(cluster, model, workload, k, master_priority, allow_drop)
        res = sel.result
        sol = res.solution
        details: dict[str, Any] = {
            "k_candidates": sorted({int(x) for x in (sol.k,)}),
            "sets": {name: s.value for name, s in res.sets.items()},
            "forced_m4": sorted(res.forced_m4),
            "binding": sol.binding,
            "coefficients_ms": {
                c.name: {"a": c.a * 1e3, "b": c.b * 1e3, "xi": c.xi * 1e3, "alpha": c.alpha * 1e3,
                         "beta": c.beta * 1e3, "disk_GBps": c.disk_bps / 1e9}
                for c in res.coefs
            },
            "iterations": res.iterations,
            "ilp_solves": res.solves,
            "selection_rounds": sel.rounds,
            "log": res.log,
        }
        plan = Plan(
            model_id=model.id, model_fingerprint=model_fingerprint(model), n_layers=L,
            cluster_name=cluster.name, cluster_fingerprint=cluster.fingerprint(), k=sol.k, n_ctx=workload.n_ctx,
            devices=make_assignments(res.ring, sol.w, sol.n, L),
            dropped=tuple(Dropped(name=n, reason=r) for n, r in sel.dropped),
            scheduler="halda",
            solver=SolverInfo(status=sol.status.lower(), objective_s=sol.objective_s, solve_time_s=sel.solve_time_s,
                              details=details),
        )  # fmt: skip
        return _finish(plan, cluster, model, workload)
    t0 = time.perf_counter()
    ring = list(cluster.ring_order)
    if len(ring) > L:
        raise InfeasiblePlanError(f"{scheduler} needs at least one layer per device: {len(ring)} devices, {L} layers",
                                  resource="layers")  # fmt: skip
    w, n = baseline_windows(scheduler, cluster, ring, model, workload)
    return _plan_from_windows(cluster, model, workload, ring, w, n, scheduler, time.perf_counter() - t0)


def manual_plan(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    windows: list[int],
    gpu_layers: list[int] | None = None,
) -> Plan:
    """A plan from explicit windows in ring order (prima.cpp's ``-lw``), without solving.

    Devices given a window of 0 are left out (the head may have 0: it then only embeds and runs the output
    head). Windows that do not divide the layer count leave a partial last round.

    Raises:
        InputError: the number of windows does not match the devices, or a value is negative.
    """
    ring = list(cluster.ring_order)
    if len(windows) != len(ring):
        raise InputError("--windows", "", f"{len(windows)} windows given for {len(ring)} devices in ring order "
                         f"{', '.join(ring)}: give one per device")  # fmt: skip
    if any(x < 0 for x in windows) or sum(windows) == 0:
        raise InputError("--windows", "", f"windows must be >= 0 and not all zero, got {windows}")
    gl = list(gpu_layers) if gpu_layers is not None else [0] * len(ring)
    if len(gl) != len(ring) or any(x < 0 for x in gl):
        raise InputError("--gpu-layers", "", f"give one non-negative value per device ({len(ring)}), got {gl}")
    return _plan_from_windows(cluster, model, workload, ring, list(windows), gl, "manual", 0.0)


def _plan_from_windows(cluster: Cluster, model: ModelProfile, workload: Workload, ring: list[str], w: list[int],
                       n: list[int], scheduler: str, solve_time: float) -> Plan:
    L = model.arch.n_layer
    keep = [i for i, wi in enumerate(w) if wi > 0 or i == 0]
    dropped = tuple(Dropped(name=ring[i], reason=f"{scheduler} gave it no layers") for i in range(len(ring)) if i not in keep)
    names = [ring[i] for i in keep]
    ws = [w[i] for i in keep]
    ns = [min(n[i], w[i]) for i in keep]
    plan = Plan(
        model_id=model.id, model_fingerprint=model_fingerprint(model), n_layers=L, cluster_name=cluster.name,
        cluster_fingerprint=cluster.fingerprint(), k=rounds_for(ws, L), n_ctx=workload.n_ctx,
        devices=make_assignments(names, ws, ns, L), dropped=dropped, scheduler=scheduler,
        solver=SolverInfo(status="heuristic" if scheduler != "manual" else "manual", solve_time_s=solve_time),
    )  # fmt: skip
    return _finish(plan, cluster, model, workload)


def plan_problems(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> list[str]:
    """Reasons a plan cannot run (pinned memory or VRAM exceeded); empty when it can."""
    return check_memory(plan, cluster, model, workload)
