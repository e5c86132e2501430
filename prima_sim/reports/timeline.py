"""A simulation's timelines as PNG: the first decode tokens (``gantt.png``) and the whole run (``gantt_full.png``)."""

from __future__ import annotations

from pathlib import Path

from prima_sim.reports.plots import gantt
from prima_sim.sim.result import SimResult


def draw_simulation(res: SimResult, out_dir: str | Path) -> dict[str, Path]:
    """Draw ``gantt.png`` (decode tokens 1-3, or the prefill of a run without decode) and ``gantt_full.png`` into
    ``out_dir``; returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{res.plan.scheduler} plan of {res.model_id} on {res.cluster_name} (simulated)"
    decode = [st for st in res.steps if st[1] == "decode"]
    if decode:
        last = decode[min(2, len(decode) - 1)]
        first = gantt(res.spans, res.devices, out / "gantt.png", f"{title}: decode tokens {decode[0][0]}-{last[0]}",
                      t_range=(decode[0][3], last[4]))  # fmt: skip
    else:
        first = gantt(res.spans, res.devices, out / "gantt.png", f"{title}: prefill")
    return {
        "gantt": first,
        "gantt_full": gantt(res.spans, res.devices, out / "gantt_full.png", f"{title}: whole run"),
    }
