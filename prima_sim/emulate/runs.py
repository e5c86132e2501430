"""Real runs of a plan inside the emulated devices, and what they measured.

:class:`RunSupervisor` cuts a plan's shards and writes the files its processes read
(:meth:`~RunSupervisor.prepare_plan`), runs it from a cold page cache (:meth:`~RunSupervisor.run_rep`:
``prima-sim worker`` processes and the head, ``prima-sim run --real``, each inside its device; memory, disk
reads and CPU throttling sampled from the cgroups; a worker that dies or a run that hangs is stopped and named),
keeps one :class:`~prima_sim.emulate.records.RunMeasurement` per run, and with contemporaneous calibration probes
the devices' streaming rates just before and after every run (:meth:`~RunSupervisor.rates_during_runs`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate import cgroups as cg
from prima_sim.emulate.calibrate import Calibrator, ProbeResult, median_rates
from prima_sim.emulate.memory import MemorySampler
from prima_sim.emulate.records import PlanPrediction, PlanRun, RunMeasurement, RunPrediction
from prima_sim.emulate.spawn import cli_command, log_tail, module_command, stop
from prima_sim.emulate.testbed import Testbed
from prima_sim.exec.stock import parse_json_output
from prima_sim.halda.costmodel import Workload
from prima_sim.metrics import read_token_csv, spans_from_chrome_trace, summarize
from prima_sim.plan import Plan
from prima_sim.reports.emulation import STOCK_PREFIX
from prima_sim.schema import dump_model

log = logging.getLogger(__name__)

CONTROL_PORT = 29501
DATA_PORT = 29500
HEAD_TIMEOUT_S = 900.0  # one real run (load + prefill + decode) may take this long
WORKER_SILENCE_S = 60.0  # the head's --timeout: heavy paging can stall a worker's heartbeat for a while
STARTUP_TIMEOUT_S = 600.0
WORKER_GRACE_S = 10.0  # after a worker exits, how long the head may take to notice and finish on its own


class RunSupervisor:
    """Runs plans for real in the devices of ``tb`` (see the module doc).

    Args:
        tb: the set-up testbed.
        cal: the calibration (its shards and which device's rates each device shares).
        out: the run's output directory (``runs/<plan>/`` goes there).
        raw_profiles: the calibrated profiles before the executor's footprint was subtracted (the probes' decode
            overhead and threads).
        keep_shards: leave every plan's shards in the work directory.
        calibrate_runs: probe the streaming rates just before and just after every run.
        say: called with one line per step.
    """

    def __init__(self, tb: Testbed, cal: Calibrator, out: Path, raw_profiles: dict[str, DeviceProfile], *,
                 keep_shards: bool = False, calibrate_runs: bool = True,
                 say: Callable[[str], None] = log.info) -> None:  # fmt: skip
        self.tb = tb
        self.cal = cal
        self.out = out
        self.raw_profiles = raw_profiles
        self.keep_shards = keep_shards
        self.calibrate_runs = calibrate_runs
        self.say = say
        self.run_probes: dict[str, list[ProbeResult]] = {}  # per device: the probes taken around its runs
        self.dirs: dict[str, tuple[Path, Path]] = {}  # per plan label: its shard directory and run directory
        self.measurements: dict[str, list[RunMeasurement]] = {}  # per plan label: its runs, in order

    def record(self, pr: PlanPrediction, at_run: RunPrediction | None = None) -> PlanRun:
        """The plan's prediction, runs so far and prediction at run time, as one record."""
        return PlanRun(pr, tuple(self.measurements.get(pr.label, ())), at_run)

    def rates_during_runs(self) -> dict[str, ProbeResult]:
        """Per calibrated device: the median of every rate (and prefill time) probed around the runs."""
        return {k: median_rates(v) for k, v in self.run_probes.items() if v}

    def prepare_plan(self, pr: PlanPrediction, model_path: Path) -> None:
        """Cut the plan's shards and write the files its processes read (hosts, cluster, plan); for a stock
        baseline, put the original GGUF on the emulated disk (once)."""
        from prima_sim.exec.hosts import HostEntry, HostsFile
        from prima_sim.exec.shard import write_shards

        assert pr.plan is not None and pr.cluster is not None
        if pr.label.startswith(STOCK_PREFIX):
            whole = self.tb.work / "model.gguf"
            if not whole.is_file():
                shutil.copyfile(model_path, whole)
            run_dir = self.out / "runs" / pr.label
            run_dir.mkdir(parents=True, exist_ok=True)
            self.dirs[pr.label] = (whole, run_dir)
            return
        plan = pr.plan
        names = [d.name for d in plan.devices]
        shard_dir = self.tb.work / "shards" / pr.label
        t0 = time.monotonic()
        write_shards(model_path, plan, shard_dir)
        self.say(f"{pr.label}: shards written in {time.monotonic() - t0:.0f} s")
        hosts = HostsFile(base_port=DATA_PORT, control_port=CONTROL_PORT,
                          devices={n: HostEntry(host=self.tb.ip(n), port=DATA_PORT) for n in names})  # fmt: skip
        run_dir = self.out / "runs" / pr.label
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_model(hosts, run_dir / "hosts.toml")
        dump_model(pr.cluster, run_dir / "cluster.json")
        plan.save(run_dir / "plan.json")
        self.dirs[pr.label] = (shard_dir, run_dir)

    def finish_plan(self, pr: PlanPrediction) -> None:
        """Remove the plan's shards (unless kept)."""
        if pr.label in self.dirs and not self.keep_shards and not pr.label.startswith(STOCK_PREFIX):
            shutil.rmtree(self.dirs[pr.label][0], ignore_errors=True)

    def run_rep(self, pr: PlanPrediction, wl: Workload, r: int) -> RunMeasurement | None:
        """Repetition ``r`` of the (prepared) plan: a cold run, its measurement kept (:attr:`measurements`) and
        returned; None if an earlier repetition failed (the plan does not run again). With contemporaneous
        calibration, the streaming rates of the plan's devices are also measured just before and just after the
        run (:attr:`run_probes`)."""
        assert pr.plan is not None and pr.label in self.dirs, "prepare_plan first"
        done = self.measurements.setdefault(pr.label, [])
        if any(m.error for m in done):  # an earlier repetition failed: the plan does not run here
            return None
        if pr.label.startswith(STOCK_PREFIX):
            done.append(self._run_stock(pr, wl, r))
            return done[-1]
        shard_dir, run_dir = self.dirs[pr.label]
        sc, tb, cal = self.tb.sc, self.tb, self.cal
        plan = pr.plan
        names = [d.name for d in plan.devices]
        srcs = sorted({cal.key_of[n] for n in names if n in cal.key_of})
        calibrate = bool(self.calibrate_runs and cal.probe is not None and srcs)

        def probe(when: str) -> dict[str, ProbeResult]:
            return {k: cal.probe_rates(k, self.raw_profiles[k], 16, f".{pr.label}.rep{r}.{when}", cal.prefill_sizes)
                    for k in srcs}  # fmt: skip

        before = probe("before") if calibrate else {}
        env: dict[str, str] = (
            {"OMP_WAIT_POLICY": sc.run.omp_wait_policy} if sc.run.omp_wait_policy != "default" else {}
        )
        rep_dir = run_dir / f"rep{r}"
        if sc.run.cold:
            cg.drop_caches()
        sampler = MemorySampler({n: tb.groups[n] for n in names}, device=tb.disk_dev or None).start()
        err = ""
        try:
            assert pr.cluster is not None
            # each device's thread count from the cluster, as --threads: a process given --cluster imports the device
            # profiles (and gguf with them), 2 MiB of anonymous memory in a device of a few hundred MiB
            threads = {d.name: pr.cluster.device(d.name).n_threads for d in plan.devices}
            err = self._run_once(plan, shard_dir, run_dir / "hosts.toml", run_dir / "plan.json", rep_dir, wl, env,
                                 threads)  # fmt: skip
        finally:
            peaks = sampler.stop()
        for n, pk in peaks.items():
            if pk.oom_kills:
                err = (err + "; " if err else "") + (
                    f"the kernel's OOM killer killed a process of {n} "
                    f"(its anonymous memory did not fit its {pk.limit / 2**20:.0f} MiB limit)"
                )
        if err:
            done.append(RunMeasurement(r, error=err, memory=peaks))
            self.say(f"{pr.label} rep {r}: FAILED: {err}")
            return done[-1]
        if calibrate:
            after = probe("after")
            for k in srcs:
                self.run_probes.setdefault(k, []).extend([before[k], after[k]])
        rows = read_token_csv(rep_dir / "tokens.csv")
        s = summarize(rows)
        steps: dict[int, Any] = {}
        for row in rows:
            steps.setdefault(row.token, row)
        dec = [row for row in steps.values() if row.phase == "decode"]
        summary: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads((rep_dir / "summary.json").read_text())
        t0 = summary.get("t0_unix_s")
        disk: dict[str, float] = {}
        if t0 is not None and dec:
            t_a, t_b = t0 + dec[0].t_start_s, t0 + dec[-1].t_start_s + dec[-1].latency_s
            disk = {n: sampler.io_between(n, t_a, t_b) / len(dec) for n in names}
        done.append(RunMeasurement(
            r, memory=peaks, tpot_s=float(s["tpot_s"]), ttft_s=float(s["ttft_s"]),
            token_latencies_s=tuple(row.latency_s for row in dec), per_device=dict(s["per_device"]),
            decode_disk_bytes=disk, spans=tuple(spans_from_chrome_trace(rep_dir / "trace.json")),
            steps=tuple((row.token, row.phase, row.batch_tokens, row.t_start_s, row.t_start_s + row.latency_s)
                        for row in steps.values()),
            prompt_tokens=int(summary.get("prompt_tokens") or 0),
        ))  # fmt: skip
        swapped = ", ".join(f"{n} {pk.swap / 2**20:.1f} MiB" for n, pk in peaks.items() if pk.swap)
        self.say(f"{pr.label} rep {r}: TPOT {s['tpot_s'] * 1e3:.1f} ms, TTFT {s['ttft_s'] * 1e3:.0f} ms"
                 + (f"; swapped out at most: {swapped}" if swapped else ""))  # fmt: skip
        return done[-1]

    def _run_stock(self, pr: PlanPrediction, wl: Workload, r: int) -> RunMeasurement:
        """Repetition ``r`` of the stock baseline: one llama.cpp process over the original GGUF
        (``python -m prima_sim.exec.stock``), greedy, in the device of the ``single-<device>`` plan."""
        assert pr.plan is not None
        sc, tb = self.tb.sc, self.tb
        device = pr.plan.head
        whole, run_dir = self.dirs[pr.label]
        rep_dir = run_dir / f"rep{r}"
        rep_dir.mkdir(parents=True, exist_ok=True)
        log_path = rep_dir / f"{device}.log"
        # the threads the ring's executor uses on this device (run --cluster: the profile's)
        threads = pr.cluster.device(device).n_threads if pr.cluster is not None else None
        cmd = module_command("prima_sim.exec.stock", "--model", str(whole), "--prompt", sc.workload.prompt,
                             "-n", str(wl.decode_tokens + 1), "--ctx", str(wl.n_ctx), "--json",
                             *(["--threads", str(threads)] if threads else []))  # fmt: skip
        env: dict[str, str] = (
            {"OMP_WAIT_POLICY": sc.run.omp_wait_policy} if sc.run.omp_wait_policy != "default" else {}
        )
        if sc.run.cold:
            cg.drop_caches()
        sampler = MemorySampler({device: tb.groups[device]}, device=tb.disk_dev or None).start()
        err, t_end = "", time.time()
        try:
            p = tb.spawn_in(device, cmd, log_path, env)
            try:
                p.wait(timeout=HEAD_TIMEOUT_S)
                t_end = time.time()
            except subprocess.TimeoutExpired:
                stop(p, 1.0)
                err = f"stock llama.cpp did not finish in {HEAD_TIMEOUT_S:g} s"
        finally:
            peaks = sampler.stop()
        obj: dict[str, Any] = {}
        if not err:
            text = log_path.read_text(errors="replace")
            try:
                obj = parse_json_output(text)
            except ValueError:
                err = f"stock llama.cpp exited {p.returncode}: {log_tail(log_path, 300)}"
        if err:
            self.say(f"{pr.label} rep {r}: FAILED: {err}")
            return RunMeasurement(r, error=err, memory=peaks)
        steps = [float(x) for x in obj["step_s"]]
        disk = {device: sampler.io_between(device, t_end - sum(steps), t_end) / len(steps)} if steps else {}
        m = RunMeasurement(r, memory=peaks, tpot_s=float(obj["tpot_s"]), ttft_s=float(obj["ttft_s"]),
                           token_latencies_s=tuple(steps), decode_disk_bytes=disk,
                           prompt_tokens=int(obj.get("prompt_tokens") or 0))  # fmt: skip
        self.say(f"{pr.label} rep {r}: TPOT {m.tpot_s * 1e3:.1f} ms, TTFT {m.ttft_s * 1e3:.0f} ms")
        return m

    def _run_once(self, plan: Plan, shard_dir: Path, hosts_file: Path, plan_file: Path,
                  rep_dir: Path, wl: Workload, env: dict[str, str], threads: dict[str, int]) -> str:  # fmt: skip
        """One real run; returns '' or what went wrong."""
        sc, tb = self.tb.sc, self.tb
        rep_dir.mkdir(parents=True, exist_ok=True)
        workers: dict[str, subprocess.Popen[bytes]] = {}
        prefetch = [] if sc.run.prefetch else ["--no-prefetch"]
        prefetch += ["--link-latency", tb.latency_env] if tb.latency_env else []  # head and workers take it
        batch = str(wl.n_ubatch)
        try:
            for d in plan.devices[1:]:
                cmd = cli_command("worker", "--hosts", str(hosts_file), "--device", d.name, "--shards",
                                  str(shard_dir / d.name), "--threads", str(threads[d.name]), "--batch", batch,
                                  "--no-verify", "--log-level", "INFO", *prefetch)  # fmt: skip
                workers[d.name] = tb.spawn_in(d.name, cmd, rep_dir / f"{d.name}.log", env)
            cmd = cli_command("run", "--real", "--plan", str(plan_file), "--shards", str(shard_dir), "--hosts",
                              str(hosts_file), "--threads", str(threads[plan.head]), "--prompt", sc.workload.prompt,
                              "-n", str(wl.decode_tokens + 1), "--ignore-eos", "--batch", batch, "--timeout",
                              str(WORKER_SILENCE_S), "--startup-timeout", str(STARTUP_TIMEOUT_S), "--out",
                              str(rep_dir), "--json", *prefetch)  # fmt: skip
            head = tb.spawn_in(plan.head, cmd, rep_dir / f"{plan.head}.log", env)
            t_end = time.monotonic() + HEAD_TIMEOUT_S
            dead: dict[str, float] = {}
            while (rc := head.poll()) is None:
                if time.monotonic() > t_end:
                    stop(head, 1.0)
                    return f"the run did not finish in {HEAD_TIMEOUT_S:g} s"
                # the head cannot know of a worker that died before its first heartbeat
                for n, p in workers.items():
                    if p.poll() is not None and n not in dead:
                        dead[n] = time.monotonic()
                if dead and time.monotonic() - min(dead.values()) > WORKER_GRACE_S:
                    stop(head, 1.0)
                    n = min(dead, key=dead.__getitem__)
                    return (f"worker {n} exited with status {workers[n].returncode} while the head was running: "
                            f"{log_tail(rep_dir / f'{n}.log', 400)}")  # fmt: skip
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            for p in workers.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if rc != 0 or not (rep_dir / "tokens.csv").is_file():
                why = log_tail(rep_dir / f"{plan.head}.log")
                for n, p in workers.items():
                    if p.poll() not in (0, None):
                        why += f"; worker {n} exited {p.returncode}: {log_tail(rep_dir / f'{n}.log', 300)}"
                return f"head exited {rc}: {why}"
            return ""
        finally:
            for p in workers.values():
                stop(p, 1.0)
