"""Baseline schedulers: the layer splits peer systems use, as plans of the same type as Halda's.

Each baseline chooses one window per device (k = 1, pipeline order), then fills GPUs the way llama.cpp's
``-ngl`` fitting would: as many of a window's last layers as fit in free VRAM (after the backend reserve and
compute buffers), the rest on the CPU. The rules (shared/reference/peers.md):

* ``memsched`` - exo (v1 ``allocate_layers_proportionally``): layers in proportion to usable memory
  (available RAM, plus free VRAM on a discrete GPU), largest-remainder rounding, at least one layer each.
* ``perfsched`` - Galaxy-style, as the prima.cpp paper describes it: layers in proportion to compute
  throughput (GPU if present, else CPU, for the model's main weight type); then OOM migration: a device
  whose layers exceed its memory hands the excess to the devices with the most room left; what cannot be
  placed anywhere stays on the fastest device (paged from disk); GPU layers beyond VRAM fall back to its CPU.
* ``even`` - distributed-llama / mlx-lm: an equal split, the remainder to the first devices.
* ``freemem`` - llama.cpp RPC's default ``--tensor-split``: in proportion to each device's free memory
  (free VRAM for a GPU device, available RAM otherwise), layer i to the device whose cumulative share first
  exceeds i/L.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import DeviceCosts
from prima_sim.workload import Workload


def largest_remainder(weights: list[float], total: int, minimum: int = 1) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (Hamilton's method), each part at least ``minimum``."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"cannot give {n} parts at least {minimum} each out of {total}")
    s = sum(weights)
    shares = [w / s * total if s > 0 else total / n for w in weights]
    parts = [math.floor(x) for x in shares]
    order = sorted(range(n), key=lambda i: shares[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    for i in range(n):  # every part gets its minimum, taken from the largest
        while parts[i] < minimum:
            j = max(range(n), key=lambda t: parts[t])
            parts[j] -= 1
            parts[i] += 1
    return parts


def usable_memory(c: DeviceCosts) -> float:
    """Memory a device can hold weights in: its RAM budget, plus free VRAM on a discrete GPU."""
    return float(c.memory.ram_budget_bytes + c.memory.vram_bytes)


def effective_flops(c: DeviceCosts, model: ModelProfile) -> float:
    """Throughput for the model's dominant weight type: the GPU's if it has one, else the CPU's."""
    main = model.dominant_type
    return c.device.gpu_rate(main) if c.device.gpu is not None else c.device.cpu_rate(main)


def gpu_fit(c: DeviceCosts, window: int, k: int = 1) -> int:
    """GPU layers of a window that fit in free VRAM (llama.cpp-style ``-ngl`` fitting)."""
    mem = c.memory
    if not mem.has_gpu or window == 0:
        return 0
    if mem.gpu_memory_is_ram:  # unified memory: the GPU takes the whole window (llama.cpp's -ngl 99)
        return window
    b_prime = c.largest_layer_bytes
    free = mem.vram_bytes - c.buffers(k, False)[1]
    return max(0, min(window, int(free // (k * b_prime))))


def memsched(costs: list[DeviceCosts], L: int) -> list[int]:
    """exo: windows in proportion to usable memory."""
    return largest_remainder([usable_memory(c) for c in costs], L)


def even(costs: list[DeviceCosts], L: int) -> list[int]:
    """distributed-llama / mlx-lm: equal windows, remainder to the first devices."""
    m = len(costs)
    return [L // m + (1 if i < L % m else 0) for i in range(m)]


def freemem(costs: list[DeviceCosts], L: int) -> list[int]:
    """llama.cpp RPC default split: proportional to free memory, cumulative mapping of layers to devices."""
    free = [float(c.memory.vram_bytes or c.memory.ram_budget_bytes) for c in costs]
    total = sum(free)
    cum, acc = [], 0.0
    for f in free:
        acc += f / total
        cum.append(acc)
    w = [0] * len(costs)
    for i in range(L):
        j = min(bisect.bisect_right(cum, i / L), len(costs) - 1)
        w[j] += 1
    return w


def perfsched(costs: list[DeviceCosts], L: int) -> list[int]:
    """Galaxy-style: proportional to compute, then move layers off devices that would run out of memory."""
    model = costs[0].model
    w = largest_remainder([effective_flops(c, model) for c in costs], L)
    per_layer = model.mean_layer_bytes + costs[0].kv_bytes_per_layer
    capacity = [max(0, int((usable_memory(c) - c.compute_buffer_bytes()) // per_layer)) for c in costs]
    capacity[0] = max(
        0, int((usable_memory(costs[0]) - costs[0].compute_buffer_bytes() - model.output_bytes) // per_layer)
    )
    excess = 0
    for i in range(len(w)):  # OOM migration: take the layers that do not fit
        keep = max(1, min(w[i], capacity[i]))
        excess += w[i] - keep
        w[i] = keep
    while excess > 0:
        room = [capacity[i] - w[i] for i in range(len(w))]
        j = max(range(len(w)), key=lambda i: (room[i], effective_flops(costs[i], model)))
        if room[j] <= 0:  # nowhere left: the fastest device takes the rest and pages it from disk
            j = max(range(len(w)), key=lambda i: effective_flops(costs[i], model))
            w[j] += excess
            break
        moved = min(room[j], excess)
        w[j] += moved
        excess -= moved
    return w


BASELINES: dict[str, Callable[[list[DeviceCosts], int], list[int]]] = {
    "memsched": memsched,
    "perfsched": perfsched,
    "even": even,
    "freemem": freemem,
}
"""Baseline window rules by scheduler name."""


def baseline_windows(name: str, cluster: Cluster, ring: list[str], model: ModelProfile, workload: Workload,
                     shared: dict[str, DeviceCosts] | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
    """Windows and GPU layers (ring order, head first) chosen by baseline ``name`` (``shared``: cost models
    already built for these devices, reused)."""
    shared = {} if shared is None else shared
    costs = [shared.get(n) or DeviceCosts(cluster.device(n), model, workload) for n in ring]
    w = BASELINES[name](costs, model.arch.n_layer)
    return w, [gpu_fit(c, wi) for c, wi in zip(costs, w, strict=True)]
