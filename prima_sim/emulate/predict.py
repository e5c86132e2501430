"""The emulation's predictions: a plan per scheduler (Halda and the baselines, manual windows, one device alone),
the simulation of each, and each predicted again with the streaming rates measured while the plans ran."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate.calibrate import Calibrator, executor_overhead, with_executor_overhead
from prima_sim.emulate.records import PlanRun
from prima_sim.emulate.scenario import Scenario
from prima_sim.errors import InfeasiblePlanError, InputError, PrimaSimError
from prima_sim.halda.costmodel import Workload


def make_plans(sc: Scenario, cluster: Cluster, model: ModelProfile, wl: Workload, out: Path, *,
               schedulers: Sequence[str] | None = None, raw_profiles: Mapping[str, DeviceProfile] | None = None,
               overheads: tuple[int, int] = (0, 0)) -> list[PlanRun]:  # fmt: skip
    """A plan per scheduler (``schedulers`` or the scenario's), per manual window list and per single device,
    saved under ``out / "plans"``; one that cannot be made carries its error instead.

    A single device that is not the scenario's head is the head of its plan: its profile (``raw_profiles``,
    before the executor's footprint) gets the head's footprint (``overheads``: runtime, vocabulary bytes)."""
    from prima_sim.halda.planner import make_plan, manual_plan

    raw_profiles = raw_profiles or {}
    plans: list[PlanRun] = []
    for s in schedulers or sc.run.schedulers:
        try:
            kw: dict[str, Any] = {"k": sc.run.k, "allow_drop": sc.run.allow_drop} if s == "halda" else {}
            plans.append(PlanRun(s, make_plan(cluster, model, wl, s, **kw), cluster))
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanRun(s, None, cluster, error=f"plan: {exc}"))
    for m in sc.run.manual:
        try:
            plans.append(PlanRun(m.name, manual_plan(cluster, model, wl, list(m.windows)), cluster))
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanRun(m.name, None, cluster, error=f"plan: {exc}"))
    for name in sc.run.single:
        dev = cluster.device(name)
        if name != sc.head_name and name in raw_profiles and overheads[0]:  # it is the head now
            ov = executor_overhead(*overheads, is_head=True)
            dev = with_executor_overhead(raw_profiles[name], sc.device(name).memory, ov, True)
        one = cluster.model_copy(update={"devices": (dev,), "head": name, "links": ()})
        try:
            plan = manual_plan(one, model, wl, [model.arch.n_layer])
            plans.append(
                PlanRun(f"single-{name}", plan.model_copy(update={"scheduler": f"single-{name}"}), one)
            )
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanRun(f"single-{name}", None, one, error=f"plan: {exc}"))
    pdir = out / "plans"
    for pr in plans:
        if pr.plan is not None:
            pr.plan.save(pdir / f"{pr.label}.json")
    return plans


def simulate_plan(pr: PlanRun, sc: Scenario, model: ModelProfile, wl: Workload, out: Path) -> None:
    """Simulate ``pr``'s plan (warm, the scenario's prefetch), record the results in ``pr`` and write them under
    ``out / "sim" / label``; a simulation that fails leaves its error in ``pr.error``."""
    from prima_sim.sim import SimConfig, simulate

    assert pr.plan is not None and pr.cluster is not None
    try:
        res = simulate(pr.plan, pr.cluster, model, wl, SimConfig(prefetch=sc.run.prefetch, warm=True))
    except PrimaSimError as exc:
        pr.error = f"simulate: {exc}"
        return
    pr.sim_tpot_s, pr.sim_ttft_s = res.tpot_s, res.ttft_s
    pr.sim_per_device = dict(res.stats["per_device"])
    pr.sim_spans, pr.sim_steps = res.spans, res.steps
    pr.sim_memory_pressure = res.memory_pressure
    pr.sim_disk_bytes_per_token = sum(
        float(st.get("sim_disk_bytes_per_decode_token", 0.0)) for st in res.device_stats.values()
    )
    res.write(out / "sim" / pr.label)


def predict_at_run(pr: PlanRun, sc: Scenario, model: ModelProfile, wl: Workload, cal: Calibrator,
                   rates: Mapping[str, tuple[float, float]]) -> None:  # fmt: skip
    """Predict ``pr``'s plan again (simulation and cost model) with streaming rates measured while the plans
    ran (the median of every probe taken around the runs of the scenario), and record them. This host's
    memory bandwidth is bimodal (about 8.5 and 5.3 GB/s for one thread, switching within seconds as a
    neighbour on the physical machine comes and goes, in proportions that change over minutes): a profile
    taken a minute earlier saw another mix than the runs. Probes spread over the run phase sample the same
    mix as the runs."""
    from prima_sim.halda.costmodel import predict
    from prima_sim.sim import SimConfig, simulate

    assert pr.plan is not None and pr.cluster is not None
    devs = []
    for d in pr.cluster.devices:
        k = cal.key_of.get(d.name)
        if k is not None and k in rates:
            lay, outr = rates[k]
            devs.append(
                cal.with_rates(d, lay, outr, f"{lay / 1e9:.2f} GB/s: llama.cpp, measured around the run")
            )
            pr.run_rates.setdefault(d.name, []).append(lay)
        else:
            devs.append(d)
    cl = pr.cluster.model_copy(update={"devices": tuple(devs)})
    try:
        res = simulate(pr.plan, cl, model, wl, SimConfig(prefetch=sc.run.prefetch, warm=True))
    except PrimaSimError:
        return
    pr.rep_sim_tpot_s.append(res.tpot_s)
    pr.rep_sim_ttft_s.append(res.ttft_s)
    a = predict(pr.plan, cl, model, wl)
    pr.rep_analytic_tpot_s.append(a.tpot_s)
    pr.rep_analytic_ttft_s.append(a.ttft_s)
