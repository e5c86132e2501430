"""The profiler's small-batch measurements: the prefill micro-batches' efficiency (``cpu_batch_efficiency``) and
the rate of each further row of a small batch (``cpu_row_flops``), each turned from :mod:`compute`'s timings into
the profile's figures with a line for its ``sources``."""

from __future__ import annotations

from prima_sim.devices.profiler import compute
from prima_sim.ggml import Backend, Ggml, GgmlError
from prima_sim.units import fmt_flop_rate

BATCH_SIZES = (16, 128)
"""Prefill micro-batch sizes the profiler times (a short prompt; a long prompt's 128-token pieces)."""


def batch_efficiency(lib: Ggml, cpu: Backend, layer: compute.LayerShape, cpu_flops: dict[str, float],
                     sizes: tuple[int, ...], budget_s: float, sources: dict[str, str]) -> dict[int, float]:  # fmt: skip
    """``cpu_batch_efficiency``: the layer's matrix products at each batch size, as a fraction of ``cpu_flops``
    of the layer's dominant weight type (what the cost model divides the roofline's compute time by)."""
    by_type: dict[str, int] = {}
    for t, k, n in layer:
        by_type[t] = by_type.get(t, 0) + lib.row_size(t, k) * n
    main = max(by_type, key=lambda t: by_type[t])
    rate = cpu_flops.get(main) or cpu_flops.get("f32")
    if not rate:
        return {}
    out: dict[int, float] = {}
    notes = []
    for n in sizes:
        try:
            r = compute.batch_flops(lib, cpu, layer, n, budget_s=budget_s)
        except GgmlError as exc:
            sources["cpu_batch_efficiency"] = f"not measured: {exc}"
            return {}
        out[n] = round(r.flops / rate, 4)
        notes.append(f"{n} tokens: {out[n]:.3f} ({r.describe()})")
    sources["cpu_batch_efficiency"] = (
        f"rate of the layer's matrix products at n tokens / cpu_flops.{main} ({fmt_flop_rate(rate)}): "
        + "; ".join(notes)
    )
    return out


def row_flops_by_type(lib: Ggml, cpu: Backend, groups: dict[str, compute.LayerShape], budget_s: float,
                      sources: dict[str, str]) -> dict[str, float]:  # fmt: skip
    """``cpu_row_flops``: per weight type, :func:`compute.row_flops` of its matrices (a type that fails is left
    out, and falls back to ``cpu_flops``; ``sources`` says why)."""
    out: dict[str, float] = {}
    notes = []
    for t, mats in groups.items():
        try:
            r = compute.row_flops(lib, cpu, mats, budget_s=budget_s)
        except GgmlError as exc:
            notes.append(f"{t}: not measured ({exc})")
            continue
        out[t] = r.flops
        notes.append(f"{t}: {fmt_flop_rate(r.flops)} ({r.describe()})")
    sources["cpu_row_flops"] = (
        "per weight type, the rate of each further row of a small batch (weights in cache): "
        + "; ".join(notes)
        if notes
        else "no quantized matrices to measure"
    )
    return out
