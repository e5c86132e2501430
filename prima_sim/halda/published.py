"""prima.cpp's Halda as published: set assignment, one integer program per k, calibration, device selection.

This is the ``prima`` scheduler: what prima.cpp's own planner would choose, with this project's per-layer
cost coefficients (roofline, hops, buffers; docs/halda.md) and HiGHS solving each program through PuLP. The
project's Halda (:mod:`prima_sim.halda.halda`) replaced it because its fixed-point iteration over the sets
can stop in a poor regime (issue 10: 13.9 s on paper-hetero2 where 0.69 s was possible); it stays as a
baseline that shows how prima.cpp would plan a cluster.

:func:`halda_published` follows prima.cpp's ``assign_layers_to_device`` (common.cpp L860-1590; paper Alg. 1):
initialise windows in proportion to memory, assign every device to a set M1-M4, solve one integer program
per valid k and keep the best, force slow-disk devices into M4 while GPU memory is left unused
(calibration), and repeat until the sets no longer change. :func:`select_devices_published` wraps it in
prima.cpp's
device selection (``assign_layers_and_select_devices``): devices left with a window of one layer are
dropped and the rest re-planned; the head always stays. Unlike prima.cpp we keep a drop only if it does
not make the predicted TPOT worse (prima.cpp drops unconditionally; see docs/halda.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.halda.greedy import solve_k_greedy
from prima_sim.halda.halda import _diagnose, valid_ks
from prima_sim.halda.ilp import (
    MASTER_PRIORITY,
    Coefficients,
    DeviceSet,
    KSolution,
    assign_set,
    device_coefficients,
    overloaded_set,
    solve_k,
)
from prima_sim.workload import Workload

MAX_ITERATIONS = 64
"""Guard on the outer loop; prima.cpp's loop ends in O(M) iterations, this only stops oscillation."""
LARGE_CLUSTER = 16
"""Above this many devices, selection starts from a ranked pre-selection (:func:`_preselect`): prima.cpp's
rule (drop every device left with one layer) is made for a handful of devices and overshoots at scale."""
PREFIX_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
"""Ring sizes (besides the head) the large-cluster pre-selection tries."""


@dataclass
class HaldaResult:
    """Outcome of one :func:`halda` run on a fixed ring."""

    ring: list[str]
    solution: KSolution
    sets: dict[str, DeviceSet]
    coefs: list[Coefficients]
    forced_m4: set[str]
    iterations: int
    solves: int
    log: list[str] = field(default_factory=list)


def initial_windows(costs: list[DeviceCosts], n_layer: int) -> list[int]:
    """prima.cpp's start point: windows in proportion to memory budgets, each at least 1, summing to L."""
    budget = [max(c.memory.ram_budget_bytes + c.memory.vram_bytes, 1) for c in costs]
    total = sum(budget)
    w = [max(1, round(b / total * n_layer)) for b in budget]
    while sum(w) > n_layer:  # fix the rounding by taking from the largest
        w[w.index(max(w))] -= 1
    if sum(w) < n_layer:
        w[budget.index(max(budget))] += n_layer - sum(w)
    return w


class _Programs:
    """The per-k programs of one ring: cached coefficients, exact greedy optima, HiGHS solves of record."""

    def __init__(
        self,
        cluster: Cluster,
        ring: list[str],
        model: ModelProfile,
        ks: list[int],
        costs: dict[str, DeviceCosts],
        master_priority: float,
    ) -> None:
        self.cluster, self.ring, self.model, self.ks = cluster, ring, model, ks
        self.costs, self.priority = costs, master_priority
        self._coef: dict[tuple[str, DeviceSet, int], Coefficients] = {}
        self.highs_solves = 0
        self.greedy_solves = 0

    def coefs(self, sets: dict[str, DeviceSet], k: int) -> list[Coefficients]:
        out = []
        for idx, name in enumerate(self.ring):
            key = (name, sets[name], k)
            if key not in self._coef:
                self._coef[key] = device_coefficients(self.cluster, self.ring, idx, self.model, k, sets[name],
                                                      self.costs[name])  # fmt: skip
            out.append(self._coef[key])
        return out

    def bound(self, sets: dict[str, DeviceSet]) -> list[tuple[float, int]]:
        """Exact optimum (with the master priority) of every feasible k, in k order."""
        out = []
        L = self.model.arch.n_layer
        for k in self.ks:
            self.greedy_solves += 1
            g = solve_k_greedy(self.coefs(sets, k), k, L // k, self.priority)
            if g is not None:
                out.append((g[0], k))
        return out

    def solve(self, sets: dict[str, DeviceSet]) -> tuple[KSolution, list[Coefficients]] | None:
        """The best k for these sets: HiGHS solves only the k values whose exact optimum can win."""
        bounds = self.bound(sets)
        if not bounds:
            return None
        best_value = min(v for v, _ in bounds)
        best: tuple[KSolution, list[Coefficients]] | None = None
        L = self.model.arch.n_layer
        for value, k in bounds:
            if value > best_value + 1e-9 * abs(best_value) + 1e-12:
                continue  # cannot beat the best k: skip its HiGHS solve
            coefs = self.coefs(sets, k)
            sol = solve_k(coefs, k, L // k, self.priority)
            self.highs_solves += 1
            if sol is not None and (best is None or sol.objective_s < best[0].objective_s - 1e-12):
                best = (sol, coefs)
        return best


def halda_published(
    cluster: Cluster,
    ring: list[str],
    model: ModelProfile,
    workload: Workload,
    k_user: int | None = None,
    master_priority: float = MASTER_PRIORITY,
    costs: dict[str, DeviceCosts] | None = None,
    refine: bool = True,
) -> HaldaResult | None:
    """Run Halda on a fixed ring (head first). None when no k admits a feasible assignment.

    ``costs`` may carry :class:`DeviceCosts` already built for these devices (their caches are reused).
    With ``refine`` (default), the published loop is followed by a local search over the devices' sets
    (:func:`_refine_sets`), which can only lower the objective.
    """
    L = model.arch.n_layer
    if costs is None:
        costs = {}
    for name in ring:
        if name not in costs:
            costs[name] = DeviceCosts(cluster.device(name), model, workload)
    ks = [k for k in valid_ks(L, len(ring), k_user) if L // k >= len(ring)]
    if not ks:
        return None
    progs = _Programs(cluster, ring, model, ks, costs, master_priority)
    w = initial_windows([costs[n] for n in ring], L)
    n = [w_i if costs[name].device.gpu is not None else 0 for name, w_i in zip(ring, w, strict=True)]
    forced: set[str] = set()
    overloaded: set[str] = set()
    prev_sets: dict[str, DeviceSet] | None = None
    final: HaldaResult | None = None
    rollback: HaldaResult | None = None
    best_seen: HaldaResult | None = None
    log: list[str] = []
    for it in range(1, MAX_ITERATIONS + 1):
        W = sum(w)
        k_cur = max(1, L // W)
        sets = {name: assign_set(costs[name], w_i, n_i, k_cur, idx == 0, name in forced, name in overloaded)
                for idx, (name, w_i, n_i) in enumerate(zip(ring, w, n, strict=True))}  # fmt: skip
        if sets == prev_sets:
            break
        prev_sets = sets
        best = progs.solve(sets)
        log.append(f"iteration {it}: sets {_fmt_sets(sets)}; best k={best[0].k} objective "
                   f"{best[0].objective_s * 1e3:.2f} ms" if best else f"iteration {it}: sets {_fmt_sets(sets)}; infeasible")  # fmt: skip
        if best is None:
            # Beyond prima.cpp (which gives up here): the sets say every device fits, but together they
            # cannot hold the model. Let the device that pages most cheaply (fastest disk) overload, and retry.
            cands = [nm for nm in ring if sets[nm] is DeviceSet.M4 and nm not in forced and nm not in overloaded
                     and costs[nm].memory.pages_weights]  # fmt: skip
            if cands and final is None:
                pick = max(cands, key=lambda nm: costs[nm].disk_bps)
                overloaded.add(pick)
                log.append(f"no k is feasible with these sets: let {pick} (fastest disk) page weights")
                continue
            final = rollback
            break
        sol, coefs = best
        result = HaldaResult(ring, sol, sets, coefs, set(forced), it, 0, [])
        rollback = result
        if best_seen is None or sol.objective_s < best_seen.solution.objective_s - 1e-12:
            best_seen = result
        # calibration (prima.cpp): while GPU memory is left unused and some device still pages weights on
        # its CPU, force the slowest-disk overloaded device into M4 and solve again. Only a GPU whose layers
        # are cheaper than CPU layers counts as unused (an Apple GPU on the same memory bus may not be).
        gpu_free = any(c.gpu_max_layers >= 1 and c.beta < 0 and ni < math.floor(c.gpu_max_layers + 1e-9)
                       for c, ni in zip(coefs, sol.n, strict=True))  # fmt: skip
        weak = any(wi == 1 and ni == 0 for wi, ni in zip(sol.w, sol.n, strict=True))
        gpu_over = any(
            costs[c.name].device.gpu is not None and wi > ni
            for c, wi, ni in zip(coefs, sol.w, sol.n, strict=True)
        )
        cpu_over = any(costs[c.name].device.gpu is None and sets[c.name] is not DeviceSet.M4 for c in coefs)
        candidates = [c for c in coefs if sets[c.name] is not DeviceSet.M4 and c.name not in forced]
        if not weak and gpu_free and (gpu_over or cpu_over) and candidates:
            slowest = min(candidates, key=lambda c: c.disk_bps)
            forced.add(slowest.name)
            log.append(f"calibration: GPU memory unused while {slowest.name} pages weights; force it into M4")
            continue
        w, n = list(sol.w), list(sol.n)
        if (
            final is not None
            and final.solution.w == sol.w
            and final.solution.n == sol.n
            and final.solution.k == sol.k
        ):
            break
        final = result
    # prima.cpp returns the last feasible iterate; every iterate is a valid plan for its sets, so we return
    # the one with the lowest objective (the same one whenever the loop ends normally)
    if (
        final is not None
        and best_seen is not None
        and best_seen.solution.objective_s < final.solution.objective_s
    ):
        log.append(f"returning the best iterate (iteration {best_seen.iterations}) rather than the last")
        final = best_seen
    if final is not None and refine:
        final = _refine_sets(final, progs, costs, log)
    if final is not None:
        final.log = log
        final.solves = progs.highs_solves
    return final


def _refine_sets(
    res: HaldaResult, progs: _Programs, costs: dict[str, DeviceCosts], log: list[str]
) -> HaldaResult:
    """Local search over set assignments after the published loop (beyond prima.cpp).

    A set's RAM row pins its device in one regime (an overloaded device must stay overloaded), so the
    fixed-point iteration can stop at a poor assignment. Flip one device at a time between M4 and its
    overloaded set (slow disks stay in M4), keep a flip when the exact optimum over k improves, repeat until
    no flip helps, then solve the final program with HiGHS. The objective can only go down.
    """
    sets = dict(res.sets)
    current = min(v for v, _ in progs.bound(sets))
    improved = True
    while improved:
        improved = False
        for name in progs.ring:
            c = costs[name]
            if not c.memory.pages_weights:
                continue
            alt = DeviceSet.M4 if sets[name] is not DeviceSet.M4 else overloaded_set(c)
            trial = {**sets, name: alt}
            bounds = progs.bound(trial)
            if bounds and (value := min(v for v, _ in bounds)) < current - 1e-9 * abs(current) - 1e-12:
                log.append(f"set search: {name} {sets[name].value} -> {alt.value} lowers the objective to "
                           f"{value * 1e3:.2f} ms")  # fmt: skip
                sets, current, improved = trial, value, True
    if sets == res.sets:
        return res
    best = progs.solve(sets)
    if best is None or best[0].objective_s >= res.solution.objective_s:
        return res
    sol, coefs = best
    return HaldaResult(res.ring, sol, sets, coefs, res.forced_m4, res.iterations, 0, [])


def _fmt_sets(sets: dict[str, DeviceSet]) -> str:
    groups: dict[str, list[str]] = {}
    for name, s in sets.items():
        groups.setdefault(s.value, []).append(name)
    return " ".join(f"{k}={{{','.join(v)}}}" for k, v in sorted(groups.items()))


@dataclass
class PublishedSelection:
    """Outcome of device selection: the final Halda result and the devices left out, with reasons."""

    result: HaldaResult
    dropped: list[tuple[str, str]]
    solve_time_s: float
    rounds: int


def select_devices_published(
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    k_user: int | None = None,
    master_priority: float = MASTER_PRIORITY,
    allow_drop: bool = True,
) -> PublishedSelection:
    """Halda with device selection (prima.cpp's ``assign_layers_and_select_devices``).

    With ``allow_drop=False`` every device keeps at least one layer (Halda without device selection).

    Raises:
        InfeasiblePlanError: no assignment fits, with the binding resource and the shortfall in bytes.
    """
    t0 = time.perf_counter()
    L = model.arch.n_layer
    ring = list(cluster.ring_order)
    dropped: list[tuple[str, str]] = []
    if k_user is not None and L % k_user:
        raise InfeasiblePlanError(
            f"k={k_user} does not divide the model's {L} layers; valid k: "
            f"{', '.join(str(k) for k in range(1, L + 1) if L % k == 0)}",
            resource="layers",
        )
    costs = {name: DeviceCosts(cluster.device(name), model, workload) for name in ring}
    if allow_drop and len(ring) > LARGE_CLUSTER:
        ring, pre = _preselect(cluster, ring, model, workload, k_user, master_priority, costs)
        dropped += pre
    elif len(ring) > L:  # more devices than layers: keep the head and the fastest per layer
        ranked = sorted(ring[1:], key=lambda nm: min(costs[nm].mean_cpu_layer_s, costs[nm].mean_gpu_layer_s))
        keep = set(ranked[: L - 1])
        dropped += [(nm, f"more devices than the model's {L} layers; slower per layer than those kept")
                    for nm in ring[1:] if nm not in keep]  # fmt: skip
        ring = [ring[0]] + [nm for nm in ring[1:] if nm in keep]
    res = halda_published(cluster, ring, model, workload, k_user, master_priority, costs)
    if res is None:
        raise _diagnose(cluster, ring, model, workload, k_user, allow_drop)
    rounds = 1
    while allow_drop:
        drop = [
            name for name, wi in zip(res.ring, res.solution.w, strict=True) if wi <= 1 and name != res.ring[0]
        ]
        if not drop:
            break
        trial_ring = [name for name in res.ring if name not in drop]
        trial = halda_published(cluster, trial_ring, model, workload, k_user, master_priority, costs)
        rounds += 1
        if trial is None or trial.solution.objective_s > res.solution.objective_s * (1 + 1e-9):
            res.log.append(f"selection: dropping {', '.join(drop)} would not lower the predicted TPOT; kept")
            break
        for name in drop:
            dropped.append((name, f"Halda gave it a window of 1 layer; without it the predicted TPOT is "
                                  f"{trial.solution.objective_s * 1e3:.1f} ms instead of {res.solution.objective_s * 1e3:.1f} ms"))  # fmt: skip
        res = trial
    return PublishedSelection(res, dropped, time.perf_counter() - t0, rounds)


def _preselect(
    cluster: Cluster,
    ring: list[str],
    model: ModelProfile,
    workload: Workload,
    k_user: int | None,
    master_priority: float,
    costs: dict[str, DeviceCosts],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Large-cluster path: rank devices, try rings made of the head and the best n others, keep the best.

    Devices are ranked by their cost per layer when holding a full share in memory (the faster of CPU and
    GPU), ties broken by memory. Only a few ring sizes are tried (:data:`PREFIX_SIZES`), each one a full
    Halda run, so the cost stays near that of a 16-device cluster whatever the cluster's size; the normal
    device selection then continues from the best ring. Clusters of at most :data:`LARGE_CLUSTER` devices
    never take this path, so their answers are those of the exact algorithm.
    """
    L = model.arch.n_layer
    head, others = ring[0], ring[1:]

    def score(name: str) -> tuple[float, float]:
        c = costs[name]
        return (min(c.mean_cpu_layer_s, c.mean_gpu_layer_s), -c.ram_budget_bytes)

    ranked = sorted(others, key=score)
    best: tuple[float, list[str]] | None = None
    for n in PREFIX_SIZES:
        if n > len(ranked) or n + 1 > L:
            break
        keep = set(ranked[:n])
        trial_ring = [head] + [nm for nm in others if nm in keep]  # keep the cluster's ring order
        res = halda_published(cluster, trial_ring, model, workload, k_user, master_priority, costs)
        if res is not None and (best is None or res.solution.objective_s < best[0]):
            best = (res.solution.objective_s, trial_ring)
    if best is None:  # nothing smaller works: fall back to every device that fits the layer count
        keep_ring = [head, *ranked[: L - 1]]
        return keep_ring, [(nm, f"more devices than the model's {L} layers; slower per layer than those kept")
                           for nm in others if nm not in keep_ring]  # fmt: skip
    kept = best[1]
    return kept, [(nm, f"large cluster: ranked below the {len(kept) - 1} fastest devices, whose ring has the lowest "
                       f"predicted TPOT ({best[0] * 1e3:.1f} ms)") for nm in others if nm not in kept]  # fmt: skip
