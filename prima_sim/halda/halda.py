"""Halda: the plan of lowest predicted TPOT for a cluster, with device selection, over every valid k.

:func:`select_devices` runs the exact search of :mod:`prima_sim.halda.search` over every k that divides the
model's layers, every window and GPU layer count, and (device selection) every set of devices that keeps
the head. The objective is the cost model's TPOT (:func:`prima_sim.halda.costmodel.predict`), memory and
paging included, so the plan Halda returns is the best its own model knows; the planner then checks it
against the baselines and a local search (:mod:`prima_sim.halda.planner`).

Above :data:`LARGE_CLUSTER` devices the search with device selection (quadratic in the devices) runs on
rings made of the head and the best-ranked others (:func:`_preselect`), as the previous implementation did.
prima.cpp's published algorithm (sets M1-M4, one integer program per k) is kept in
:mod:`prima_sim.halda.published` as the ``prima`` scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.halda.search import KResult, search
from prima_sim.units import fmt_bytes
from prima_sim.workload import Workload

LARGE_CLUSTER = 16
"""Above this many devices, device selection starts from a ranked pre-selection (:func:`_preselect`)."""
PREFIX_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
"""Ring sizes (besides the head) the large-cluster pre-selection tries."""


def valid_ks(n_layer: int, n_devices: int, k_user: int | None = None) -> list[int]:
    """Rounds Halda may use: divisors k of L whose window total W = L/k gives every device a layer."""
    if k_user is not None:
        return [k_user]
    return [k for k in range(1, n_layer + 1) if n_layer % k == 0 and n_layer // k >= n_devices]


@dataclass
class Selection:
    """Outcome of Halda: the best plan found, the best plan of every k searched, devices left out (with
    reasons), and what the search cost."""

    result: KResult
    per_k: list[KResult]
    dropped: list[tuple[str, str]]
    solve_time_s: float
    searches: int = 1
    log: list[str] = field(default_factory=list)


def select_devices(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    k_user: int | None = None,
    allow_drop: bool = True,
    prefetch: bool = True,
    costs: dict[str, DeviceCosts] | None = None,
    stream: bool = True,
) -> Selection:
    """Halda with device selection: the plan of lowest predicted TPOT.

    With ``allow_drop=False`` every device keeps at least one layer. ``prefetch`` says whether devices will
    prefetch their next window (the executor's default), which decides how reads cost time; ``stream`` whether a
    k = 1 device whose window exceeds its room streams it (drop-behind, the executor's default). ``costs`` may
    carry cost models already built for the cluster's devices (reused, and filled in).

    Raises:
        InfeasiblePlanError: no assignment fits, with the binding resource and the shortfall.
    """
    t0 = time.perf_counter()
    L = model.arch.n_layer
    ring = list(cluster.ring_order)
    if k_user is not None and (k_user <= 0 or L % k_user):
        raise InfeasiblePlanError(
            f"k={k_user} does not divide the model's {L} layers; valid k: "
            f"{', '.join(str(k) for k in range(1, L + 1) if L % k == 0)}",
            resource="layers",
        )
    costs = {} if costs is None else costs
    for name in ring:
        if name not in costs:
            costs[name] = DeviceCosts(cluster.device(name), model, workload)
    dropped: list[tuple[str, str]] = []
    log: list[str] = []
    searches = 1
    if allow_drop and len(ring) > LARGE_CLUSTER:
        ring, pre, searches = _preselect(cluster, ring, model, workload, k_user, prefetch, costs, stream)
        dropped += pre
        log.append(f"large cluster: searched rings of the head and the best-ranked devices; kept {len(ring)}")
    elif not allow_drop and len(ring) > L:
        raise InfeasiblePlanError(f"{len(ring)} devices cannot each get one of the model's {L} layers; allow "
                                  "device selection (drop --no-drop)", resource="layers")  # fmt: skip
    ks = valid_ks(L, 1 if allow_drop else len(ring), k_user)
    best, per_k = search(cluster, ring, model, workload, ks, prefetch, allow_drop, costs, stream)
    if best is None:
        raise _diagnose(cluster, ring, model, workload, k_user, allow_drop)
    by_k = {r.k: r for r in per_k}
    for name in best.dropped:
        alt = min((r for r in per_k if name in r.ring), key=lambda r: r.objective_s, default=None)
        why = (f"the fastest plan with it predicts {alt.objective_s * 1e3:.1f} ms per token (k={alt.k}) against "
               f"{best.objective_s * 1e3:.1f} ms without it" if alt is not None else
               "no plan that keeps it is faster than the plan without it")  # fmt: skip
        dropped.append((name, why))
    log.append(
        "best plan per k: " + ", ".join(f"k={k} {by_k[k].objective_s * 1e3:.1f} ms" for k in sorted(by_k))
    )
    return Selection(best, per_k, dropped, time.perf_counter() - t0, searches, log)


def _preselect(
    cluster: Cluster,
    ring: list[str],
    model: ModelProfile,
    workload: Workload,
    k_user: int | None,
    prefetch: bool,
    costs: dict[str, DeviceCosts],
    stream: bool = True,
) -> tuple[list[str], list[tuple[str, str]], int]:
    """Large-cluster path: rank devices, search rings made of the head and the best n others, keep the best.

    Devices are ranked by their cost per layer when holding a full share in memory (the faster of CPU and
    GPU), ties broken by memory. Each ring of :data:`PREFIX_SIZES` is searched without device selection
    (linear in the devices); the best ring is then searched again with selection.
    """
    L = model.arch.n_layer
    head, others = ring[0], ring[1:]

    def score(name: str) -> tuple[float, float]:
        c = costs[name]
        return (min(c.mean_cpu_layer_s, c.mean_gpu_layer_s), -c.memory.ram_budget_bytes - c.memory.vram_bytes)

    ranked = sorted(others, key=score)
    best: tuple[float, list[str]] | None = None
    searches = 0
    for n in PREFIX_SIZES:
        if n > len(ranked) or n + 1 > L:
            break
        keep = set(ranked[:n])
        trial_ring = [head] + [nm for nm in others if nm in keep]  # keep the cluster's ring order
        res, _ = search(cluster, trial_ring, model, workload, valid_ks(L, len(trial_ring), k_user), prefetch,
                        False, costs, stream)  # fmt: skip
        searches += 1
        if res is not None and (best is None or res.objective_s < best[0]):
            best = (res.objective_s, trial_ring)
    if best is None:  # nothing smaller works: the head and the fastest devices that fit the layer count
        keep_ring = [head, *ranked[: min(LARGE_CLUSTER, L) - 1]]
        return keep_ring, [(nm, f"large cluster: ranked below the {len(keep_ring) - 1} fastest devices")
                           for nm in others if nm not in keep_ring], searches  # fmt: skip
    kept = best[1]
    return kept, [(nm, f"large cluster: ranked below the {len(kept) - 1} fastest devices, whose ring has the lowest "
                       f"predicted TPOT ({best[0] * 1e3:.1f} ms)") for nm in others if nm not in kept], searches  # fmt: skip


def _diagnose(cluster: Cluster, ring: list[str], model: ModelProfile, workload: Workload, k_user: int | None,
              allow_drop: bool) -> InfeasiblePlanError:  # fmt: skip
    """Explain why no assignment exists: the binding resource and the shortfall."""
    L = model.arch.n_layer
    costs = [DeviceCosts(cluster.device(n), model, workload) for n in ring]
    kv_total = sum(costs[0].layer_kv_bytes)
    buffers = sum(c.compute_buffer_bytes() for c in costs)
    pinnable = sum(c.memory.pinned_budget_bytes for c in costs)
    vram = sum(max(0, c.memory.vram_bytes - c.memory.gpu_reserve_bytes) for c in costs)
    need = kv_total + buffers
    if need > pinnable + vram:
        return InfeasiblePlanError(
            f"the KV cache for a context of {workload.n_ctx} tokens"
            + (f" x {workload.n_seq} sequences" if workload.n_seq > 1 else "")
            + f" ({fmt_bytes(kv_total)}) plus compute buffers "
            f"({fmt_bytes(buffers)}) cannot fit in the RAM+swap+VRAM of all devices ({fmt_bytes(pinnable + vram)}): "
            f"short by {fmt_bytes(need - pinnable - vram)}; lower --ctx"
            + (" or --parallel" if workload.n_seq > 1 else "")
            + " or add memory",
            resource="RAM+VRAM of all devices",
            shortfall_bytes=int(need - pinnable - vram),
        )
    if k_user is not None and L // k_user < (1 if allow_drop else len(ring)):
        return InfeasiblePlanError(
            f"k={k_user} leaves a window total of {L // k_user} layers for {len(ring)} devices; every device needs"
            " at least one layer per round: choose a smaller k",
            resource="layers",
        )
    head = costs[0]
    need_head = head.compute_buffer_bytes(with_logits=True) + head.max_layer_kv_bytes
    return InfeasiblePlanError(
        f"no assignment satisfies every device's pinned-memory and VRAM limits; the head {ring[0]} needs at least "
        f"{fmt_bytes(need_head)} of pinned RAM for one layer's KV cache and its buffers and has "
        f"{fmt_bytes(head.memory.pinned_budget_bytes)}; lower --ctx or add memory",
        resource=f"RAM of {ring[0]}",
        shortfall_bytes=int(max(0, need_head - head.memory.pinned_budget_bytes)),
    )
