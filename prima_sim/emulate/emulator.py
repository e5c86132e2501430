"""One scenario, end to end: emulated devices, profiles, cluster, plans, simulations, real runs, report rows.

:func:`emulate` is what ``prima-sim emulate --scenario FILE`` calls. In order:

1. the model: generated (``prima-sim synth-model``, cached) or the scenario's GGUF;
2. an emulated disk (a loop device with a typical readahead) for the shards, per device a cgroup (memory limit
   with page cache, CPU quota or cpuset, disk read limit) and a network namespace on a shared bridge; HTB
   classes shape every pair's bandwidth, user-space latency is handed to the head and workers as
   ``--link-latency``;
3. ``prima-sim profile`` inside every distinct device, repeated (the median kept), then the decode
   calibration (llama.cpp's own streaming rates, :meth:`_Emulation.calibrate_decode`) and the executor's
   footprint subtracted from the available memory (:func:`with_executor_overhead`);
4. ``prima-sim netprobe`` between every pair of namespaces (the shaped bandwidth and the kernel's latency;
   the user-space latency is added on top, since netprobe does not go through the workers' hold);
5. the cluster file from those measurements, with the OS behaviour the scenario assumes;
6. a plan per scheduler (Halda and the baselines; manual windows; one device alone), the analytic
   prediction of each, and a simulation of each;
7. each plan run for real, ``repetitions`` times interleaved across plans, every time from a cold page cache:
   ``prima-sim worker`` processes and the head (``prima-sim run --real``) inside their devices; memory, disk
   reads and CPU throttling sampled from the cgroups; the streaming rates probed around every run and every
   plan predicted again with them (a diagnostic of the host's drift);
8. one report row per plan (:mod:`prima_sim.reports.emulation`), PNGs, and every artefact under ``out``.

Every kernel object is registered and removed on every way out (:mod:`prima_sim.emulate.resources`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prima_sim
from prima_sim.devices.cluster import Cluster, Link, LinkSpec
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf
from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate import cgroups as cg
from prima_sim.emulate.disk import EmulatedDisk
from prima_sim.emulate.memory import MemorySampler
from prima_sim.emulate.models import count_prompt_tokens, ensure_model
from prima_sim.emulate.netns import Network, latency_table
from prima_sim.emulate.records import PlanRun
from prima_sim.emulate.resources import Registry
from prima_sim.emulate.scenario import DeviceSpec, Scenario
from prima_sim.emulate.spawn import spawn, stop
from prima_sim.errors import EmulationError, InfeasiblePlanError, InputError, PrimaSimError
from prima_sim.halda.costmodel import Workload
from prima_sim.metrics import read_token_csv, spans_from_chrome_trace, summarize
from prima_sim.plan import Plan
from prima_sim.schema import atomic_write_text, dump_model, load_model

log = logging.getLogger(__name__)

CONTROL_PORT = 29501
DATA_PORT = 29500
NETPROBE_PORT = 5590
HEAD_TIMEOUT_S = 900.0  # one real run (load + prefill + decode) may take this long
WORKER_SILENCE_S = 60.0  # the head's --timeout: heavy paging can stall a worker's heartbeat for a while
STARTUP_TIMEOUT_S = 600.0
WORKER_GRACE_S = 10.0  # after a worker exits, how long the head may take to notice and finish on its own
CPU_PERIOD_US = 10_000
"""CFS period of CPU quotas. 10 ms rather than the kernel's 100 ms default: with 100 ms a 30 ms token can run
unthrottled and the next one wait 70 ms, so per-token times would be bimodal instead of uniformly slower."""


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


# --- helpers ----------------------------------------------------------------------------------------------
def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(prima_sim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prima_sim.cli.main", *args]


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-n:]


def _profile_key(dev: DeviceSpec, model: ModelProfile, quick: bool, repeats: int = 1) -> str:
    import hashlib

    blob = json.dumps({
        "host": socket.gethostname(), "memory": dev.memory, "cpus": dev.cpus, "cpuset": dev.cpuset,
        "threads": dev.threads, "disk_read": dev.disk_read, "types": sorted(model.weight_types()),
        "n_embd": model.arch.n_embd, "quick": quick, "version": prima_sim.__version__, "repeats": repeats,
    }, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MEDIAN_FIELDS = ("memory_bandwidth_bps", "kv_copy_s_per_layer", "decode_overhead_s", "disk_seq_read_bps",
                  "disk_rand_read_bps")  # fmt: skip


def median_profile(runs: list[DeviceProfile]) -> DeviceProfile:
    """One profile from repeated measurements of a device: the median of every rate and time (CPU throughput
    per type included); memory and everything else from the first run. One run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    base = runs[0]
    upd: dict[str, Any] = {f: statistics.median(getattr(r, f) for r in runs) for f in _MEDIAN_FIELDS}
    upd["cpu_flops"] = {
        t: statistics.median(r.cpu_flops.get(t, v) for r in runs) for t, v in base.cpu_flops.items()
    }
    spread = ", ".join(f"{r.memory_bandwidth_bps / 1e9:.2f}" for r in runs)
    upd["sources"] = {
        **base.sources,
        "repeats": f"median of {len(runs)} profiler runs (memory_bandwidth GB/s: {spread})",
    }
    return base.model_copy(update=upd)


class _Emulation:
    """State of one scenario's emulation (see the module doc for the steps)."""

    def __init__(self, scenario: Scenario, opts: EmulateOptions, reg: Registry) -> None:
        self.sc = scenario
        self.opts = opts
        self.reg = reg
        self.out = opts.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.work_base = opts.work_dir or self.out / "work"
        self.work = self.work_base / reg.run_id
        self.disk: EmulatedDisk | None = None
        self.ring = scenario.ring
        self.notes: list[str] = []
        self.groups: dict[str, cg.Group] = {}
        self.net: Network | None = None
        self.latency_env = ""
        self.overheads = (0, 0)
        self.probe: dict[str, Any] = {}
        self.key_of: dict[str, str] = {}
        self.run_probes: dict[str, list[tuple[float, float]]] = {}
        self.calib_groups: dict[str, cg.Group] = {}
        self.disk_dev = ""  # MAJ:MIN of the disk the shards are on (whose reads the sampler counts)
        self.raw_profiles: dict[str, DeviceProfile] = {}

    def say(self, msg: str) -> None:
        log.info("%s", msg)
        if self.opts.on_progress:
            self.opts.on_progress(msg)

    # --- 2. devices ---------------------------------------------------------------------------------------
    def setup_disk(self, model_bytes: int) -> None:
        """The work directory: on an emulated disk (a loop device of this run) or on the host's file system."""
        sc = self.sc
        n_plans = len(self.opts.schedulers or sc.run.schedulers) + len(sc.run.manual) + len(sc.run.single)
        if sc.disk.emulated:
            size = int(model_bytes * (n_plans + 0.5)) + (3 << 30)
            self.disk = EmulatedDisk(self.reg, self.work_base, size, sc.disk.readahead)
            self.work = self.disk.create() / "work"
            self.work.mkdir()
            self.say(f"disk: {self.disk.device} ({size / 2**30:.1f} GiB sparse image, ext4, readahead "
                     f"{sc.disk.readahead // 1024} KiB) mounted at {self.disk.mountpoint}")  # fmt: skip
        else:
            self.work.mkdir(parents=True, exist_ok=True)
            work = self.work
            self.reg.add(
                "dir",
                str(work),
                lambda: shutil.rmtree(work, ignore_errors=True) if not self.opts.keep_shards else None,
            )

    def setup_devices(self) -> None:
        sc = self.sc
        cgs = cg.Cgroups(self.reg.prefix, need=sc.controllers())
        self.cgs = cgs

        def remove_groups() -> None:
            problems = cgs.remove_all()
            if problems:
                raise EmulationError("; ".join(problems))

        self.reg.add("cgroups", self.reg.prefix, remove_groups)
        if self.disk is not None:
            self.disk_dev = self.disk.majmin
        else:
            with contextlib.suppress(EmulationError, OSError):
                self.disk_dev = cg.block_device_of(self.work)
        dev_id = self.disk_dev if any(d.disk_read for d in self.ring) else ""
        if dev_id == "" and any(d.disk_read for d in self.ring):
            dev_id = cg.block_device_of(self.work)
        for d in self.ring:
            g = cgs.create(d.name)
            g.set_memory_limit(d.memory)
            if d.cpus is not None:
                g.set_cpu_quota(d.cpus, CPU_PERIOD_US)
            if d.cpuset is not None:
                g.set_cpuset(d.cpuset)
            if d.disk_read:
                g.set_read_bps(dev_id, d.disk_read)
            self.groups[d.name] = g
        limits = [d.disk_read for d in self.ring if d.disk_read]
        if limits and len(limits) < len(self.ring):
            self.notes.append(
                "some devices have no disk read limit: they share the physical disk unthrottled"
            )
        self.net = Network(self.reg)
        self.net.create([d.name for d in self.ring])
        lat: dict[tuple[str, str], float] = {}
        for a in self.ring:
            peers = {}
            for b in self.ring:
                if a.name == b.name:
                    continue
                bw, latency = sc.pair(a.name, b.name)
                peers[b.name] = bw
                lat[(a.name, b.name)] = latency
            self.net.shape(a.name, peers)
        self.latency_env = latency_table(lat)
        self.say(f"devices: {len(self.ring)} cgroups under {self.reg.prefix} ({', '.join(sc.controllers())}), "
                 f"namespaces {', '.join(n.ns for n in self.net.nodes.values())}"
                 + (f", disk {dev_id} read-limited" if dev_id else ""))  # fmt: skip

    def spawn_in(
        self, device: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        assert self.net is not None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as fh:
            p = spawn(cmd, procs_files=self.groups[device].procs_files(), netns=self.net.nodes[device].ns,
                      env=_python_env(env), stdout=fh, stderr=subprocess.STDOUT, cwd=self.work)  # fmt: skip
        self.reg.add("process", f"{device} pid {p.pid}", lambda: stop(p, 1.0))
        return p

    # --- 3. profiles -----------------------------------------------------------------------------------------
    def profile_devices(self, model_path: Path, model: ModelProfile) -> dict[str, DeviceProfile]:
        """Profile every device inside its limits: ``prima-sim profile`` as a process in the device's cgroup and
        namespace. Devices with identical limits share one measurement (taken in the first of them), so that
        equal devices get equal profiles; each distinct device is profiled ``profile_repeats`` times, the
        rounds interleaved across devices, and the median of every rate is kept (this host's memory bandwidth
        drifts by tens of percent within seconds: one 0.5 s sample is not the device's typical speed)."""
        pdir = self.out / "profiles"
        pdir.mkdir(parents=True, exist_ok=True)
        quick = self.opts.quick_profile
        keys = {d.name: _profile_key(d, model, quick, self.opts.profile_repeats) for d in self.ring}
        first: dict[str, DeviceSpec] = {}
        for d in self.ring:
            first.setdefault(keys[d.name], d)
        measured: dict[str, DeviceProfile] = {}
        todo: list[str] = []
        for key, d in first.items():
            cached = self.opts.profile_cache / f"{key}.json" if self.opts.profile_cache is not None else None
            if cached is not None and cached.is_file():
                measured[key] = load_model(DeviceProfile, cached)
                self.say(f"profile {d.name}: reused {cached} (measured earlier under the same limits)")
            else:
                todo.append(key)
        runs: dict[str, list[DeviceProfile]] = {k: [] for k in todo}
        for r in range(self.opts.profile_repeats if todo else 0):
            for key in todo:
                d = first[key]
                dest = pdir / f"{d.name}.run{r}.json"
                cg.drop_caches()
                cmd = _cli("profile", "--model", str(model_path), "--out", str(dest), "--name", d.name,
                           "--no-progress", "--disk-dir", str(self.work))  # fmt: skip
                if quick:
                    cmd.append("--quick")
                if d.threads:
                    cmd += ["--threads", str(d.threads)]
                t0 = time.monotonic()
                logf = self.out / "logs" / f"profile-{d.name}.run{r}.log"
                rc = self.spawn_in(d.name, cmd, logf, {"OMP_WAIT_POLICY": "passive"}).wait()
                if rc != 0 or not dest.is_file():
                    raise EmulationError(f"profiling {d.name} failed (exit {rc}): {_tail(logf)}")
                runs[key].append(load_model(DeviceProfile, dest))
                self.say(f"profile {d.name} ({r + 1}/{self.opts.profile_repeats}): measured inside its limits in "
                         f"{time.monotonic() - t0:.0f} s")  # fmt: skip
        for key in todo:
            measured[key] = median_profile(runs[key])
            if self.opts.profile_cache is not None:
                self.opts.profile_cache.mkdir(parents=True, exist_ok=True)
                dump_model(measured[key], self.opts.profile_cache / f"{key}.json")
        out: dict[str, DeviceProfile] = {}
        for d in self.ring:
            prof = measured[keys[d.name]]
            upd: dict[str, Any] = {"name": d.name, "os": d.os}
            if d.threads:
                upd["threads"] = d.threads
            if first[keys[d.name]].name != d.name:
                upd["sources"] = {
                    **prof.sources,
                    "emulation": f"measured in {first[keys[d.name]].name}, whose limits are identical",
                }
            if d.os != "linux":
                upd["sources"] = {**upd.get("sources", prof.sources),
                                  "os": f"{d.os}: assumed by the scenario (the emulating host runs Linux)"}  # fmt: skip
            out[d.name] = prof.model_copy(update=upd)
            dump_model(out[d.name], pdir / f"{d.name}.json")
        return out

    # --- 3b. decode calibration ------------------------------------------------------------------------
    def _prepare_probe(self, model_path: Path, model: ModelProfile) -> bool:
        """Write the calibration shards once: a vocabulary-free shard of the model's first layers (what a worker
        runs) and a logits shard of the last layer and the output head (what the head runs)."""
        from prima_sim.exec.shard import write_shards
        from prima_sim.halda.costmodel import output_tensors
        from prima_sim.plan import Plan, make_assignments

        L = model.arch.n_layer
        if L < 3:
            return False
        n = max(1, min(8, L - 2, -(-(256 << 20) // max(1, int(model.mean_layer_bytes)))))
        probe_plan = Plan(model_id=model.id, n_layers=L, cluster_name="calibration", k=1, n_ctx=256,
                          devices=make_assignments(["h", "w", "m"], [1, n, L - 1 - n], [0, 0, 0], L),
                          scheduler="manual")  # fmt: skip
        sdir = self.work / "calibration"
        mans = write_shards(model_path, probe_plan, sdir, ["w", "h"])
        out_t = output_tensors(model)
        self.probe = {
            "w": sdir / "w" / mans["w"].shards[0].file,
            "h": sdir / "h" / next(sh.file for sh in mans["h"].shards if sh.kind == "logits"),
            "n": n,
            "layer_bytes": sum(model.layer_bytes[i] for i in range(n)),
            "out_bytes": sum(t.n_bytes for t in out_t),
            "extra_types": sorted({t.ggml_type for t in out_t if len(t.shape) > 1}
                                  - {t.ggml_type for i in range(L) for t in model.layer_tensors(i) if len(t.shape) > 1}),
            "model": model.id,
        }  # fmt: skip
        return True

    def probe_rates(
        self, name: str, prof: DeviceProfile, tokens: int = 40, tag: str = ""
    ) -> tuple[float, float]:
        """(layer rate, output-head rate) in bytes per second: llama.cpp decoding the calibration shards token by
        token with device ``name``'s CPU limits: ``bytes / (median time per token - decode overhead)``.

        The probe runs in a calibration cgroup that has the device's CPU quota or cpuset but neither its memory
        nor its disk limit: it measures how fast the device streams weights that are in memory (a device too
        small to hold the probe's shards would otherwise measure its disk)."""
        pb = self.probe
        group = self.calibration_group(name)
        code = (
            "import sys, time, statistics, json, numpy as np\n"
            "from prima_sim.exec.llamacpp import Model, Window\n"
            "def timed(path, mode, k):\n"
            "    m = Model(path); w = Window(m, mode, 256, 8, int(sys.argv[3]))\n"
            "    h = np.random.default_rng(0).standard_normal((1, m.n_embd)).astype(np.float32)\n"
            "    w.run_hidden(np.repeat(h, 8, 0), 0)\n"
            "    ts = []\n"
            "    for i in range(k):\n"
            "        time.sleep(0.03)  # a ring device idles between its windows: probe it the same way\n"
            "        t = time.perf_counter(); w.run_hidden(h, 8 + i); ts.append(time.perf_counter() - t)\n"
            "    w.close(); m.close()\n"
            "    return statistics.median(ts)\n"
            "k = int(sys.argv[4])\n"
            "print(json.dumps({'layers_s': timed(sys.argv[1], 'hidden', k), 'head_s': timed(sys.argv[2], 'logits', k)}))\n"
        )
        logf = self.out / "logs" / f"calibrate-{name}{tag}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        proc = spawn([sys.executable, "-c", code, str(pb["w"]), str(pb["h"]), str(prof.n_threads), str(tokens)],
                     procs_files=group.procs_files(), env=_python_env({"OMP_WAIT_POLICY": "passive"}),
                     stdout=subprocess.PIPE, stderr=logf.open("wb"), cwd=self.work)  # fmt: skip
        self.reg.add("process", f"{name} pid {proc.pid}", lambda: stop(proc, 1.0))
        out, _ = proc.communicate(timeout=600)
        try:
            res = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EmulationError(f"decode calibration in {name} failed: {_tail(logf)}") from None
        t_layers = max(1e-6, float(res["layers_s"]) - prof.decode_overhead_s)
        t_out = max(1e-6, float(res["head_s"]) - prof.decode_overhead_s - t_layers / pb["n"])
        return pb["layer_bytes"] / t_layers, pb["out_bytes"] / t_out

    def calibration_group(self, name: str) -> cg.Group:
        """A cgroup with device ``name``'s CPU limits and no memory or disk limit (created on first use)."""
        if name not in self.calib_groups:
            d = self.sc.device(name)
            g = self.cgs.create(f"calibrate-{name}")
            if d.cpus is not None:
                g.set_cpu_quota(d.cpus, CPU_PERIOD_US)
            if d.cpuset is not None:
                g.set_cpuset(d.cpuset)
            self.calib_groups[name] = g
        return self.calib_groups[name]

    def with_rates(self, prof: DeviceProfile, layer_bps: float, out_bps: float, note: str) -> DeviceProfile:
        """``prof`` with llama.cpp's measured streaming rates (layers; the output head's type if the layers
        do not use it)."""
        upd: dict[str, Any] = {"memory_bandwidth_bps": layer_bps,
                               "sources": {**prof.sources, "memory_bandwidth_bps": note}}  # fmt: skip
        if self.probe.get("extra_types"):
            upd["matvec_bps"] = {**prof.matvec_bps, **dict.fromkeys(self.probe["extra_types"], out_bps)}
            upd["sources"]["matvec_bps"] = (
                f"{', '.join(self.probe['extra_types'])}: {out_bps / 1e9:.2f} GB/s: the output head "
                f"({self.probe['out_bytes'] / 2**20:.0f} MiB) decoded by llama.cpp inside the device (a logits shard "
                f"of the last layer and the output head: bytes / (time per token - one layer - decode overhead))"
            )  # fmt: skip
        return prof.model_copy(update=upd)

    def calibrate_decode(self, model_path: Path, model: ModelProfile, profiles: dict[str, DeviceProfile],
                         repeats: int = 3) -> dict[str, DeviceProfile]:  # fmt: skip
        """Measure, inside every distinct device, the rates at which llama.cpp's decode streams this model's
        weights, and put them in the profile: ``memory_bandwidth_bps`` (the layers) and ``matvec_bps`` for the
        output head's type when the layers do not use it.

        The profiler measures the layer rate with a ggml micro-benchmark (decode-shaped matrix-vector products
        of the model's layer-0 matrices), which on this project's hosts streams about a tenth slower than
        llama.cpp's own decode, and it has one rate for every type, while with one thread a Q6_K output head
        streams about twice as fast as Q4_0 layers (dequantization, not memory, bounds them). So the emulation
        measures the executor itself on the calibration shards (:meth:`probe_rates`).
        """
        if not self._prepare_probe(model_path, model):
            return profiles
        keys: dict[str, str] = {}
        for d in self.ring:
            keys.setdefault(
                _profile_key(d, model, self.opts.quick_profile, self.opts.profile_repeats), d.name
            )
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in keys.values()}
        for r in range(repeats):
            for name in keys.values():
                cg.drop_caches()
                rates[name].append(self.probe_rates(name, profiles[name], 40, f".run{r}"))
        out_profiles = dict(profiles)
        self.key_of = {d.name: keys[_profile_key(d, model, self.opts.quick_profile, self.opts.profile_repeats)]
                       for d in self.ring}  # fmt: skip
        for d in self.ring:
            src = self.key_of[d.name]
            lay = statistics.median(x for x, _ in rates[src])
            outr = statistics.median(y for _, y in rates[src])
            prof = profiles[d.name]
            note = (f"{lay / 1e9:.2f} GB/s: llama.cpp decoding a vocabulary-free shard of layers 0-{self.probe['n'] - 1}"
                    f" of {model.id} ({self.probe['layer_bytes'] / 2**20:.0f} MiB) token by token inside the emulated "
                    f"device: bytes / (median time per token - decode overhead), median of {len(rates[src])} runs "
                    f"({', '.join(f'{x / 1e9:.2f}' for x, _ in rates[src])} GB/s); the profiler's ggml benchmark "
                    f"measured {prof.memory_bandwidth_bps / 1e9:.2f} GB/s")  # fmt: skip
            out_profiles[d.name] = self.with_rates(prof, lay, outr, note)
            self.say(f"calibration {d.name}: llama.cpp streams the layers at {lay / 1e9:.2f} GB/s (profiler: "
                     f"{prof.memory_bandwidth_bps / 1e9:.2f} GB/s)"
                     + (f", the {'/'.join(self.probe['extra_types'])} output head at {outr / 1e9:.2f} GB/s"
                        if self.probe["extra_types"] else ""))  # fmt: skip
        return out_profiles

    # --- 4. links ----------------------------------------------------------------------------------------------
    def measure_links(self) -> tuple[list[Link], list[dict[str, Any]]]:
        assert self.net is not None
        sc = self.sc
        names = [d.name for d in self.ring]
        links: list[Link] = []
        checks: list[dict[str, Any]] = []
        servers = {}
        if sc.network.measure and len(names) > 1:
            for n in names:
                node = self.net.nodes[n]
                servers[n] = self.spawn_in(n, _cli("netprobe", "--serve", "--bind", f"{node.ip}:{NETPROBE_PORT}"),
                                           self.out / "logs" / f"netprobe-serve-{n}.log")  # fmt: skip
            time.sleep(1.5)
        try:
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    bw, lat = sc.pair(a, b)
                    rec: dict[str, Any] = {"a": a, "b": b, "configured_bps": bw, "configured_latency_s": lat}
                    meas_bw, meas_lat = bw, 0.0
                    if servers:
                        size = max(64 << 10, min(1 << 20, int(bw * 0.05)))
                        logf = self.out / "logs" / f"netprobe-{a}-{b}.log"
                        cmd = _cli("netprobe", f"{self.net.nodes[b].ip}:{NETPROBE_PORT}", "--json", "--size",
                                   str(size), "--count", "3", "--pings", "30", "--timeout", "20")  # fmt: skip
                        p = self.spawn_in(a, cmd, logf)
                        if p.wait() != 0:
                            raise EmulationError(f"netprobe {a} -> {b} failed: {_tail(logf)}")
                        text = logf.read_text()
                        res = json.loads(text[text.index("{") :])
                        meas_bw, meas_lat = float(res["bandwidth_bps"]), float(res["latency_s"])
                        rec.update(measured_bps=meas_bw, measured_kernel_latency_s=meas_lat,
                                   bandwidth_error_pct=100.0 * (meas_bw - bw) / bw, probe_bytes=size)  # fmt: skip
                    links.append(Link(a=a, b=b, bandwidth_bps=meas_bw, latency_s=meas_lat + lat))
                    rec["cluster_latency_s"] = meas_lat + lat
                    checks.append(rec)
        finally:
            for p in servers.values():
                stop(p, 1.0)
        for c in checks:
            if "measured_bps" in c:
                self.say(f"link {c['a']}<->{c['b']}: shaped {c['configured_bps'] * 8 / 1e6:.0f} Mbit/s, measured "
                         f"{c['measured_bps'] * 8 / 1e6:.1f} Mbit/s goodput; latency {c['configured_latency_s'] * 1e3:.2f} ms "
                         f"user space + {c['measured_kernel_latency_s'] * 1e3:.2f} ms measured")  # fmt: skip
        return links, checks

    # --- 6. plans ------------------------------------------------------------------------------------------------
    def make_plans(self, cluster: Cluster, model: ModelProfile, wl: Workload) -> list[PlanRun]:
        from prima_sim.halda.planner import make_plan, manual_plan

        sc = self.sc
        out: list[PlanRun] = []
        for s in self.opts.schedulers or sc.run.schedulers:
            try:
                kw: dict[str, Any] = {"k": sc.run.k, "allow_drop": sc.run.allow_drop} if s == "halda" else {}
                out.append(PlanRun(s, make_plan(cluster, model, wl, s, **kw), cluster))
            except (InfeasiblePlanError, InputError) as exc:
                out.append(PlanRun(s, None, cluster, error=f"plan: {exc}"))
        for m in sc.run.manual:
            try:
                out.append(PlanRun(m.name, manual_plan(cluster, model, wl, list(m.windows)), cluster))
            except (InfeasiblePlanError, InputError) as exc:
                out.append(PlanRun(m.name, None, cluster, error=f"plan: {exc}"))
        for name in sc.run.single:
            dev = cluster.device(name)
            if name != sc.head_name and name in self.raw_profiles and self.overheads[0]:  # it is the head now
                ov = executor_overhead(*self.overheads, is_head=True)
                dev = with_executor_overhead(self.raw_profiles[name], sc.device(name).memory, ov, True)
            one = cluster.model_copy(update={"devices": (dev,), "head": name, "links": ()})
            try:
                plan = manual_plan(one, model, wl, [model.arch.n_layer])
                out.append(
                    PlanRun(f"single-{name}", plan.model_copy(update={"scheduler": f"single-{name}"}), one)
                )
            except (InfeasiblePlanError, InputError) as exc:
                out.append(PlanRun(f"single-{name}", None, one, error=f"plan: {exc}"))
        pdir = self.out / "plans"
        for pr in out:
            if pr.plan is not None:
                pr.plan.save(pdir / f"{pr.label}.json")
        return out

    def simulate(self, pr: PlanRun, model: ModelProfile, wl: Workload) -> None:
        from prima_sim.sim import SimConfig, simulate

        assert pr.plan is not None and pr.cluster is not None
        try:
            res = simulate(
                pr.plan, pr.cluster, model, wl, SimConfig(prefetch=self.sc.run.prefetch, warm=True)
            )
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
        res.write(self.out / "sim" / pr.label)

    def predict_at_run(self, pr: PlanRun, model: ModelProfile, wl: Workload,
                       rates: dict[str, tuple[float, float]]) -> None:  # fmt: skip
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
            k = self.key_of.get(d.name)
            if k in rates:
                lay, outr = rates[k]
                devs.append(
                    self.with_rates(d, lay, outr, f"{lay / 1e9:.2f} GB/s: llama.cpp, measured around the run")
                )
                pr.run_rates.setdefault(d.name, []).append(lay)
            else:
                devs.append(d)
        cl = pr.cluster.model_copy(update={"devices": tuple(devs)})
        try:
            res = simulate(pr.plan, cl, model, wl, SimConfig(prefetch=self.sc.run.prefetch, warm=True))
        except PrimaSimError:
            return
        pr.rep_sim_tpot_s.append(res.tpot_s)
        pr.rep_sim_ttft_s.append(res.ttft_s)
        a = predict(pr.plan, cl, model, wl)
        pr.rep_analytic_tpot_s.append(a.tpot_s)
        pr.rep_analytic_ttft_s.append(a.ttft_s)

    # --- 7. real runs ------------------------------------------------------------------------------------------
    def prepare_plan(self, pr: PlanRun, model_path: Path) -> None:
        """Cut the plan's shards and write the files its processes read (hosts, cluster, plan)."""
        from prima_sim.exec.hosts import HostEntry, HostsFile
        from prima_sim.exec.shard import write_shards

        assert pr.plan is not None and pr.cluster is not None and self.net is not None
        plan = pr.plan
        names = [d.name for d in plan.devices]
        pr.shard_dir = self.work / "shards" / pr.label
        t0 = time.monotonic()
        write_shards(model_path, plan, pr.shard_dir)
        self.say(f"{pr.label}: shards written in {time.monotonic() - t0:.0f} s")
        hosts = HostsFile(base_port=DATA_PORT, control_port=CONTROL_PORT,
                          devices={n: HostEntry(host=self.net.nodes[n].ip, port=DATA_PORT) for n in names})  # fmt: skip
        pr.run_dir = self.out / "runs" / pr.label
        pr.run_dir.mkdir(parents=True, exist_ok=True)
        dump_model(hosts, pr.run_dir / "hosts.toml")
        dump_model(pr.cluster, pr.run_dir / "cluster.json")
        plan.save(pr.run_dir / "plan.json")

    def finish_plan(self, pr: PlanRun) -> None:
        """Remove the plan's shards (unless kept)."""
        if pr.shard_dir is not None and not self.opts.keep_shards:
            shutil.rmtree(pr.shard_dir, ignore_errors=True)

    def run_rep(self, pr: PlanRun, wl: Workload, r: int, model: ModelProfile | None = None) -> None:
        """Repetition ``r`` of the plan: a cold run, its measurements added to ``pr``. With contemporaneous
        calibration, the streaming rates of the plan's devices are also measured just before and just after the
        run (:attr:`run_probes`; :meth:`predict_at_run` uses their median over the whole run phase)."""
        assert pr.plan is not None and pr.run_dir is not None and pr.shard_dir is not None
        if pr.run_errors:  # an earlier repetition failed: the plan does not run here
            return
        plan = pr.plan
        names = [d.name for d in plan.devices]
        srcs = sorted({self.key_of[n] for n in names if n in self.key_of})
        calibrate = bool(self.opts.calibrate_runs and self.probe and model is not None and srcs)
        before = (
            {k: self.probe_rates(k, self.raw_profiles[k], 16, f".{pr.label}.rep{r}.before") for k in srcs}
            if calibrate
            else {}
        )
        env: dict[str, str] = (
            {"OMP_WAIT_POLICY": self.sc.run.omp_wait_policy}
            if self.sc.run.omp_wait_policy != "default"
            else {}
        )
        rep_dir = pr.run_dir / f"rep{r}"
        if self.sc.run.cold:
            cg.drop_caches()
        sampler = MemorySampler({n: self.groups[n] for n in names}, device=self.disk_dev or None).start()
        err = ""
        try:
            err = self._run_once(plan, pr.shard_dir, pr.run_dir / "hosts.toml", pr.run_dir / "cluster.json",
                                 pr.run_dir / "plan.json", rep_dir, wl, env)  # fmt: skip
        finally:
            peaks = sampler.stop()
        for n, pk in peaks.items():
            pr.memory[n] = pr.memory[n].merge(pk) if n in pr.memory else pk
            if pk.oom_kills:
                err = (err + "; " if err else "") + (
                    f"the kernel's OOM killer killed a process of {n} "
                    f"(its anonymous memory did not fit its {pk.limit / 2**20:.0f} MiB limit)"
                )
        if err:
            pr.run_errors.append(f"rep {r}: {err}")
            self.say(f"{pr.label} rep {r}: FAILED: {err}")
            return
        if calibrate:
            after = {
                k: self.probe_rates(k, self.raw_profiles[k], 16, f".{pr.label}.rep{r}.after") for k in srcs
            }
            for k in srcs:
                self.run_probes.setdefault(k, []).extend([before[k], after[k]])
        rows = read_token_csv(rep_dir / "tokens.csv")
        s = summarize(rows)
        pr.meas_per_device.append(dict(s["per_device"]))
        pr.rep_tpot_s.append(float(s["tpot_s"]))
        pr.rep_ttft_s.append(float(s["ttft_s"]))
        steps: dict[int, Any] = {}
        for row in rows:
            steps.setdefault(row.token, row)
        dec = [row for row in steps.values() if row.phase == "decode"]
        summary: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads((rep_dir / "summary.json").read_text())
        t0 = summary.get("t0_unix_s")
        if t0 is not None and dec:
            t_a, t_b = t0 + dec[0].t_start_s, t0 + dec[-1].t_start_s + dec[-1].latency_s
            for n in names:
                pr.decode_disk_bytes.setdefault(n, []).append(sampler.io_between(n, t_a, t_b) / len(dec))
        pr.token_latencies_s += [row.latency_s for row in dec]
        if not pr.measured_spans:
            pr.measured_spans = spans_from_chrome_trace(rep_dir / "trace.json")
            pr.measured_steps = [(row.token, row.phase, row.batch_tokens, row.t_start_s,
                                  row.t_start_s + row.latency_s) for row in steps.values()]  # fmt: skip
            pr.prompt_tokens_measured = int(summary.get("prompt_tokens") or 0)
        self.say(f"{pr.label} rep {r}: TPOT {s['tpot_s'] * 1e3:.1f} ms, TTFT {s['ttft_s'] * 1e3:.0f} ms")

    def _run_once(self, plan: Plan, shard_dir: Path, hosts_file: Path, cluster_file: Path, plan_file: Path,
                  rep_dir: Path, wl: Workload, env: dict[str, str]) -> str:  # fmt: skip
        """One real run; returns '' or what went wrong."""
        rep_dir.mkdir(parents=True, exist_ok=True)
        workers: dict[str, subprocess.Popen[bytes]] = {}
        prefetch = [] if self.sc.run.prefetch else ["--no-prefetch"]
        prefetch += (
            ["--link-latency", self.latency_env] if self.latency_env else []
        )  # head and workers take it
        batch = str(wl.n_ubatch)
        try:
            for d in plan.devices[1:]:
                cmd = _cli("worker", "--hosts", str(hosts_file), "--device", d.name, "--shards", str(shard_dir / d.name),
                           "--cluster", str(cluster_file), "--batch", batch, "--no-verify", "--log-level", "INFO",
                           *prefetch)  # fmt: skip
                workers[d.name] = self.spawn_in(d.name, cmd, rep_dir / f"{d.name}.log", env)
            cmd = _cli("run", "--real", "--plan", str(plan_file), "--shards", str(shard_dir), "--hosts", str(hosts_file),
                       "--cluster", str(cluster_file), "--prompt", self.sc.workload.prompt, "-n", str(wl.decode_tokens + 1),
                       "--ignore-eos", "--batch", batch, "--timeout", str(WORKER_SILENCE_S), "--startup-timeout",
                       str(STARTUP_TIMEOUT_S), "--out", str(rep_dir), "--json", *prefetch)  # fmt: skip
            head = self.spawn_in(plan.head, cmd, rep_dir / f"{plan.head}.log", env)
            t_end = time.monotonic() + HEAD_TIMEOUT_S
            dead: dict[str, float] = {}
            while (rc := head.poll()) is None:
                if time.monotonic() > t_end:
                    stop(head, 1.0)
                    return f"the run did not finish in {HEAD_TIMEOUT_S:g} s"
                for (
                    n,
                    p,
                ) in workers.items():  # the head cannot know of a worker that died before its first heartbeat
                    if p.poll() is not None and n not in dead:
                        dead[n] = time.monotonic()
                if dead and time.monotonic() - min(dead.values()) > WORKER_GRACE_S:
                    stop(head, 1.0)
                    n = min(dead, key=dead.__getitem__)
                    return (f"worker {n} exited with status {workers[n].returncode} while the head was running: "
                            f"{_tail(rep_dir / f'{n}.log', 400)}")  # fmt: skip
                time.sleep(0.2)
            deadline = time.monotonic() + 10
            for p in workers.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if rc != 0 or not (rep_dir / "tokens.csv").is_file():
                why = _tail(rep_dir / f"{plan.head}.log")
                for n, p in workers.items():
                    if p.poll() not in (0, None):
                        why += f"; worker {n} exited {p.returncode}: {_tail(rep_dir / f'{n}.log', 300)}"
                return f"head exited {rc}: {why}"
            return ""
        finally:
            for p in workers.values():
                stop(p, 1.0)

    # --- runtime baseline -----------------------------------------------------------------------------------
    def runtime_footprint(self, model_path: Path) -> tuple[int, int]:
        """(runtime, vocabulary) anonymous bytes of the executor, measured in the first device's cgroup.

        runtime: an idle worker process (interpreter, numpy, ZeroMQ, llama.cpp initialised), before any model;
        vocabulary: what loading the model's tokenizer adds (llama.cpp's vocab structures; the head loads it
        once, with its logits window). Neither is in the cost model's pinned
        memory (KV cache and compute buffers), and on a device of a few hundred MiB they decide whether a window
        fits: see :func:`executor_overhead`.
        """
        d = self.ring[0].name
        g = self.groups[d]
        code = (
            "import sys, time\n"
            "import prima_sim.exec.worker, prima_sim.exec.head, zmq\n"
            "import prima_sim.exec.llamacpp as l\n"
            "rt = l._Runtime.get()\n"
            "print('runtime', flush=True)\n"
            "sys.stdin.readline()\n"
            "p = rt.lc.llama_model_default_params(); p.vocab_only = True\n"
            "m = rt.lc.llama_model_load_from_file(sys.argv[1].encode(), p)\n"
            "print('vocab' if m else 'failed', flush=True)\n"
            "sys.stdin.readline()\n"
        )
        logf = self.out / "logs" / "runtime-footprint.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        cg.drop_caches()
        proc = spawn([sys.executable, "-c", code, str(model_path)], procs_files=g.procs_files(),
                     netns=self.net.nodes[d].ns if self.net else None, env=_python_env(), stdout=subprocess.PIPE,
                     stderr=logf.open("wb"), cwd=self.work, stdin=subprocess.PIPE)  # fmt: skip
        self.reg.add("process", f"{d} pid {proc.pid}", lambda: stop(proc, 1.0))
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != b"runtime":
                return 0, 0
            time.sleep(0.2)
            runtime = int(g.memory_stat().get("anon", 0))
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != b"vocab":
                return runtime, 0
            time.sleep(0.2)
            vocab = max(0, int(g.memory_stat().get("anon", 0)) - runtime)
            return runtime, vocab
        except (OSError, BrokenPipeError):
            return 0, 0
        finally:
            stop(proc, 1.0)


def executor_overhead(runtime: int, vocab: int, is_head: bool) -> int:
    """Anonymous memory the executor's process holds on a device beyond the cost model's pinned memory (KV
    cache, compute buffers): the Python runtime, and on the head the tokenizer (its logits window's shard
    carries it and embeds too; a head that does not run the last layer has ``embed.gguf`` instead)."""
    return runtime + (vocab if is_head else 0)


def with_executor_overhead(prof: DeviceProfile, limit: int, overhead: int, is_head: bool) -> DeviceProfile:
    """``prof`` with the memory the model may use once the executor runs: the cgroup limit minus the executor's
    own footprint (the profiler measured the limit minus *its* footprint, a different process)."""
    avail = max(0, min(prof.ram_total_bytes, limit) - overhead)
    note = (f"{avail / 2**20:.1f} MiB: the device's memory limit {limit / 2**20:.0f} MiB minus the executor's own "
            f"anonymous memory {overhead / 2**20:.1f} MiB (Python runtime" + (" and two tokenizer copies" if is_head else "")
            + f", measured by prima-sim emulate); the profiler measured {prof.ram_available_bytes / 2**20:.1f} MiB "
            f"with its own process resident")  # fmt: skip
    return prof.model_copy(
        update={"ram_available_bytes": avail, "sources": {**prof.sources, "ram_available_bytes": note}}
    )


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
    reg = Registry()
    with reg:
        em = _Emulation(sc, opts, reg)
        em.setup_disk(model_path.stat().st_size)
        em.setup_devices()
        profiles = em.profile_devices(model_path, model)
        if opts.calibrate_decode:
            profiles = em.calibrate_decode(model_path, model, profiles)
        em.raw_profiles = dict(profiles)
        runtime_anon, vocab_anon = em.runtime_footprint(model_path)
        baseline_anon = runtime_anon
        if runtime_anon:
            say(
                f"executor footprint: {runtime_anon / 2**20:.1f} MiB runtime, {vocab_anon / 2**20:.1f} MiB per tokenizer copy"
            )
            for d in em.ring:
                ov = executor_overhead(runtime_anon, vocab_anon, d.name == sc.head_name)
                profiles[d.name] = with_executor_overhead(
                    profiles[d.name], d.memory, ov, d.name == sc.head_name
                )
        em.overheads = (runtime_anon, vocab_anon)
        links, checks = em.measure_links()
        ring_names = [d.name for d in em.ring]
        cluster = Cluster(
            name=sc.name, description=f"emulated on {socket.gethostname()} (prima-sim emulate, run {reg.run_id})",
            devices=tuple(profiles[n] for n in ring_names), head=sc.head_name,
            default_link=LinkSpec(bandwidth_bps=sc.network.bandwidth, latency_s=sc.network.latency), links=tuple(links),
        )  # fmt: skip
        dump_model(cluster, em.out / "cluster.json")
        plans = em.make_plans(cluster, model, wl)
        for pr in plans:
            if pr.plan is None:
                say(f"{pr.label}: {pr.error}")
                continue
            em.simulate(pr, model, wl)
            say(f"{pr.label}: k={pr.plan.k} windows {list(pr.plan.windows)} on {', '.join(d.name for d in pr.plan.devices)}; "
                f"analytic TPOT {pr.analytic_tpot_s * 1e3:.1f} ms, simulated {pr.sim_tpot_s * 1e3:.1f} ms")  # fmt: skip
        runnable = [pr for pr in plans if pr.plan is not None and not pr.error]
        if opts.run_real:
            try:
                for pr in runnable:
                    em.prepare_plan(pr, model_path)
                # repetitions interleave the plans (r0 of every plan, then r1, ...), so that a slow period of the
                # host slows every plan alike instead of one plan's repetitions
                for r in range(reps):
                    for pr in runnable:
                        em.run_rep(pr, wl, r, model)
            finally:
                for pr in runnable:
                    em.finish_plan(pr)
            if em.run_probes:
                rates = {k: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
                         for k, v in em.run_probes.items()}  # fmt: skip
                for k, (lay, outr) in rates.items():
                    say(f"calibration during the runs, {k}: layers {lay / 1e9:.2f} GB/s, output head {outr / 1e9:.2f} "
                        f"GB/s (median of {len(em.run_probes[k])} probes)")  # fmt: skip
                for pr in runnable:
                    if pr.rep_tpot_s:
                        em.predict_at_run(pr, model, wl, rates)
    host = socket.gethostname()
    date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    rows = [
        rep.make_row(sc, model_path, model, wl, pr, reps, host, date, reg.run_id, baseline_anon)
        for pr in plans
    ]
    csv_path = None
    pngs: list[Path] = []
    if not opts.run_real:
        for row in rows:
            row["status"] = "not run"
    if rows and opts.run_real:
        csv_path = rep.append_rows(opts.reports_dir / opts.csv_name, rows)
        atomic_write_text(em.out / "rows.json", json.dumps(rows, indent=2, default=str) + "\n")
        if opts.plots:
            pngs = rep.scenario_plots(sc.name, plans, opts.reports_dir)
    atomic_write_text(em.out / "links.json", json.dumps(checks, indent=2) + "\n")
    return EmulationResult(sc, reg.run_id, em.out, model_path, model, cluster, wl, plans, rows, csv_path, pngs, checks,
                           time.monotonic() - t_start, em.notes)  # fmt: skip
