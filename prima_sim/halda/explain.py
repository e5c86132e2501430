"""Why each device got what it got: readable reasons from the cost model's breakdown of a plan.

:func:`explain` speaks in plain terms (what a device holds, what it re-reads from disk and whether that read
is hidden by prefetch, what limits the token's time); :data:`GLOSSARY` explains the few words it needs.
"""

from __future__ import annotations

from prima_sim.devices.behaviour import NEAR_FIT_MARGIN, fit_limit
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.halda.costmodel import DeviceCosts, memory_use
from prima_sim.plan import Plan
from prima_sim.solver import HaldaDetails, PublishedDetails
from prima_sim.units import fmt_bandwidth, fmt_bytes
from prima_sim.workload import Workload

GLOSSARY = (
    "window: the consecutive layers a device runs each time the hidden state comes round; k: rounds of the ring "
    "per token (each device runs k windows); room: page cache left for weights once KV cache and buffers are "
    "placed; re-read: weight bytes read from disk again every token because they do not fit; prefetch: a device "
    "asks the OS to load its next window while the others compute, hiding the read."
)
"""One line that explains the words of :func:`explain`."""


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def explain(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> dict[str, list[str]]:
    """Sentences per device (and per dropped device), plus ``"overall"``: what limits the plan's TPOT, how
    the other k compared, and whether Halda fell back to another plan."""
    out: dict[str, list[str]] = {}
    pred = plan.prediction
    per = {t.name: t for t in (pred.per_device if pred else ())}
    details = plan.solver.details
    overall: list[str] = []
    if pred is not None:
        if pred.disk_wait_s > 0:
            overall.append(f"TPOT {_ms(pred.tpot_s)} is set by the {pred.bound}: its reads per token take longer than "
                           f"the rest of the ring's work, so the ring waits {_ms(pred.disk_wait_s)} per token for it "
                           "beyond its compute and network time")  # fmt: skip
        else:
            overall.append(f"TPOT {_ms(pred.tpot_s)} is set by the ring: the sum of every device's compute, disk "
                           f"stalls and hops, plus the head's output head ({_ms(pred.head_s)})")  # fmt: skip
    if isinstance(details, HaldaDetails):
        if details.k_candidates:
            parts = [
                f"k={c.k}: {_ms(c.objective_s)}" for c in sorted(details.k_candidates, key=lambda c: c.k)
            ]
            overall.append("best plan found for each k: " + ", ".join(parts))
        fb = details.fallback
        if fb:
            overall.append(f"WARNING: the {fb.source} plan predicts {_ms(fb.tpot_s)}, faster than the exact search's "
                           f"{_ms(fb.search_tpot_s)}, and was returned instead: a bug in the search, please report it")  # fmt: skip
        pol = details.polish
        if pol:
            overall.append(f"a local search over GPU layer counts (devices whose best count the exact search only "
                           f"approximates) took the plan from {_ms(pol.before_s)} to {_ms(pol.tpot_s)}")  # fmt: skip
        room = details.headroom
        if room:
            overall.append(f"{room.layers_moved} layer(s) moved at the same predicted TPOT so that every device keeps "
                           f"{room.min_headroom_bytes / 2**20:.0f} MiB of page cache free (was "
                           f"{room.before_bytes / 2**20:.0f} MiB): near a full cache Linux re-reads")  # fmt: skip
        overall += [n for n in details.notes if n.startswith("warning")]
    elif isinstance(details, PublishedDetails):
        overall.append(
            "prima.cpp's published algorithm: sets " + ", ".join(f"{k}={v}" for k, v in details.sets.items())
        )
    if overall:
        out["overall"] = overall
    for a in plan.devices:
        c = DeviceCosts(cluster.device(a.name), model, workload)
        mem = c.memory
        use = memory_use(c, a, a.name == plan.head)
        role = "head, " if a.name == plan.head else ""
        gpu = cluster.device(a.name).gpu
        lines = [f"{role}window {a.window} x {plan.k} round(s) = {a.n_layers} layers per token"
                 + (f", {a.n_gpu_layers_total} of them on its {gpu.kind} GPU" if gpu is not None else "")]  # fmt: skip
        lines.append(f"memory: pins {fmt_bytes(use.pinned_ram)} (KV cache and buffers); its weights take "
                     f"{fmt_bytes(use.mapped_ram)} of page cache and the room left is {fmt_bytes(use.room)}"
                     + (f"; its GPU holds {fmt_bytes(use.vram_need)} of {fmt_bytes(mem.vram_bytes)}" if use.vram_need else ""))  # fmt: skip
        t = per.get(a.name)
        if t is not None and use.mapped_ram > float(fit_limit(use.room, mem.kernel_lru)) + 0.5:
            how = "sequential" if mem.readahead else "random"
            fits = (f"its weights fill its room to within {NEAR_FIT_MARGIN:.0%}, where Linux already re-reads"
                    if use.mapped_ram <= use.room + 0.5 else "it does not fit")  # fmt: skip
            lines.append(f"{fits}: re-reads {fmt_bytes(t.read_bytes)} per token "
                         f"({t.read_bytes / use.mapped_ram:.0%} of its weights) at {fmt_bandwidth(mem.fault_bps)} "
                         f"({how} reads), {_ms(t.read_s)} of disk")  # fmt: skip
            if t.prefetch:
                lines.append("prefetch hides its reads behind the other devices' work (several windows per token)"
                             + (f"; its windows are too large for its room, so the advice evicts part of what it "
                                f"read and page faults read it again: {_ms(t.disk_s)} of stalls" if t.disk_s > 0 else ""))  # fmt: skip
            else:
                lines.append(f"with one window per token it cannot prefetch: page faults stall its compute for "
                             f"{_ms(t.disk_s)} per token (readahead overlaps the rest)")  # fmt: skip
        elif use.mapped_ram:
            lines.append("its weights fit: nothing is read from disk while decoding")
        if t is not None:
            lines.append(f"per token: compute {_ms(t.compute_s)}, memory traffic {_ms(t.memory_s)}, disk stalls "
                         f"{_ms(t.disk_s)}, network {_ms(t.comm_s)}, call overhead {_ms(t.overhead_s)}")  # fmt: skip
        out[a.name] = lines
    for dr in plan.dropped:
        out[dr.name] = [f"dropped: {dr.reason}"]
    return out
