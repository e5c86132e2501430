"""Local searches around a plan by ``predict()``: :func:`polish` (a GPU layer more or less, or a layer moved, where
Halda's search restricts GPU counts to candidates) and :func:`prefer_headroom` (among plans that tie, the one whose
fullest device keeps more of its page cache free). Used by :mod:`prima_sim.halda.planner`."""

from __future__ import annotations

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import DeviceCosts, check_memory, memory_use, predict, with_streaming
from prima_sim.plan import Plan, make_assignments
from prima_sim.workload import Workload

POLISH_MAX_EVALUATIONS = 200
"""Bound on the predictions the local search around Halda's plan may make."""


def polish(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, prefetch: bool = True,
           costs: dict[str, DeviceCosts] | None = None, max_evaluations: int = POLISH_MAX_EVALUATIONS,
           layer_moves: bool = False, stream: bool = True) -> tuple[Plan, int]:  # fmt: skip
    """Local search around a plan by ``predict()``: one GPU layer more or less on one device (and, with
    ``layer_moves``, one layer moved between two devices), first improvement, until nothing improves or
    ``max_evaluations`` predictions are spent. Returns the best plan (``plan`` itself if nothing improved)
    and the number of predictions made."""
    assert plan.prediction is not None
    best, best_t = plan, plan.prediction.tpot_s
    evals = 0
    L = plan.n_layers
    improved = True
    while improved and evals < max_evaluations:
        improved = False
        names = [d.name for d in best.devices]
        w = [d.window for d in best.devices]
        n = [d.gpu_layers for d in best.devices]
        moves: list[tuple[list[int], list[int]]] = []
        for i, name in enumerate(names):
            if cluster.device(name).gpu is None:
                continue
            for dn in (1, -1):
                if 0 <= n[i] + dn <= w[i]:
                    moves.append((w, [*n[:i], n[i] + dn, *n[i + 1 :]]))
        if layer_moves:
            for i in range(len(names)):
                for j in range(len(names)):
                    if i != j and w[i] > 1:
                        w2 = list(w)
                        w2[i] -= 1
                        w2[j] += 1
                        moves.append((w2, [min(a, b) for a, b in zip(n, w2, strict=True)]))
        for w2, n2 in moves:
            if evals >= max_evaluations:
                break
            if L % sum(w2):
                continue
            trial = best.model_copy(
                update={"devices": make_assignments(names, w2, n2, L), "prediction": None}
            )
            trial = with_streaming(trial, cluster, model, workload, costs, stream)
            p = predict(trial, cluster, model, workload, prefetch, costs)
            evals += 1
            if p.tpot_s < best_t * (1 - 1e-9):
                best, best_t = trial.model_copy(update={"prediction": p}), p.tpot_s
                improved = True
                break
    return best, evals


NEAR_FIT_FRACTION = 0.10
"""A device whose weights leave less than this fraction of its page-cache room free is near Linux's fit cliff, where
a few MiB the model does not see (the runtime's own file pages, allocator slack) turn "fits" into re-reading much
of the window every token (measured: fits-in-memory and weak-device, docs/pagecache.md)."""
HEADROOM_MAX_EVALUATIONS = 48


def _margins(plan: Plan, costs: dict[str, DeviceCosts]) -> list[tuple[float, float]]:
    """Per device in ring order: (page-cache room - mapped weight bytes, the room); a negative margin pages."""
    uses = (memory_use(costs[a.name], a, i == 0) for i, a in enumerate(plan.devices))
    return [(u.room - u.mapped_ram, u.room) for u in uses]


def headroom(plan: Plan, costs: dict[str, DeviceCosts]) -> float:
    """The smallest page-cache margin of the plan's devices: room - mapped weight bytes (negative: it pages)."""
    return min(m for m, _ in _margins(plan, costs))


def prefer_headroom(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, prefetch: bool,
                    costs: dict[str, DeviceCosts],
                    max_evaluations: int = HEADROOM_MAX_EVALUATIONS, stream: bool = True) -> tuple[Plan, int]:  # fmt: skip
    """Among the plans that tie with ``plan`` on predicted TPOT, one whose fullest device keeps more of its page
    cache free: while a device that fits is within :data:`NEAR_FIT_FRACTION` of its room, move one layer from it
    to another device if the prediction stays the same (in a ring of equal devices every split of the layers
    costs the same, and the search's tie-break may fill one device to the brim) and the smallest margin grows.
    Returns the plan and the number of layers moved (0: ``plan`` itself)."""
    assert plan.prediction is not None
    best, best_t, best_h = plan, plan.prediction.tpot_s, headroom(plan, costs)
    L, moved, evals = plan.n_layers, 0, 0
    while evals < max_evaluations:
        names = [d.name for d in best.devices]
        rooms = _margins(best, costs)
        margins = [m for m, _ in rooms]
        tight = min(range(len(names)), key=lambda i: margins[i])
        if margins[tight] < 0 or margins[tight] >= NEAR_FIT_FRACTION * rooms[tight][1]:
            break  # it pages anyway (the prediction knows), or it is not near the cliff
        w = [d.window for d in best.devices]
        n = [d.gpu_layers for d in best.devices]
        if w[tight] <= 1:
            break
        step = None
        for j in sorted(range(len(names)), key=lambda j: -margins[j]):
            if j == tight or evals >= max_evaluations:
                continue
            w2 = list(w)
            w2[tight] -= 1
            w2[j] += 1
            if L % sum(w2):
                continue
            n2 = [min(a, b) for a, b in zip(n, w2, strict=True)]
            trial = best.model_copy(
                update={"devices": make_assignments(names, w2, n2, L), "prediction": None}
            )
            if check_memory(trial, cluster, model, workload, costs):
                continue
            trial = with_streaming(trial, cluster, model, workload, costs, stream)
            p = predict(trial, cluster, model, workload, prefetch, costs)
            evals += 1
            h = headroom(trial, costs)
            if p.tpot_s <= best_t * (1 + 1e-9) and h > best_h + (1 << 20):
                step = trial.model_copy(update={"prediction": p}), h
                break
        if step is None:
            break
        best, best_h = step
        moved += 1
    return best, moved
