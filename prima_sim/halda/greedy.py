"""An exact combinatorial solver for Halda's program at one k, used to bound the k loop and search sets.

For fixed k and sets, Halda's integer program (Eqs 6-10) separates by device: device m takes c_m CPU layers
and g_m GPU layers per window at linear costs k*a_m and k*(a_m + b_m), under box bounds on c_m, g_m and
w_m = c_m + g_m, and the devices are coupled only by sum_m w_m = W. The rows form a laminar family (total,
per device, per arc), so the constraint matrix is totally unimodular and the program is a min-cost flow on
a two-level tree: filling each device's cheaper arc first makes its cost convex in w_m, and handing out
the remaining layers in order of marginal cost is optimal (greedy on a convex separable allocation).

This gives the program's exact optimum in microseconds. Halda uses it to skip the HiGHS solves of k values
that cannot win and to compare set assignments; HiGHS (through PuLP) remains the solver of record for the
plan it returns, and tests check that both agree on the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prima_sim.halda.ilp import _EPS, Coefficients, objective


@dataclass(frozen=True)
class _Box:
    lo_c: int
    hi_c: int
    gpu: int
    lo_w: int
    hi_w: int


def _box(c: Coefficients, W: int) -> _Box | None:
    lo_c, hi_c = 0, W
    lo_w, hi_w = 1, W
    rhs_lo = math.ceil(c.ram_rhs_layers - _EPS)
    rhs_hi = math.floor(c.ram_rhs_layers + _EPS)
    if c.ram_row == ">=":
        if c.ram_counts_gpu:
            lo_c = max(lo_c, rhs_lo)
        else:
            lo_w = max(lo_w, rhs_lo)
    elif c.ram_row == "<=":
        if c.ram_counts_gpu:
            hi_c = min(hi_c, rhs_hi)
        else:
            hi_w = min(hi_w, rhs_hi)
    if math.isfinite(c.pinned_max_cpu_layers):
        hi_c = min(hi_c, math.floor(c.pinned_max_cpu_layers + _EPS))
    gpu = max(0, min(W, math.floor(c.gpu_max_layers + _EPS)))
    lo_w = max(lo_w, lo_c)
    hi_w = min(hi_w, hi_c + gpu)
    if lo_c > hi_c or lo_w > hi_w:
        return None
    return _Box(lo_c, hi_c, gpu, lo_w, hi_w)


def solve_k_greedy(
    coefs: list[Coefficients], k: int, W: int, master_priority: float
) -> tuple[float, tuple[int, ...], tuple[int, ...]] | None:
    """Exact optimum (objective with the master priority, w, n) of the program for one k, or None."""
    boxes = []
    for c in coefs:
        b = _box(c, W)
        if b is None:
            return None
        boxes.append(b)
    if sum(b.lo_w for b in boxes) > W or sum(b.hi_w for b in boxes) < W:
        return None
    cpu = [b.lo_c for b in boxes]
    gpu = [0] * len(coefs)
    segments: list[tuple[float, int, str, int]] = []  # (marginal cost, device, arc, capacity)
    for i, (c, b) in enumerate(zip(coefs, boxes, strict=True)):
        p = k * c.a / (master_priority if i == 0 else 1.0)
        q = p + k * c.b
        arcs = sorted([(p, "c", b.hi_c - b.lo_c), (q, "g", b.gpu)], key=lambda x: (x[0], x[1]))
        need = b.lo_w - b.lo_c  # layers this device must take beyond its forced CPU layers
        for cost, arc, cap in arcs:
            take = min(need, cap)
            if arc == "c":
                cpu[i] += take
            else:
                gpu[i] += take
            need -= take
            if cap - take > 0:
                segments.append((cost, i, arc, cap - take))
        assert need == 0  # guaranteed by lo_w <= hi_c + gpu
    remaining = W - sum(cpu) - sum(gpu)
    room = [b.hi_w - (cpu[i] + gpu[i]) for i, b in enumerate(boxes)]
    for _cost, i, arc, cap in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        if remaining == 0:
            break
        take = min(cap, room[i], remaining)
        if take <= 0:
            continue
        if arc == "c":
            cpu[i] += take
        else:
            gpu[i] += take
        room[i] -= take
        remaining -= take
    if remaining:
        return None
    w = tuple(ci + gi for ci, gi in zip(cpu, gpu, strict=True))
    n = tuple(gpu)
    return objective(coefs, k, w, n, master_priority), w, n
