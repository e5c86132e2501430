"""Making plans: Halda, prima.cpp's published Halda, the baselines and manual windows, all scored alike.

:func:`make_plan` is the library entry point behind ``prima-sim plan``. Whatever the scheduler, the result
is a :class:`~prima_sim.plan.Plan` whose ``prediction`` comes from :func:`prima_sim.halda.costmodel.predict`,
so comparisons between schedulers are fair.

Halda's plan is the exact search's best (:mod:`prima_sim.halda.search`). Where the search only tries
candidate GPU layer counts that may miss a device's best (layers faster on the GPU for some layer types and
slower for others, or GPU layers that are copies in unified RAM), a local search (a GPU layer more or less
on any device) polishes it (``solver.details.polish``). Then it is checked against the baselines' plans,
which the search covers: if one of them predicts a lower TPOT it is returned instead and the plan says so
(``solver.details.fallback``; ``--explain`` prints it): that is a bug of the search, never expected.
The plan also records how its search objective compares with ``predict()`` (they are the same function, so
any difference beyond 1% is a warning).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError, InputError
from prima_sim.halda.baselines import BASELINES, baseline_windows
from prima_sim.halda.costmodel import (
    DeviceCosts,
    check_memory,
    predict,
    step_breakdown,
    with_streaming,
)
from prima_sim.halda.halda import Selection, select_devices
from prima_sim.halda.ilp import MASTER_PRIORITY
from prima_sim.halda.local_search import headroom, polish, prefer_headroom
from prima_sim.halda.search import gpu_counts_approximate
from prima_sim.plan import Dropped, Plan, make_assignments, rounds_for
from prima_sim.solver import (
    Fallback,
    HaldaDetails,
    Headroom,
    KCandidate,
    Polish,
    PublishedDetails,
    SolverInfo,
)
from prima_sim.workload import Workload


@dataclass(frozen=True)
class Scheduler:
    """A way to plan, as :func:`make_plan` dispatches it.

    Attributes:
        name: the ``--scheduler`` value and the plan's ``scheduler``.
        description: one line for help texts.
        searches_k: it chooses the number of rounds (and honours a forced ``k`` and device selection); the
            baselines always run k = 1 with every device.
        plan: ``(cluster, model, workload, options) -> Plan``.
    """

    name: str
    description: str
    searches_k: bool
    plan: Callable[[Cluster, ModelProfile, Workload, PlanOptions], Plan]


@dataclass(frozen=True)
class PlanOptions:
    """What a scheduler may be asked besides the cluster, model and workload (see :func:`make_plan`)."""

    k: int | None = None
    allow_drop: bool = True
    prefetch: bool = True
    master_priority: float = MASTER_PRIORITY
    stream: bool = True


def _baseline(name: str) -> Callable[[Cluster, ModelProfile, Workload, PlanOptions], Plan]:
    def plan(cluster: Cluster, model: ModelProfile, workload: Workload, o: PlanOptions) -> Plan:
        t0 = time.perf_counter()
        ring = list(cluster.ring_order)
        L = model.arch.n_layer
        if len(ring) > L:
            raise InfeasiblePlanError(f"{name} needs at least one layer per device: {len(ring)} devices, {L} layers",
                                      resource="layers")  # fmt: skip
        w, n = baseline_windows(name, cluster, ring, model, workload)
        return _plan_from_windows(
            cluster, model, workload, ring, w, n, name, time.perf_counter() - t0, o.prefetch, o.stream
        )

    return plan


REGISTRY: dict[str, Scheduler] = {}
"""Every scheduler by name: Halda, prima.cpp's published Halda, the baselines."""
SCHEDULERS: tuple[str, ...] = ()
"""Scheduler names accepted by :func:`make_plan` (``prima``: prima.cpp's Halda as published)."""


def register(s: Scheduler) -> None:
    """Add a scheduler to :data:`REGISTRY` (and :data:`SCHEDULERS`)."""
    global SCHEDULERS
    REGISTRY[s.name] = s
    SCHEDULERS = tuple(REGISTRY)


AGREEMENT_TOLERANCE = 0.01
"""Halda's search objective and ``predict()`` must agree within this fraction (they are one model)."""


def model_fingerprint(model: ModelProfile) -> str:
    """Short hash of the model's tensor table (what shards and workers must agree on)."""
    return model.fingerprint


def _finish(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, prefetch: bool = True,
            costs: dict[str, DeviceCosts] | None = None, stream: bool = True) -> Plan:  # fmt: skip
    """``plan`` with its devices' streaming chosen (``stream``: :func:`with_streaming`) and its prediction."""
    plan = with_streaming(plan, cluster, model, workload, costs, stream)
    return plan.model_copy(update={"prediction": predict(plan, cluster, model, workload, prefetch, costs)})


def make_plan(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    scheduler: str = "halda",
    k: int | None = None,
    master_priority: float = MASTER_PRIORITY,
    allow_drop: bool = True,
    prefetch: bool = True,
    stream: bool = True,
) -> Plan:
    """Plan ``model`` on ``cluster`` with ``scheduler`` (one of :data:`SCHEDULERS`).

    ``allow_drop=False`` turns Halda's device selection off (every device keeps a window). ``prefetch``
    says whether the run will prefetch (the executor's default); it changes what paging costs. ``stream``: a
    device of a k = 1 plan whose window exceeds its page cache streams its last layers (drop-behind, the
    executor's default; ``DeviceAssignment.streamed_layers``) where that reads less than the page cache would.
    ``master_priority`` is prima.cpp's preference for the head (the ``prima`` scheduler only).

    Raises:
        InfeasiblePlanError: nothing fits (names the binding resource and the shortfall).
        InputError: unknown scheduler.
    """
    s = REGISTRY.get(scheduler)
    if s is None:
        raise InputError(
            "--scheduler", "", f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}"
        )
    return s.plan(
        cluster,
        model,
        workload,
        PlanOptions(k if s.searches_k else None, allow_drop, prefetch, master_priority, stream),
    )


def _halda_plan(cluster: Cluster, model: ModelProfile, workload: Workload, o: PlanOptions) -> Plan:
    k, allow_drop, prefetch, stream = o.k, o.allow_drop, o.prefetch, o.stream
    t0 = time.perf_counter()
    costs: dict[str, DeviceCosts] = {}
    sel = select_devices(cluster, model, workload, k, allow_drop, prefetch, costs, stream)
    res = sel.result
    L = model.arch.n_layer
    plan = _finish(_halda_plan_of(cluster, model, workload, res.ring, res.w, res.n, sel), cluster, model, workload,
                   prefetch, costs, stream)  # fmt: skip
    assert plan.prediction is not None
    searched = plan.prediction.tpot_s
    notes: list[str] = []
    fallback: Fallback | None = None
    # local search where the search restricts GPU layer counts to candidates that may miss the best
    polished_info: Polish | None = None
    if any(gpu_counts_approximate(costs[a.name]) for a in plan.devices):
        polished, evals = polish(plan, cluster, model, workload, prefetch, costs, stream=stream)
        if polished is not plan:
            assert polished.prediction is not None and plan.prediction is not None
            polished_info = Polish(tpot_s=polished.prediction.tpot_s, before_s=plan.prediction.tpot_s,
                                   evaluations=evals)  # fmt: skip
            plan = polished
    # the baselines (k = 1, every device kept): the search covers their plans, so none may be faster
    ring = list(cluster.ring_order)
    if (k is None or k == 1) and len(ring) <= L:
        for name in BASELINES:
            w, n = baseline_windows(name, cluster, ring, model, workload, costs)
            keep = [i for i, wi in enumerate(w) if wi > 0 or i == 0]
            other = plan.model_copy(update={
                "devices": make_assignments([ring[i] for i in keep], [w[i] for i in keep], [n[i] for i in keep], L),
                "k": 1, "dropped": tuple(Dropped(name=ring[i], reason=f"{name} gave it no layers")
                                         for i in range(len(ring)) if i not in keep)})  # fmt: skip
            if check_memory(other, cluster, model, workload, costs):
                continue
            other = with_streaming(other, cluster, model, workload, costs, stream)
            t = step_breakdown(other, cluster, model, workload, prefetch=prefetch, costs=costs).total_s
            assert plan.prediction is not None
            if t < plan.prediction.tpot_s * (1 - 1e-9):
                fallback = Fallback(source=name, tpot_s=t, search_tpot_s=searched)
                plan = _finish(other, cluster, model, workload, prefetch, costs, stream)
                assert plan.prediction is not None
    assert plan.prediction is not None
    roomier, moved = prefer_headroom(plan, cluster, model, workload, prefetch, costs, stream=stream)
    headroom_info = None
    if moved:
        headroom_info = Headroom(layers_moved=moved, min_headroom_bytes=headroom(roomier, costs),
                                 before_bytes=headroom(plan, costs))  # fmt: skip
        plan = roomier
    assert plan.prediction is not None
    agreement = (res.objective_s - searched) / searched if math.isfinite(searched) and searched > 0 else 0.0
    if abs(agreement) > AGREEMENT_TOLERANCE:
        notes.append(f"warning: the search's objective ({res.objective_s * 1e3:.1f} ms) and predict() "
                     f"({searched * 1e3:.1f} ms) differ by {agreement:+.1%}")  # fmt: skip
    assert isinstance(plan.solver.details, HaldaDetails)
    details = plan.solver.details.model_copy(update={
        "search_objective_s": res.objective_s, "search_vs_predict": agreement, "fallback": fallback,
        "polish": polished_info, "headroom": headroom_info, "notes": tuple(notes),
    })  # fmt: skip
    solver = plan.solver.model_copy(update={"details": details, "solve_time_s": time.perf_counter() - t0})
    return plan.model_copy(update={"solver": solver})


def _halda_plan_of(cluster: Cluster, model: ModelProfile, workload: Workload, ring: list[str],
                   w: tuple[int, ...], n: tuple[int, ...], sel: Selection) -> Plan:  # fmt: skip
    L = model.arch.n_layer
    res = sel.result
    details = HaldaDetails(
        search="exact: every k, window, GPU layer count and device set (prima_sim.halda.search)",
        bound="disk" if res.load_s > res.chain_s else "ring",
        chain_s=res.chain_s,
        load_s=res.load_s,
        k_candidates=tuple(
            KCandidate(
                k=r.k,
                objective_s=r.objective_s,
                devices=tuple(r.ring),
                windows=tuple(r.w),
                gpu_layers=tuple(r.n),
            )
            for r in sel.per_k
        ),
        dynamic_programs=sum(r.dps for r in sel.per_k),
        searches=sel.searches,
        log=tuple(sel.log),
    )
    return Plan(
        model_id=model.id, model_fingerprint=model_fingerprint(model), n_layers=L, cluster_name=cluster.name,
        cluster_fingerprint=cluster.fingerprint(), k=res.k, n_ctx=workload.n_ctx, n_seq=workload.n_seq,
        devices=make_assignments(ring, w, n, L),
        dropped=tuple(Dropped(name=nm, reason=r) for nm, r in sel.dropped),
        scheduler="halda",
        solver=SolverInfo(status="optimal", objective_s=res.objective_s, solve_time_s=sel.solve_time_s,
                          details=details),
    )  # fmt: skip


def _published_plan(cluster: Cluster, model: ModelProfile, workload: Workload, o: PlanOptions) -> Plan:
    from prima_sim.halda.published import select_devices_published

    L = model.arch.n_layer
    sel = select_devices_published(cluster, model, workload, o.k, o.master_priority, o.allow_drop)
    res = sel.result
    sol = res.solution
    details = PublishedDetails(
        algorithm="prima.cpp's Halda as published: sets M1-M4, fixed-point iteration, one integer program per k "
                  "(HiGHS through PuLP), device selection",
        sets={name: s.value for name, s in res.sets.items()},
        forced_m4=tuple(sorted(res.forced_m4)),
        binding={d: tuple(b) for d, b in sol.binding.items()},
        coefficients_ms={
            c.name: {"a": c.a * 1e3, "b": c.b * 1e3, "xi": c.xi * 1e3, "alpha": c.alpha * 1e3,
                     "beta": c.beta * 1e3, "disk_GBps": c.disk_bps / 1e9}
            for c in res.coefs
        },
        iterations=res.iterations,
        ilp_solves=res.solves,
        selection_rounds=sel.rounds,
        log=tuple(res.log),
    )  # fmt: skip
    plan = Plan(
        model_id=model.id, model_fingerprint=model_fingerprint(model), n_layers=L,
        cluster_name=cluster.name, cluster_fingerprint=cluster.fingerprint(), k=sol.k, n_ctx=workload.n_ctx, n_seq=workload.n_seq,
        devices=make_assignments(res.ring, sol.w, sol.n, L),
        dropped=tuple(Dropped(name=n, reason=r) for n, r in sel.dropped),
        scheduler="prima",
        solver=SolverInfo(status=sol.status.lower(), objective_s=sol.objective_s, solve_time_s=sel.solve_time_s,
                          details=details),
    )  # fmt: skip
    return _finish(plan, cluster, model, workload, o.prefetch, stream=o.stream)


def manual_plan(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    windows: list[int],
    gpu_layers: list[int] | None = None,
    prefetch: bool = True,
    stream: bool = True,
) -> Plan:
    """A plan from explicit windows in ring order (prima.cpp's ``-lw``), without solving.

    Devices given a window of 0 are left out (the head may have 0: it then only embeds and runs the output
    head). Windows that do not divide the layer count leave a partial last round.

    Raises:
        InputError: the number of windows does not match the devices, a value is negative, the windows sum to
            more than the layers, or a device gets more GPU layers than its window or has no GPU.
    """
    ring = list(cluster.ring_order)
    L = model.arch.n_layer
    if len(windows) != len(ring):
        raise InputError("--windows", "", f"{len(windows)} windows given for {len(ring)} devices in ring order "
                         f"{', '.join(ring)}: give one per device")  # fmt: skip
    if any(x < 0 for x in windows) or sum(windows) == 0:
        raise InputError("--windows", "", f"windows must be >= 0 and not all zero, got {windows}")
    if sum(windows) > L:
        raise InputError("--windows", "", f"windows {','.join(map(str, windows))} sum to {sum(windows)} layers per "
                         f"round but {model.id} has {L} layers: make them sum to {L} (one round) or to a divisor of "
                         f"it for k rounds (a smaller sum leaves a partial last round)")  # fmt: skip
    gl = list(gpu_layers) if gpu_layers is not None else [0] * len(ring)
    if len(gl) != len(ring) or any(x < 0 for x in gl):
        raise InputError("--gpu-layers", "", f"give one non-negative value per device ({len(ring)}, ring order "
                         f"{', '.join(ring)}), got {gl}")  # fmt: skip
    for name, w, g in zip(ring, windows, gl, strict=True):
        if g > w:
            raise InputError("--gpu-layers", "", f"{name} is given {g} GPU layers but its window has {w} layers: "
                             "GPU layers are the last ones of each window, at most the window")  # fmt: skip
        if g > 0 and not cluster.device(name).has_gpu:
            raise InputError("--gpu-layers", "", f"{name} is given {g} GPU layers but its profile has no GPU")
    return _plan_from_windows(
        cluster, model, workload, ring, list(windows), gl, "manual", 0.0, prefetch, stream
    )


def _plan_from_windows(cluster: Cluster, model: ModelProfile, workload: Workload, ring: list[str], w: list[int],
                       n: list[int], scheduler: str, solve_time: float, prefetch: bool = True,
                       stream: bool = True) -> Plan:  # fmt: skip
    L = model.arch.n_layer
    keep = [i for i, wi in enumerate(w) if wi > 0 or i == 0]
    dropped = tuple(
        Dropped(name=ring[i], reason=f"{scheduler} gave it no layers")
        for i in range(len(ring))
        if i not in keep
    )
    names = [ring[i] for i in keep]
    ws = [w[i] for i in keep]
    ns = [min(n[i], w[i]) for i in keep]
    plan = Plan(
        model_id=model.id, model_fingerprint=model_fingerprint(model), n_layers=L, cluster_name=cluster.name,
        cluster_fingerprint=cluster.fingerprint(), k=rounds_for(ws, L), n_ctx=workload.n_ctx, n_seq=workload.n_seq,
        devices=make_assignments(names, ws, ns, L), dropped=dropped, scheduler=scheduler,
        solver=SolverInfo(status="heuristic" if scheduler != "manual" else "manual", solve_time_s=solve_time),
    )  # fmt: skip
    return _finish(plan, cluster, model, workload, prefetch, stream=stream)


register(
    Scheduler(
        "halda",
        "the exact search of the cost model over every k, window, GPU count and device set",
        True,
        _halda_plan,
    )
)
register(
    Scheduler(
        "prima",
        "prima.cpp's Halda as published (sets M1-M4, one integer program per k)",
        True,
        _published_plan,
    )
)
for _name, _what in (("memsched", "exo: layers in proportion to usable memory"),
                     ("perfsched", "Galaxy: layers in proportion to compute, then OOM migration"),
                     ("even", "distributed-llama: equal windows"),
                     ("freemem", "llama.cpp RPC: layers in proportion to free memory")):  # fmt: skip
    register(Scheduler(_name, _what, False, _baseline(_name)))


def plan_problems(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> list[str]:
    """Reasons a plan cannot run (pinned memory or VRAM exceeded); empty when it can."""
    return check_memory(plan, cluster, model, workload)
