"""Halda's per-device coefficients, set assignment and the integer program for one k.

This follows the prima.cpp paper (v2 §3.2, App. A.3, Eqs 6-10) and its code (``assign_layers_to_device``),
with the deliberate differences recorded in docs/halda.md. For a fixed number of rounds k (window total
W = L/k) it solves

    min  k * sum_m (a_m w_m + b_m n_m) + k * sum_m xi_m + kappa                        (6)
    s.t. 1 <= w_m <= W,  0 <= n_m <= w_m                                              (7)
         sum_m w_m = W                                                                (8)
         per-device RAM rows, direction chosen by the device's set M1-M4               (9)
         n_m <= W * z_gpu_m                                                           (10)
         k * (w_m - n_m) * kv_layer + c_cpu_m <= RAM + swap   (ours: KV cache is pinned)

where w_m is device m's window, n_m its GPU layers per window, and the coefficients (seconds) come from
:mod:`prima_sim.halda.costmodel`. Sets: M1 = macOS without Metal and overloaded (weights re-read at random
bandwidth), M2 = macOS with Metal and over its working set (everything reloads), M3 = Linux/Android and
overloaded, M4 = fits (or forced: slow disk). A set's RAM row keeps the device in the regime its linear
disk term assumes.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import pulp

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import ACTIVATION_BYTES_PER_ELEMENT, DeviceCosts, head_extra_bytes, hop_time
from prima_sim.workload import Workload

MASTER_PRIORITY = 1.01
"""prima.cpp divides the head's window cost by this: a slight preference to keep layers on the head."""
SOLVER_TIME_LIMIT_S = 10.0
"""Time limit of one HiGHS solve; Halda's programs solve in milliseconds, this only guards pathologies."""
_EPS = 1e-9


class DeviceSet(StrEnum):
    """Halda's device sets (paper §3.2, Cases 1-4)."""

    M1 = "M1"  # macOS, no Metal, overloaded: weights page in at random-read bandwidth
    M2 = "M2"  # macOS with Metal, over the working set: all weights reload every token
    M3 = "M3"  # Linux/Android/Windows, overloaded: overflow re-read at sequential bandwidth
    M4 = "M4"  # fits in memory (or forced there: slow disk)


@dataclass(frozen=True)
class Coefficients:
    """Halda's numbers for one device, one k and one set (seconds, bytes)."""

    name: str
    set: DeviceSet
    a: float  # cost per window layer (w_m), per round
    b: float  # extra cost per GPU layer (n_m), per round
    xi: float  # fixed cost per round: decode call overhead + hop to the next device + RAM<->VRAM copies
    kappa: float  # constant per token (head work, disk offsets of overloaded sets)
    ram_row: str  # ">=" (must be overloaded), "<=" (must fit) or "" (no row)
    ram_rhs_layers: float  # W * z_m: the RAM row's right-hand side, in layers of b'
    ram_counts_gpu: bool  # whether the RAM row is on w - n (CPU layers) rather than w
    gpu_max_layers: float  # W * z_gpu_m: GPU layers per window that fit in VRAM
    pinned_max_cpu_layers: float  # CPU layers per window whose KV cache fits in RAM + swap
    alpha: float
    beta: float
    disk_bps: float
    budget_bytes: float
    b_prime: float  # bytes per layer: weights + KV cache for n_ctx (mean layer)


def mean_layer_bytes(model: ModelProfile) -> float:
    """b: average weight bytes of one layer."""
    return model.mean_layer_bytes


def overloaded_set(costs: DeviceCosts) -> DeviceSet:
    """The set a device is in when its share does not fit: M2 (a Metal working set, reloaded whole), M1
    (faults at random-read bandwidth: macOS without Metal) or M3 (sequential faults: Linux/Android)."""
    mem = costs.memory
    if mem.whole_window_residency:
        return DeviceSet.M2
    return DeviceSet.M3 if mem.readahead else DeviceSet.M1


def assign_set(
    costs: DeviceCosts, w: int, n: int, k: int, is_head: bool, forced_m4: bool, force_overloaded: bool = False
) -> DeviceSet:
    """prima.cpp's ``assign_sets``: which regime a device is in for window w, GPU layers n and k rounds.

    ``forced_m4`` (calibration, or a slow disk) keeps it in M4; ``force_overloaded`` (our escape when every
    device fitting its memory admits no solution) puts it in its overloaded set.
    """
    if forced_m4 or not costs.memory.pages_weights:
        return DeviceSet.M4
    if force_overloaded:
        return overloaded_set(costs)
    b_prime = mean_layer_bytes(costs.model) + costs.kv_bytes_per_layer
    layers, layers_gpu = k * w, k * min(n, w)
    bio0 = head_extra_bytes(costs.model) if is_head else 0.0
    c_cpu, c_gpu = costs.buffers(k, is_head)
    budget = costs.ram_budget_bytes
    s = overloaded_set(costs)
    if s is DeviceSet.M1:
        return DeviceSet.M1 if layers * b_prime + bio0 + c_cpu > budget else DeviceSet.M4  # cond1
    if s is DeviceSet.M2:
        return DeviceSet.M2 if layers * b_prime + bio0 + c_cpu + c_gpu > budget else DeviceSet.M4  # cond2
    return DeviceSet.M3 if (layers - layers_gpu) * b_prime + bio0 + c_cpu > budget else DeviceSet.M4  # cond3


def coefficients(
    cluster: Cluster,
    ring: list[str],
    model: ModelProfile,
    workload: Workload,
    k: int,
    sets: dict[str, DeviceSet],
    costs: dict[str, DeviceCosts],
) -> list[Coefficients]:
    """The objective and constraint numbers of every device for k rounds and the given sets (§3.2)."""
    return [
        device_coefficients(cluster, ring, idx, model, k, sets[name], costs[name])
        for idx, name in enumerate(ring)
    ]


def device_coefficients(
    cluster: Cluster, ring: list[str], idx: int, model: ModelProfile, k: int, s: DeviceSet, c: DeviceCosts
) -> Coefficients:
    """Coefficients of the device at ring position ``idx`` (0 = head) for k rounds in set ``s``."""
    name = ring[idx]
    d = c.device
    mem = c.memory
    is_head = idx == 0
    b = mean_layer_bytes(model)
    kv = c.kv_bytes_per_layer
    b_prime = b + kv
    disk = c.disk_bps
    alpha = c.mean_cpu_layer_s
    beta = (c.mean_gpu_layer_s - c.mean_cpu_layer_s) if d.gpu is not None else 0.0
    # xi: one llama_decode call per window, the hop to the next device, RAM<->VRAM copies of a window
    nxt = ring[(idx + 1) % len(ring)]
    xi = d.decode_overhead_s + hop_time(cluster, name, nxt, model.arch.n_embd)
    if mem.host_copy_bps > 0:
        xi += 2 * ACTIVATION_BYTES_PER_ELEMENT * model.arch.n_embd / mem.host_copy_bps
    bio0 = head_extra_bytes(model) if is_head else 0.0
    c_cpu, c_gpu = c.buffers(k, is_head)
    budget = c.ram_budget_bytes
    # objective vectors by set (common.cpp L1193-1207)
    if s is DeviceSet.M1:
        a_m, b_m = alpha + b_prime / disk, 0.0
    elif s is DeviceSet.M2:
        a_m, b_m = alpha + b / disk, beta
    elif s is DeviceSet.M3:
        a_m, b_m = alpha + b_prime / disk, (beta - b_prime / disk) if d.gpu is not None else 0.0
    else:
        a_m, b_m = alpha, beta
    # kappa: constants of the overloaded sets (the negative offset that turns per-layer reloads into the
    # overflow), plus the head's output head, embedding row and (if overloaded) output weights from disk
    kappa = 0.0
    if s in (DeviceSet.M1, DeviceSet.M3):
        kappa += (c_cpu + bio0 - budget) / disk
    elif s is DeviceSet.M2:
        kappa += bio0 / disk
    if is_head:
        kappa += c.head_time().total_s + model.embedding_row_bytes / disk
    # RAM rows (common.cpp L1211-1250): z = (budget - b_cio) / (L b'), right-hand side W z in layers
    b_cio = bio0 + c_cpu + (c_gpu if mem.gpu_memory_is_ram else 0.0)
    rhs = (budget - b_cio) / (k * b_prime)  # = W * z_m
    if s in (DeviceSet.M1, DeviceSet.M2):
        row, counts_gpu = ">=", False
    elif s is DeviceSet.M3:
        row, counts_gpu = ">=", d.gpu is not None
    else:
        row, counts_gpu = "<=", d.gpu is not None and not mem.gpu_memory_is_ram
    # VRAM row (10): z_gpu = (free - c_gpu) / (L b') (minus the output head for a Metal head). Unlike RAM,
    # VRAM cannot overflow to disk: size it by the largest layer so no assignment of layers can OOM.
    if mem.has_gpu:
        vram = mem.ram_budget_bytes if mem.gpu_memory_is_ram else mem.vram_bytes
        free = vram - c_gpu - (bio0 if (mem.gpu_memory_is_ram and is_head) else 0.0)
        gpu_max = max(0.0, free / (k * c.largest_layer_bytes))
    else:
        gpu_max = 0.0
    pinned_budget = mem.pinned_budget_bytes - c_cpu
    kv_max = c.max_layer_kv_bytes
    pinned_max = pinned_budget / (k * kv_max) if kv_max > 0 else math.inf
    return Coefficients(
        name=name, set=s, a=a_m, b=b_m, xi=xi, kappa=kappa, ram_row=row, ram_rhs_layers=rhs,
        ram_counts_gpu=counts_gpu, gpu_max_layers=gpu_max, pinned_max_cpu_layers=pinned_max,
        alpha=alpha, beta=beta, disk_bps=disk, budget_bytes=budget, b_prime=b_prime,
    )  # fmt: skip


@dataclass(frozen=True)
class KSolution:
    """The optimum of the program for one k."""

    k: int
    w: tuple[int, ...]
    n: tuple[int, ...]
    objective_s: float  # k * sum(a w + b n) + k * sum(xi) + kappa, without the master priority
    status: str
    binding: dict[str, list[str]]  # per device, the names of constraints that are tight at the optimum


def build_problem(
    coefs: list[Coefficients], k: int, W: int, master_priority: float = MASTER_PRIORITY
) -> tuple[pulp.LpProblem, dict[str, pulp.LpVariable], dict[str, pulp.LpVariable]]:
    """The PuLP model of Eqs 6-10 for one k, with every variable and constraint named."""
    prob = pulp.LpProblem(f"halda_k{k}", pulp.LpMinimize)
    w = {
        c.name: prob.add_variable(f"w_{c.name}", lowBound=1, upBound=W, cat=pulp.LpInteger) for c in coefs
    }  # (7)
    n = {
        c.name: prob.add_variable(f"n_{c.name}", lowBound=0, upBound=W, cat=pulp.LpInteger) for c in coefs
    }  # (7)
    # (6) objective: k (a^T w + b^T n) + k sum(xi) + kappa; the head's window cost divided by the priority
    prob += (
        pulp.lpSum(k * (c.a / (master_priority if i == 0 else 1.0)) * w[c.name] + k * c.b * n[c.name]
                   for i, c in enumerate(coefs))
        + sum(k * c.xi + c.kappa for c in coefs)
    )  # fmt: skip
    prob += pulp.lpSum(w.values()) == W, "eq8_window_sum"  # (8): sum_m w_m = W = L / k
    for c in coefs:
        prob += n[c.name] - w[c.name] <= 0, f"eq7_gpu_within_window_{c.name}"  # (7): n_m <= w_m
        cpu_layers = w[c.name] - n[c.name] if c.ram_counts_gpu else w[c.name]
        if c.ram_row == ">=":  # (9) M1/M2/M3: the device really is overloaded, so its disk term holds
            prob += cpu_layers >= math.ceil(c.ram_rhs_layers - _EPS), f"eq9_ram_overloaded_{c.name}"
        elif c.ram_row == "<=":  # (9) M4: everything it holds fits in its memory budget
            prob += cpu_layers <= math.floor(c.ram_rhs_layers + _EPS), f"eq9_ram_fits_{c.name}"
        prob += n[c.name] <= math.floor(c.gpu_max_layers + _EPS), f"eq10_vram_{c.name}"  # (10)
        if math.isfinite(c.pinned_max_cpu_layers):  # ours: KV cache and buffers are pinned, never paged
            prob += w[c.name] - n[c.name] <= math.floor(c.pinned_max_cpu_layers + _EPS), f"kv_pinned_{c.name}"
    return prob, w, n


@contextlib.contextmanager
def quiet_solver() -> Iterator[None]:
    """Keep a solver's own printing off stdout and stderr, whatever its version.

    HiGHS prints a banner when a ``Highs`` object is constructed (highspy 1.16: "Running HiGHS ...",
    before any option can turn output off), and PuLP constructs one per solve. The banner is written by C
    code straight to file descriptors 1 and 2, so Python-level redirection cannot catch it: the descriptors
    themselves point at /dev/null while the solver runs. ``prima-sim ... --json`` then prints exactly one
    JSON object.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
            except OSError:
                continue
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def solve_k(
    coefs: list[Coefficients], k: int, W: int, master_priority: float = MASTER_PRIORITY
) -> KSolution | None:
    """Solve the program for one k with HiGHS (in-process, through PuLP). None when infeasible.

    The rows are a laminar family (the window sum, per-device rows on w, w - n and n), so the constraint
    matrix is totally unimodular; with the right-hand sides rounded to integers (exact for integer
    variables) every vertex of the LP relaxation is integral. HiGHS therefore solves the relaxation with
    the simplex method, which returns such a vertex, and the answer is checked: a fractional value (never
    seen) falls back to HiGHS's branch and bound. The LP costs about a tenth of the MIP machinery.
    """
    for c in coefs:  # fast infeasibility checks that HiGHS would also find, without calling it
        if c.ram_row == "<=" and math.floor(c.ram_rhs_layers + _EPS) < (0 if c.ram_counts_gpu else 1):
            return None
    prob, w, n = build_problem(coefs, k, W, master_priority)
    with quiet_solver():
        prob.solve(pulp.HiGHS(msg=False, mip=False, timeLimit=SOLVER_TIME_LIMIT_S, solver="simplex"))
    values = [v.value() for v in (*w.values(), *n.values())]
    if pulp.LpStatus[prob.status] == "Optimal" and any(
        abs(x - round(x)) > 1e-7 for x in values if x is not None
    ):
        with quiet_solver():
            prob.solve(
                pulp.HiGHS(msg=False, timeLimit=SOLVER_TIME_LIMIT_S)
            )  # integrality lost: branch and bound
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        return None
    wv = tuple(round(w[c.name].value()) for c in coefs)
    nv = tuple(round(n[c.name].value()) for c in coefs)
    obj = objective(coefs, k, wv, nv)
    binding: dict[str, list[str]] = {c.name: [] for c in coefs}
    for con in prob.constraints():
        cname = con.name or ""
        if abs(con.slack or 0.0) < 1e-6 and not cname.startswith("eq8"):
            dev = next((c.name for c in coefs if cname.endswith("_" + c.name)), None)
            if dev:
                binding[dev].append(cname[: -len(dev) - 1])
    for c, wi, ni in zip(coefs, wv, nv, strict=True):
        if wi == 1:
            binding[c.name].append("eq7_window_at_least_1")
        if ni == 0 and c.gpu_max_layers >= 1 and c.b >= 0:
            binding[c.name].append("gpu_not_worth_it")
    return KSolution(k, wv, nv, obj, status, binding)


def objective(
    coefs: list[Coefficients], k: int, w: tuple[int, ...], n: tuple[int, ...], master_priority: float = 1.0
) -> float:
    """Objective (6): Halda's predicted TPOT for this k and sets (``master_priority`` 1 = without the head
    preference; pass :data:`MASTER_PRIORITY` for the exact function the solver minimizes)."""
    return sum(k * (c.a / (master_priority if i == 0 else 1.0) * wi + c.b * ni) + k * c.xi + c.kappa
               for i, (c, wi, ni) in enumerate(zip(coefs, w, n, strict=True)))  # fmt: skip


def feasible(coefs: list[Coefficients], W: int, w: tuple[int, ...], n: tuple[int, ...]) -> bool:
    """Whether (w, n) satisfies every constraint of the program (used by tests and exhaustive search)."""
    if sum(w) != W:
        return False
    for c, wi, ni in zip(coefs, w, n, strict=True):
        if not (1 <= wi <= W and 0 <= ni <= wi):
            return False
        cpu = wi - ni if c.ram_counts_gpu else wi
        if c.ram_row == ">=" and cpu < math.ceil(c.ram_rhs_layers - _EPS):
            return False
        if c.ram_row == "<=" and cpu > math.floor(c.ram_rhs_layers + _EPS):
            return False
        if ni > math.floor(c.gpu_max_layers + _EPS):
            return False
        if math.isfinite(c.pinned_max_cpu_layers) and wi - ni > math.floor(c.pinned_max_cpu_layers + _EPS):
            return False
    return True
