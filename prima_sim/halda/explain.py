"""Why each device got what it got: readable reasons from the solver's sets, coefficients and tight rows."""

from __future__ import annotations

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import DeviceCosts, Workload, disk_bytes_per_step, memory_use
from prima_sim.plan import Plan
from prima_sim.units import fmt_bandwidth, fmt_bytes

_SET_MEANING = {
    "M1": "macOS without Metal, overloaded: weights it cannot hold are re-read at random-read bandwidth",
    "M2": "macOS with Metal, over its working set: all its weights reload every token",
    "M3": "overloaded: the part of its share that does not fit is re-read from disk every token",
    "M4": "its share fits in memory: no disk reads while decoding",
}
_ROW_MEANING = {
    "eq9_ram_fits": "its memory is full (RAM row, Eq. 9: one more layer would not fit)",
    "eq9_ram_overloaded": "the overloaded regime's lower bound (Eq. 9) holds it at the smallest overloaded window",
    "eq10_vram": "its VRAM is full (Eq. 10)",
    "eq7_gpu_within_window": "all of its window runs on the GPU (Eq. 7: n <= w)",
    "eq7_window_at_least_1": "it is held at the minimum window of 1 layer (Eq. 7): each layer costs it more than elsewhere",
    "kv_pinned": "its RAM cannot pin the KV cache of more CPU layers",
    "gpu_not_worth_it": "its GPU has room but GPU layers cost more than CPU layers there",
}


def explain(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> dict[str, list[str]]:
    """Per device (and per dropped device), sentences saying which cost or constraint shaped its share."""
    out: dict[str, list[str]] = {}
    details = plan.solver.details or {}
    sets = details.get("sets", {})
    binding = details.get("binding", {})
    coefs = details.get("coefficients_ms", {})
    pred = {t.name: t for t in (plan.prediction.per_device if plan.prediction else ())}
    for a in plan.devices:
        d = cluster.device(a.name)
        costs = DeviceCosts(d, model, workload)
        use = memory_use(costs, a, a.name == plan.head)
        lines = [
            f"window {a.window} x {plan.k} round(s) = {a.n_layers} layers per token, {a.n_gpu_layers_total} on its GPU"
        ]
        if a.name in sets:
            lines.append(f"set {sets[a.name]}: {_SET_MEANING[sets[a.name]]}")
        if a.name in coefs:
            c = coefs[a.name]
            lines.append(
                f"cost per layer per round: a = {c['a']:.3f} ms (CPU layer {c['alpha']:.3f} ms"
                + (f", disk {c['a'] - c['alpha']:.3f} ms" if c["a"] - c["alpha"] > 1e-9 else "")
                + (f"), GPU saves {-c['b']:.3f} ms per GPU layer" if d.gpu is not None else ")")
                + f"; fixed per round {c['xi']:.3f} ms (decode call + hop)"
            )
        for row in binding.get(a.name, []):
            if row in ("eq10_vram", "eq7_gpu_within_window") and d.gpu is None:
                continue  # n = 0 is trivially tight on a device without a GPU
            if row in _ROW_MEANING:
                lines.append(_ROW_MEANING[row])
        disk = disk_bytes_per_step(costs, use)
        lines.append(
            f"memory: {fmt_bytes(use.ram_total)} wanted in RAM (weights {fmt_bytes(use.weights_cpu)}, KV "
            f"{fmt_bytes(use.kv_cpu)}, buffers {fmt_bytes(use.buffers_cpu)}) against a budget of "
            f"{fmt_bytes(costs.ram_budget_bytes)}"
            + (f"; re-reads {fmt_bytes(disk)} per token at {fmt_bandwidth(costs.disk_bps)}" if disk > 0 else "")
        )
        if a.name in pred:
            t = pred[a.name]
            lines.append(
                f"predicted per token: compute {t.compute_s * 1e3:.1f} ms, memory {t.memory_s * 1e3:.1f} ms, disk "
                f"{t.disk_s * 1e3:.1f} ms, network {t.comm_s * 1e3:.1f} ms, overhead {t.overhead_s * 1e3:.1f} ms"
            )
        out[a.name] = lines
    for dr in plan.dropped:
        out[dr.name] = [f"dropped: {dr.reason}"]
    return out
