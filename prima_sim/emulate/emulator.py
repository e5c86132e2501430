"""One scenario, end to end: emulated devices, profiles, cluster, plans, simulations, real runs, report rows.

:func:`emulate` is what ``prima-sim emulate --scenario FILE`` calls. In order:

1. the model: generated (``prima-sim synth-model``, cached) or the scenario's GGUF;
2. the devices (:class:`~prima_sim.emulate.testbed.Testbed`): an emulated disk (a loop device with a typical
   readahead) for the shards, per device a cgroup (memory limit with page cache, CPU quota or cpuset, disk read
   limit) and a network namespace on a shared bridge; HTB classes shape every pair's bandwidth, user-space
   latency is handed to the head and workers as ``--link-latency``;
3. ``prima-sim profile`` inside every distinct device, repeated (the median kept), then the decode
   calibration (llama.cpp's own streaming rates) and the executor's footprint subtracted from the available
   memory (:mod:`prima_sim.emulate.calibrate`);
4. ``prima-sim netprobe`` between every pair of namespaces (:mod:`prima_sim.emulate.links`: the shaped bandwidth
   and the kernel's latency; the user-space latency is added on top, since netprobe does not go through the
   workers' hold);
5. the cluster file from those measurements, with the OS behaviour the scenario assumes;
6. a plan per scheduler (Halda and the baselines; manual windows; one device alone), the analytic
   prediction of each, and a simulation of each (:mod:`prima_sim.emulate.predict`);
7. each plan run for real (:mod:`prima_sim.emulate.runs`), ``repetitions`` times interleaved across plans, every
   time from a cold page cache: ``prima-sim worker`` processes and the head (``prima-sim run --real``) inside
   their devices; memory, disk reads and CPU throttling sampled from the cgroups; the streaming rates probed
   around every run and every plan predicted again with them (a diagnostic of the host's drift);
8. one report row per plan (:mod:`prima_sim.reports.emulation`), PNGs, and every artefact under ``out``.

Every kernel object is registered and removed on every way out (:mod:`prima_sim.emulate.resources`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster, LinkSpec
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf
from prima_sim.emulate import cgroups as cg
from prima_sim.emulate.calibrate import Calibrator, executor_overhead, with_executor_overhead
from prima_sim.emulate.disk import with_read_limits
from prima_sim.emulate.links import measure_links
from prima_sim.emulate.models import count_prompt_tokens, ensure_model
from prima_sim.emulate.predict import make_plans, predict_at_run, simulate_plan, stock_twin
from prima_sim.emulate.records import PlanRun, RunPrediction
from prima_sim.emulate.rows import make_row
from prima_sim.emulate.runs import RunSupervisor
from prima_sim.emulate.scenario import Scenario
from prima_sim.emulate.testbed import Testbed
from prima_sim.errors import InputError
from prima_sim.halda.costmodel import Workload
from prima_sim.schema import atomic_write_text, dump_model

log = logging.getLogger(__name__)


@dataclass
class EmulateOptions:
    """How to run a scenario (the command line's flags).

    Attributes:
        out_dir: every artefact of the run goes here (profiles, cluster, plans, simulations, measurements, logs).
        reports_dir: the CSV (``emulation.csv``) and the PNGs are written here.
        csv_name: file name of the CSV in ``reports_dir``.
        decode_tokens: override the scenario's timed decode tokens.
        repetitions: override the scenario's repetitions.
        work_dir: where shards and the profiler's disk test file go (its disk gets the read limits).
        profile_cache: reuse profiles measured under identical limits on this host (None = always profile).
        quick_profile: ``prima-sim profile --quick``.
        keep_shards: leave the shards in ``work_dir``.
        schedulers: override the scenario's schedulers.
        on_progress: called with one line per step.
        plots: write the PNGs.
        run_real: run the plans for real (False: profiles, plans and simulations only).
        profile_repeats: profiler runs per distinct device (the median of each rate is kept).
        calibrate_decode: replace the profile's memory bandwidth by llama.cpp's measured decode streaming rate.
        calibrate_runs: also measure the rates just before and after every run and predict each run again.
    """

    out_dir: Path
    reports_dir: Path = Path("reports")
    csv_name: str = "emulation.csv"
    decode_tokens: int | None = None
    repetitions: int | None = None
    work_dir: Path | None = None
    profile_cache: Path | None = None
    quick_profile: bool = False
    keep_shards: bool = False
    schedulers: tuple[str, ...] | None = None
    on_progress: Callable[[str], None] | None = None
    plots: bool = True
    run_real: bool = True
    profile_repeats: int = 3
    calibrate_decode: bool = True
    calibrate_runs: bool = True


@dataclass
class EmulationResult:
    """What :func:`emulate` produced."""

    scenario: Scenario
    run_id: str
    out_dir: Path
    model_path: Path
    model: ModelProfile
    cluster: Cluster
    workload: Workload
    plans: list[PlanRun]
    rows: list[dict[str, Any]]
    csv_path: Path | None
    pngs: list[Path]
    link_checks: list[dict[str, Any]]
    seconds: float
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        """The object ``emulate --json`` prints."""
        return {
            "scenario": self.scenario.name,
            "run_id": self.run_id,
            "out_dir": str(self.out_dir),
            "model": str(self.model_path),
            "csv": str(self.csv_path) if self.csv_path else None,
            "pngs": [str(p) for p in self.pngs],
            "rows": self.rows,
            "links": self.link_checks,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
        }


def disk_plans(sc: Scenario, schedulers: Sequence[str] | None = None) -> int:
    """How many models' worth of files the emulated disk must hold (it is sparse: room costs nothing): every plan's
    shards, and for each one-device baseline also the original GGUF that its stock llama.cpp twin reads (a
    paper-claim run with a 4.2 GB model ran out of room when the twin was added and this counted it as nothing)."""
    return len(schedulers or sc.run.schedulers) + len(sc.run.manual) + 2 * len(sc.run.single)


def emulate(scenario: Scenario, opts: EmulateOptions) -> EmulationResult:
    """Run ``scenario`` (see the module doc) and append its rows to ``opts.reports_dir / opts.csv_name``.

    Raises:
        EmulationError: not root, a controller or tool is missing, or setting up the devices failed.
        InputError: the scenario's model cannot be found or read.
    """
    from prima_sim.reports import emulation as rep

    t_start = time.monotonic()
    cg.check_root()
    sc = scenario
    wl_spec = sc.workload
    decode = opts.decode_tokens or wl_spec.decode_tokens
    reps = opts.repetitions or wl_spec.repetitions
    say = opts.on_progress or (lambda m: None)
    model_path = ensure_model(sc.model, log=say)
    model = model_profile_from_gguf(model_path)
    n_prompt = count_prompt_tokens(model_path, wl_spec.prompt)
    if n_prompt + decode + 1 > wl_spec.n_ctx:
        raise InputError("scenario", "workload.n_ctx", f"{n_prompt} prompt + {decode + 1} generated tokens exceed "
                         f"n_ctx {wl_spec.n_ctx}")  # fmt: skip
    wl = Workload(
        n_ctx=wl_spec.n_ctx,
        prompt_tokens=n_prompt,
        decode_tokens=decode,
        n_ubatch=min(wl_spec.batch, wl_spec.n_ctx),
    )
    say(f"scenario {sc.name}: model {model_path.name} ({model_path.stat().st_size / 1e9:.2f} GB, "
        f"{model.arch.n_layer} layers), prompt {n_prompt} tokens, {decode} timed decode tokens x {reps} runs")  # fmt: skip
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)

    def tell(msg: str) -> None:
        log.info("%s", msg)
        say(msg)

    n_plans = disk_plans(sc, opts.schedulers)
    with Testbed(sc, opts.work_dir or out / "work", model_bytes=model_path.stat().st_size, n_plans=n_plans,
                 keep_work=opts.keep_shards, say=tell) as tb:  # fmt: skip
        cal = Calibrator(tb, out, quick=opts.quick_profile, repeats=opts.profile_repeats,
                         cache=opts.profile_cache, say=tell)  # fmt: skip
        profiles = cal.profile_devices(model_path, model)
        if opts.calibrate_decode:
            # the prompt's micro-batch sizes, as the simulator splits the prefill (the suite's prompts are one)
            from prima_sim.sim import steps_for

            sizes = tuple({n for n, _ in steps_for(wl)[0].batches})
            profiles = cal.calibrate_decode(model_path, model, profiles, prefill=sizes)
        raw_profiles = dict(profiles)
        fp = cal.runtime_footprint(model_path)
        baseline_anon = fp.worker
        if fp.worker:
            say(f"executor footprint: runtime {fp.worker / 2**20:.1f} MiB (worker), {fp.head / 2**20:.1f} MiB (head); "
                f"tokenizer {fp.vocab / 2**20:.1f} MiB (head)")  # fmt: skip
            for d in tb.ring:
                ov = executor_overhead(fp, d.name == sc.head_name)
                profiles[d.name] = with_executor_overhead(
                    profiles[d.name], d.memory, ov, d.name == sc.head_name
                )
        links, checks = measure_links(tb, out, tell)
        cluster = Cluster(
            name=sc.name, description=f"emulated on {socket.gethostname()} (prima-sim emulate, run {tb.run_id})",
            devices=tuple(profiles[d.name] for d in tb.ring), head=sc.head_name,
            default_link=LinkSpec(bandwidth_bps=sc.network.bandwidth, latency_s=sc.network.latency), links=tuple(links),
        )  # fmt: skip
        cluster = with_read_limits(cluster, sc)
        dump_model(cluster, out / "cluster.json")
        # what was run, for re-predicting it later (benchmarks/repredict_emulation.py)
        dump_model(sc, out / "scenario.json")
        preds = make_plans(sc, cluster, model, wl, out, schedulers=opts.schedulers, raw_profiles=raw_profiles,
                           overheads=fp)  # fmt: skip
        for i, pr in enumerate(preds):
            plan = pr.plan
            if plan is None:
                say(f"{pr.label}: {pr.error}")
                continue
            preds[i] = pr = simulate_plan(pr, sc, model, wl, out)
            say(f"{pr.label}: k={plan.k} windows {list(plan.windows)} on {', '.join(d.name for d in plan.devices)}; "
                f"analytic TPOT {pr.analytic_tpot_s * 1e3:.1f} ms, simulated {pr.sim_tpot_s * 1e3:.1f} ms")  # fmt: skip
        # stock llama.cpp beside every one-device baseline (the paper's comparison)
        preds += [stock_twin(pr, sc, model, wl, out) for pr in preds
                  if pr.runnable and pr.label.startswith(rep.SINGLE_PREFIX)]  # fmt: skip
        runnable = [pr for pr in preds if pr.runnable]
        runs = RunSupervisor(tb, cal, out, raw_profiles, keep_shards=opts.keep_shards,
                             calibrate_runs=opts.calibrate_runs, say=tell)  # fmt: skip
        at_run: dict[str, RunPrediction] = {}
        if opts.run_real:
            try:
                for pr in runnable:
                    runs.prepare_plan(pr, model_path)
                # repetitions interleave the plans (r0 of every plan, then r1, ...), so that a slow period of the
                # host slows every plan alike instead of one plan's repetitions
                for r in range(reps):
                    for pr in runnable:
                        runs.run_rep(pr, wl, r)
            finally:
                for pr in runnable:
                    runs.finish_plan(pr)
            rates = runs.rates_during_runs()
            for k, (lay, outr, pre) in rates.items():
                pf = "".join(f", {n}-token prefill {t * 1e3:.1f} ms" for n, t in pre.items())
                say(f"calibration during the runs, {k}: layers {lay / 1e9:.2f} GB/s, output head {outr / 1e9:.2f} "
                    f"GB/s{pf} (median of {len(runs.run_probes[k])} probes)")  # fmt: skip
            if rates:
                for pr in runnable:
                    if runs.record(pr).rep_tpot_s:
                        at_run[pr.label] = predict_at_run(pr, sc, model, wl, cal, rates)
        plans = [runs.record(pr, at_run.get(pr.label)) for pr in preds]
    host = socket.gethostname()
    date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    rows = [
        make_row(sc, model_path, model, wl, pr, reps, host, date, tb.run_id, baseline_anon) for pr in plans
    ]
    csv_path = None
    pngs: list[Path] = []
    if not opts.run_real:
        for row in rows:
            row["status"] = "not run"
    if rows and opts.run_real:
        csv_path = rep.append_rows(opts.reports_dir / opts.csv_name, rows)
        atomic_write_text(out / "rows.json", json.dumps(rows, indent=2, default=str) + "\n")
        if opts.plots:
            pngs = rep.scenario_plots(sc.name, plans, opts.reports_dir)
    atomic_write_text(out / "links.json", json.dumps(checks, indent=2) + "\n")
    return EmulationResult(sc, tb.run_id, out, model_path, model, cluster, wl, plans, rows, csv_path, pngs, checks,
                           time.monotonic() - t_start, tb.notes)  # fmt: skip
