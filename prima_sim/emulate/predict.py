"""The emulation's predictions: a plan per scheduler (Halda and the baselines, manual windows, one device alone),
the simulation of each, and each predicted again with the streaming rates measured while the plans ran."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate.calibrate import (
    NOT_MEASURED,
    Calibrator,
    Footprint,
    ProbeResult,
    executor_overhead,
    with_executor_overhead,
)
from prima_sim.emulate.records import PlanPrediction, RunPrediction
from prima_sim.emulate.scenario import Scenario
from prima_sim.errors import InfeasiblePlanError, InputError, PrimaSimError
from prima_sim.halda.costmodel import Workload
from prima_sim.reports.emulation import SINGLE_PREFIX, STOCK_PREFIX


def make_plans(sc: Scenario, cluster: Cluster, model: ModelProfile, wl: Workload, out: Path, *,
               schedulers: Sequence[str] | None = None, raw_profiles: Mapping[str, DeviceProfile] | None = None,
               overheads: Footprint = NOT_MEASURED) -> list[PlanPrediction]:  # fmt: skip
    """A plan per scheduler (``schedulers`` or the scenario's), per manual window list and per single device,
    saved under ``out / "plans"``; one that cannot be made carries its error instead.

    A single device that is not the scenario's head is the head of its plan: its profile (``raw_profiles``,
    before the executor's footprint) gets the head's footprint (``overheads``)."""
    from prima_sim.halda.planner import make_plan, manual_plan

    raw_profiles = raw_profiles or {}
    plans: list[PlanPrediction] = []
    for s in schedulers or sc.run.schedulers:
        try:
            kw: dict[str, Any] = {"k": sc.run.k, "allow_drop": sc.run.allow_drop} if s == "halda" else {}
            plans.append(PlanPrediction(s, make_plan(cluster, model, wl, s, **kw), cluster))
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanPrediction(s, None, cluster, error=f"plan: {exc}"))
    for m in sc.run.manual:
        try:
            plans.append(PlanPrediction(m.name, manual_plan(cluster, model, wl, list(m.windows)), cluster))
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanPrediction(m.name, None, cluster, error=f"plan: {exc}"))
    for name in sc.run.single:
        dev = cluster.device(name)
        if name != sc.head_name and name in raw_profiles and overheads.head:  # it is the head now
            ov = executor_overhead(overheads, is_head=True)
            dev = with_executor_overhead(raw_profiles[name], sc.device(name).memory, ov, True)
            dev = dev.model_copy(update={"disk_throttle_slice_s": cluster.device(name).disk_throttle_slice_s})
        one = cluster.alone(dev)
        try:
            plan = manual_plan(one, model, wl, [model.arch.n_layer])
            plans.append(
                PlanPrediction(
                    f"{SINGLE_PREFIX}{name}",
                    plan.model_copy(update={"scheduler": f"{SINGLE_PREFIX}{name}"}),
                    one,
                )
            )
        except (InfeasiblePlanError, InputError) as exc:
            plans.append(PlanPrediction(f"{SINGLE_PREFIX}{name}", None, one, error=f"plan: {exc}"))
    pdir = out / "plans"
    for pr in plans:
        if pr.plan is not None:
            pr.plan.save(pdir / f"{pr.label}.json")
    return plans


def simulate_plan(
    pr: PlanPrediction, sc: Scenario, model: ModelProfile, wl: Workload, out: Path
) -> PlanPrediction:
    """``pr`` with the simulation of its plan (warm, the scenario's prefetch), whose results are also written
    under ``out / "sim" / label``; if the simulation fails, ``pr`` with the error."""
    from prima_sim.sim import SimConfig, simulate

    assert pr.plan is not None and pr.cluster is not None
    try:
        res = simulate(pr.plan, pr.cluster, model, wl, SimConfig(prefetch=sc.run.prefetch, warm=True))
    except PrimaSimError as exc:
        return dataclasses.replace(pr, error=f"simulate: {exc}")
    res.write(out / "sim" / pr.label)
    return dataclasses.replace(
        pr,
        sim_tpot_s=res.tpot_s,
        sim_ttft_s=res.ttft_s,
        sim_per_device=dict(res.stats["per_device"]),
        sim_spans=tuple(res.spans),
        sim_steps=tuple(res.steps),
        sim_memory_pressure=dict(res.memory_pressure),
        sim_disk_bytes_per_token=sum(
            float(st.get("sim_disk_bytes_per_decode_token", 0.0)) for st in res.device_stats.values()
        ),
    )


def predict_at_run(pr: PlanPrediction, sc: Scenario, model: ModelProfile, wl: Workload, cal: Calibrator,
                   rates: Mapping[str, ProbeResult]) -> RunPrediction:  # fmt: skip
    """Predict ``pr``'s plan again (simulation and cost model) with streaming rates (and prefill times) measured
    while the plans ran (the median of every probe taken around the runs of the scenario). This host's
    memory bandwidth is bimodal (about 8.5 and 5.3 GB/s for one thread, switching within seconds as a
    neighbour on the physical machine comes and goes, in proportions that change over minutes), and its compute
    rate (a prompt's) drifts by ~10% over minutes: a profile taken a minute earlier saw another mix than the
    runs. Probes spread over the run phase sample the same mix as the runs."""
    from prima_sim.halda.costmodel import predict
    from prima_sim.sim import SimConfig, simulate

    assert pr.plan is not None and pr.cluster is not None
    devs = []
    used: dict[str, float] = {}
    for d in pr.cluster.devices:
        k = cal.key_of.get(d.name)
        if k is not None and k in rates:
            lay, outr, pre = rates[k]
            cd = cal.with_rates(d, lay, outr, f"{lay / 1e9:.2f} GB/s: llama.cpp, measured around the run")
            devs.append(cal.with_prefill(cd, model, pre, "llama.cpp's prefill, measured around the run"))
            used[d.name] = lay
        else:
            devs.append(d)
    cl = pr.cluster.model_copy(update={"devices": tuple(devs)})
    # the same windows on the devices as they ran: the plan is stamped for the adjusted cluster (otherwise the
    # simulator's contract check refuses a plan made on other profiles, and this prediction was never made)
    plan = pr.plan.model_copy(
        update={"cluster_fingerprint": (cl.without_gpus() if pr.plan.cpu_only else cl).fingerprint()}
    )
    try:
        res = simulate(plan, cl, model, wl, SimConfig(prefetch=sc.run.prefetch, warm=True))
    except PrimaSimError:
        return RunPrediction(rates=used)
    a = predict(plan, cl, model, wl)
    return RunPrediction(used, res.tpot_s, res.ttft_s, a.tpot_s, a.ttft_s)


def stock_twin(
    pr: PlanPrediction, sc: Scenario, model: ModelProfile, wl: Workload, out: Path
) -> PlanPrediction:
    """The one-device baseline as the paper measures it, beside prima-sim's own one-device executor: stock
    llama.cpp (one process over the original GGUF) on the device of a ``single-<device>`` plan, predicted as that
    plan with its window left to the page cache (stock llama.cpp does not stream: ``Plan.without_streaming``)."""
    from prima_sim.halda.costmodel import predict

    label = STOCK_PREFIX + pr.label.removeprefix(SINGLE_PREFIX)
    assert pr.plan is not None and pr.cluster is not None
    if not any(a.streamed_layers for a in pr.plan.devices):
        return dataclasses.replace(pr, label=label)
    plan = pr.plan.without_streaming()
    plan = plan.model_copy(
        update={"prediction": predict(plan, pr.cluster, model, wl, prefetch=sc.run.prefetch)}
    )
    plan.save(out / "plans" / f"{label}.json")
    return simulate_plan(PlanPrediction(label, plan, pr.cluster), sc, model, wl, out)
