#!/usr/bin/env python3
"""Side by side with the real peers (issue 15): prima.cpp's ring, prima-sim's ring, one stock llama.cpp process
and llama.cpp's own RPC split, on the same emulated devices, plans and model, interleaved, with prima-sim's
prediction of each.

    sudo flock -x /tmp/prima-cpu.lock python benchmarks/bench_peers.py --prima-build /tmp/primacpp \
        --rpc-build /tmp/llamarpc/build/bin

Needs root (the emulation's cgroups, namespaces and loop disk: docs/emulation.md) and a prima.cpp build
directory holding ``llama-cli`` (docs/peers.md says how to fetch and build it). Without ``--prima-build`` the
prima.cpp rows are ``skipped`` and the rest still runs. Writes ``reports/peers.csv`` (one row per scenario and
system) and ``reports/peers.png``; everything else (profiles, plans, simulations, every process's log, and per group
``predict-inputs.json``: what predicting again needs) goes to ``--out``.

    python benchmarks/bench_peers.py --repredict OUT [--run-log LOG]

predicts the systems of a finished run again with the current code (seconds, no root, nothing runs) and rewrites
``peers.csv`` and ``peers.png`` with the run's measurements (:meth:`Bench.repredict`).

Systems:
* ``prima.cpp``: its ``llama-cli`` per device (rank r in device r's cgroup and namespace), the whole GGUF on the
  emulated disk, manual windows ``-lw`` (the command lines of ``prima-sim plan --emit prima.cpp``), ``--prefetch``.
  TPOT = its own ``eval time`` per run (a mean), TTFT = its ``prompt eval time``.
  Predicted by the simulator as prima.cpp: ``--prima-prefetch`` (one capped WILLNEED per window, the window
  advised again at k = 1), starting cold (prima.cpp maps without populating).
* ``prima-sim``: this project's ring (shards, ZeroMQ, prefetch in pieces), exactly as ``prima-sim emulate`` runs
  it. TPOT = median decode step.
* ``llama.cpp``: one stock llama.cpp process (llama-cpp-python, ``prima_sim.exec.stock``) over the whole GGUF in
  the head device (its memory, CPU and disk limits). Predicted as the whole model on that device.
* ``llama.cpp rpc``: llama.cpp's own RPC split (``GGML_RPC=ON``, built by ``benchmarks/peers_build_rpc.sh`` from
  the llama.cpp that llama-cpp-python vendors; ``--rpc-build``): a ``ggml-rpc-server`` in every device but the
  head (its cgroup and namespace), the head's ``llama-completion`` with ``--rpc`` and ``--tensor-split`` of the
  plan's windows (k = 1 plans only: the row is ``skipped`` at k >= 2; ``prima_sim.peers.llamacpp_rpc_commands``).
  The servers hold their layers in anonymous memory (received over the network, never mapped); the head keeps
  its window (moved to the front: llama.cpp's CPU layers are the first ones), the embeddings and the output head,
  mapped. TPOT = its ``eval time`` per run (a mean over the decode steps), TTFT = ``prompt eval time``.
  Predicted (:meth:`Bench.predict_rpc`) as a k = 1 ring with the plan's windows whose servers never page
  (infeasible where a server's window, KV cache and buffers exceed its memory limit) and whose hops between two
  servers go through the head (the star: activations come back to the head between devices).

Scenarios (a generated Llama-3-1B-shape Q4_0 model, 16 layers, 0.69 GB, SmolLM2's vocabulary; three devices of
one thread; the sums of the disk limits stay below the physical disk):
fits, starved k = 1, starved k = 2 with prefetch, larger than all memory, a slow link (bandwidth only: the
emulation adds link latency in prima-sim's receivers, which prima.cpp does not have, so the slow link here has
none added), and the slow link with one round (group ``slowlink-k1``: the only shape the RPC split runs there).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import itertools
import json
import math
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prima_sim.devices.cluster import Cluster, Link, LinkSpec  # noqa: E402
from prima_sim.devices.model import model_profile_from_gguf  # noqa: E402
from prima_sim.emulate import calibrate as cal_mod  # noqa: E402
from prima_sim.emulate import cgroups as cg  # noqa: E402
from prima_sim.emulate.disk import with_read_limits  # noqa: E402
from prima_sim.emulate.emulator import EmulateOptions  # noqa: E402
from prima_sim.emulate.links import measure_links  # noqa: E402
from prima_sim.emulate.memory import MemorySampler  # noqa: E402
from prima_sim.emulate.models import count_prompt_tokens, ensure_model  # noqa: E402
from prima_sim.emulate.predict import make_plans, simulate_plan  # noqa: E402
from prima_sim.emulate.records import PlanPrediction  # noqa: E402
from prima_sim.emulate.runs import RunSupervisor  # noqa: E402
from prima_sim.emulate.scenario import Scenario  # noqa: E402
from prima_sim.emulate.spawn import log_tail, stop  # noqa: E402
from prima_sim.emulate.testbed import Testbed  # noqa: E402
from prima_sim.errors import PrimaSimError  # noqa: E402
from prima_sim.exec.stock import parse_json_output  # noqa: E402
from prima_sim.halda.costmodel import DeviceCosts, memory_use  # noqa: E402
from prima_sim.halda.planner import manual_plan  # noqa: E402
from prima_sim.peers import llamacpp_rpc_commands, parse_llama_perf, primacpp_commands  # noqa: E402
from prima_sim.plan import Plan  # noqa: E402
from prima_sim.schema import dump_model  # noqa: E402
from prima_sim.sim import SimConfig, simulate  # noqa: E402
from prima_sim.workload import Workload  # noqa: E402

MODEL = {"layers": 16, "embd": 2048, "ff": 8192, "heads": 32, "kv_heads": 8, "quant": "Q4_0"}
PROMPT = "The history of the printing press begins in the fifteenth century, when"
SYSTEMS = ("prima.cpp", "prima.cpp --force", "prima-sim", "llama.cpp", "llama.cpp rpc")
RPC_SYSTEM = "llama.cpp rpc"
RPC_SERVER_RUNTIME_BYTES = 4 * 2**20
"""ggml-rpc-server's own memory beyond the buffers it is asked for. Measured on loopback (SmolLM2, 12 layers):
RssAnon 29.1 MiB for 29.06 MiB of weight, KV and compute buffers (0.7 MiB before the client came); the allowance
is for what its cgroup is charged besides (its binary's pages, socket buffers). Checked against the measured
``anon_peak_mib`` of its devices."""
PRIMA_TIMEOUT_S = 600.0
CSV_COLUMNS = [
    "scenario", "system", "devices", "windows", "k", "reps", "status",
    "tpot_meas_s", "tpot_meas_min_s", "tpot_meas_max_s", "ttft_meas_s",
    "tpot_pred_s", "ttft_pred_s", "tpot_err_pct", "ttft_err_pct", "tpot_pred_profile_s", "anon_peak_mib",
    "disk_mib_per_token_meas", "disk_mib_per_token_pred",
    "tpot_vs_primacpp", "ttft_vs_primacpp", "predicted_as", "error", "host", "date", "command",
    "disk_mib_per_token_meas_dev", "disk_mib_per_token_pred_dev", "anon_decode_mib", "active_file_mib_end",
]  # fmt: skip


def devices(n: int, memory: str, disk: str) -> list[dict[str, Any]]:
    return [{"name": f"D{i}", "memory": memory, "threads": 1, "disk_read": disk} for i in range(n)]


# groups of cases that share devices (one emulation set-up each): (name, scenario dict, [(case, windows)])
# a case may add True: prima.cpp also runs with --force
GROUPS: list[tuple[str, dict[str, Any], list[tuple[Any, ...]]]] = [
    ("fits", {"devices": devices(3, "512 MiB", "400 MB/s"), "network": {"bandwidth": "1 Gbit/s"}},
     [("fits", [6, 5, 5])]),
    ("starved", {"devices": devices(3, "224 MiB", "200 MB/s"), "network": {"bandwidth": "1 Gbit/s"}},
     [("starved-k1", [4, 6, 6]), ("starved-k2-prefetch", [2, 3, 3], True)]),
    ("larger", {"devices": devices(3, "200 MiB", "250 MB/s"), "network": {"bandwidth": "1 Gbit/s"}},
     [("larger-than-memory", [6, 5, 5])]),
    ("slowlink", {"devices": devices(3, "512 MiB", "400 MB/s"), "network": {"bandwidth": "20 Mbit/s"}},
     [("slow-link", [3, 3, 2])]),
    # the slow link with one round, the only shape llama.cpp's RPC split runs (it sends every server its layers
    # over the link at load: about 2.5 minutes per run at 20 Mbit/s for this model)
    ("slowlink-k1", {"devices": devices(3, "512 MiB", "400 MB/s"), "network": {"bandwidth": "20 Mbit/s"}},
     [("slow-link-k1", [6, 5, 5])]),
]  # fmt: skip


@dataclass
class Row:
    scenario: str
    system: str
    devices: str
    windows: list[int]
    k: int
    tpot: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tpot_pred: float = math.nan
    ttft_pred: float = math.nan
    predicted_as: str = ""
    errors: list[str] = field(default_factory=list)
    command: str = ""
    skipped: str = ""
    tpot_pred_before: float = math.nan
    anon_peak: dict[str, int] = field(default_factory=dict)
    read_meas: list[float] = field(default_factory=list)  # bytes read per decode step, all devices
    read_pred: float = math.nan
    kind: str = ""  # which system runs it: prima.cpp, prima.cpp --force, prima-sim, stock, llama.cpp rpc
    label: str = ""  # the plan's label (single-D0 for the stock process)
    # per rep: bytes per decode step, per device
    read_meas_dev: list[dict[str, float]] = field(default_factory=list)
    read_pred_dev: dict[str, float] = field(default_factory=dict)
    # per device: the highest anonymous memory sampled during the timed decode steps
    anon_decode: dict[str, int] = field(default_factory=dict)
    tpot_median: float = math.nan  # the median of tpot when the repetitions are not all known (a rebuilt row)
    # per rep and device: the file LRU lists after the run, refaults and major faults during it (lists_at_stop)
    lists_end: list[dict[str, dict[str, int]]] = field(default_factory=list)

    def tpot_meas(self) -> float:
        """The median measured TPOT."""
        return self.tpot_median if math.isfinite(self.tpot_median) else median(self.tpot)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def willneed_cap(device: str) -> int:
    """What one WILLNEED reads at most on ``device`` (/dev/loopN): max(max_sectors_kb, 2 x read_ahead_kb) --
    prima.cpp's POSIX_FADV_SEQUENTIAL doubles the file's readahead window (mm/readahead.c force_page_cache_ra)."""
    q = Path("/sys/block") / Path(device).name / "queue"
    try:
        return max(int((q / "max_sectors_kb").read_text()), 2 * int((q / "read_ahead_kb").read_text())) * 1024
    except (OSError, ValueError):
        return 1280 * 1024


def listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in the network namespace of process ``pid``."""
    for name in ("tcp", "tcp6"):
        try:
            lines = (Path("/proc") / str(pid) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) > 3 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def group_scenario(
    name: str, spec: dict[str, Any], cases: list[tuple[Any, ...]], tokens: int, reps: int
) -> Scenario:
    """The emulation scenario of one group of :data:`GROUPS`: its devices, its manual plans and the stock process
    in D0."""
    return Scenario.model_validate({
        "name": f"peers-{name}", "model": MODEL,
        "workload": {"prompt": PROMPT, "decode_tokens": tokens, "repetitions": reps, "n_ctx": 256, "batch": 64},
        "run": {"schedulers": [], "manual": [{"label": c[0], "windows": c[1]} for c in cases], "single": ["D0"],
                "prefetch": True, "omp_wait_policy": "passive"},
        **spec,
    })  # fmt: skip


def sim_reads(res: Any) -> tuple[float, dict[str, float]]:
    """Bytes a simulation read per decode token: in all, and per device."""
    per = {n: float(st.get("sim_disk_bytes_per_decode_token", 0.0)) for n, st in res.device_stats.items()}
    return sum(per.values()), per


def probe_for(model: Any) -> cal_mod.ProbeShards:
    """What :func:`~prima_sim.emulate.calibrate.with_rates` needs of the calibration's shards (the output head's
    bytes and the types no layer uses), as :func:`~prima_sim.emulate.calibrate.write_probe_shards` finds them,
    without writing any shard."""
    from prima_sim.halda.costmodel import output_tensors

    out_t = output_tensors(model)
    layer_types = {
        t.ggml_type for i in range(model.arch.n_layer) for t in model.layer_tensors(i) if len(t.shape) > 1
    }
    return cal_mod.ProbeShards(layers=Path(), head=Path(), n_layers=0, layer_bytes=0,
                               out_bytes=sum(t.n_bytes for t in out_t),
                               extra_types=tuple(sorted({t.ggml_type for t in out_t if len(t.shape) > 1} - layer_types)),
                               model=model.id)  # fmt: skip


def run_rates_cluster(cluster: Cluster, key_of: dict[str, str], probe: cal_mod.ProbeShards | None,
                      rates: dict[str, tuple[float, float]]) -> Cluster:  # fmt: skip
    """``cluster`` with the streaming rates measured around the runs (as ``prima-sim emulate`` does): device ``d``
    takes the rates of ``key_of[d]`` (the device whose calibration it shares)."""
    devs = []
    for d in cluster.devices:
        k = key_of.get(d.name)
        if k is not None and k in rates:
            lay, outr = rates[k]
            devs.append(
                cal_mod.with_rates(
                    d, probe, lay, outr, f"{lay / 1e9:.2f} GB/s: llama.cpp, measured around the runs"
                )
            )
        else:
            devs.append(d)
    return cluster.model_copy(update={"devices": tuple(devs)})


INPUTS_FILE = "predict-inputs.json"
"""Per group under ``--out``: what predicting its systems again needs besides the cluster and the plans that the
run leaves there (``--repredict``)."""
KINDS = {"prima.cpp": "prima.cpp", "prima.cpp --force": "prima.cpp --force", "prima-sim": "prima-sim",
         "llama.cpp": "stock", RPC_SYSTEM: RPC_SYSTEM}  # fmt: skip


def save_inputs(path: Path, group: str, bench: Bench, wl: Workload, cap: int, rates: dict[str, tuple[float, float]],
                key_of: dict[str, str], probe: cal_mod.ProbeShards | None, rows: list[Row]) -> None:  # fmt: skip
    """Write ``path`` (:data:`INPUTS_FILE`): the workload, the WILLNEED cap, the rates measured around the runs,
    which device shares whose rates, the probe's output-head facts, and every row with its measurements (bytes,
    not MiB) and predictions."""
    obj = {
        "version": 1, "group": group, "host": bench.host, "date": bench.date,
        "workload": {"n_ctx": wl.n_ctx, "prompt_tokens": wl.prompt_tokens, "decode_tokens": wl.decode_tokens,
                     "n_ubatch": wl.n_ubatch},
        "willneed_cap_bytes": cap, "rates": {k: list(v) for k, v in rates.items()}, "key_of": dict(key_of),
        "probe": None if probe is None else {"out_bytes": probe.out_bytes, "extra_types": list(probe.extra_types)},
        "rows": [dataclasses.asdict(r) for r in rows],
    }  # fmt: skip
    path.write_text(json.dumps(obj, indent=1))


def legacy_rows(csv_rows: list[dict[str, str]], cases: list[tuple[Any, ...]]) -> list[Row]:
    """Rows of a run that saved no :data:`INPUTS_FILE` (before 2026-12-07 12:00), rebuilt from its peers.csv: the
    medians, fastest and slowest repetition (so the medians stay exact), the anonymous memory in whole MiB (the
    CSV's rounding: the rooms are off by up to 0.5 MiB), the median bytes read; no per-device reads."""
    labels = {c[0] for c in cases}
    out = []
    for c in csv_rows:
        if c["scenario"] not in labels or c["system"] not in KINDS:
            continue
        n = int(c["reps"] or 0)
        med, lo, hi = (float(c[k]) for k in ("tpot_meas_s", "tpot_meas_min_s", "tpot_meas_max_s"))
        tpot = [] if n == 0 else [med] if n == 1 else [lo] + [med] * (n - 2) + [hi]
        kind = KINDS[c["system"]]
        r = Row(c["scenario"], c["system"], c["devices"], [int(x) for x in c["windows"].split(",")], int(c["k"]),
                tpot=tpot, ttft=[float(c["ttft_meas_s"])] * n, command=c.get("command", ""), kind=kind, tpot_median=med,
                label="single-D0" if kind == "stock" else c["scenario"])  # fmt: skip
        meas = float(c["disk_mib_per_token_meas"] or "nan")
        r.read_meas = [meas * 2**20] if math.isfinite(meas) else []
        r.anon_peak = {k: int(v) * 2**20 for k, v in (x.split(":") for x in c["anon_peak_mib"].split())}
        r.anon_decode = {
            k: int(v) * 2**20 for k, v in (x.split(":") for x in c.get("anon_decode_mib", "").split())
        }
        if c["status"] == "skipped":
            r.skipped = c["error"]
        elif c["error"]:
            r.errors = [e for e in c["error"].split("; ") if not e.startswith("predict:")]
        out.append(r)
    return out


def legacy_log(log: Path | None, group: str) -> tuple[int, dict[str, tuple[float, float]]]:
    """The WILLNEED cap and the rates measured around the runs of ``group``, from the run's printed log (as
    ``Bench.say`` printed them: KiB, GB/s to two decimals); (1280 KiB, no rates) without a log."""
    cap, rates = 1280 * 1024, dict[str, tuple[float, float]]()
    if log is None:
        return cap, rates
    for ln in log.read_text(errors="replace").splitlines():
        m = re.search(rf"\] {re.escape(group)}: one WILLNEED reads at most (\d+) KiB", ln)
        if m:
            cap = int(m.group(1)) * 1024
        m = re.search(rf"\] {re.escape(group)}: rates during the runs \((\w+)\): layers ([\d.]+) GB/s, output head "
                      r"([\d.]+) GB/s", ln)  # fmt: skip
        if m:
            rates[m.group(1)] = (float(m.group(2)) * 1e9, float(m.group(3)) * 1e9)
    return cap, rates


def star_links(cluster: Cluster, ring: list[str]) -> Cluster:
    """``cluster`` with the link between every two consecutive non-head devices of ``ring`` (head first) replaced
    by the path through the head (latencies add, transfer times add): llama.cpp's RPC client moves every
    activation between two servers through itself."""
    head, links = ring[0], list(cluster.links)
    for a, b in itertools.pairwise(ring[1:]):
        la, lb = cluster.link(a, head), cluster.link(head, b)
        bw = 1.0 / (1.0 / la.bandwidth_bps + 1.0 / lb.bandwidth_bps)
        links = [lk for lk in links if {lk.a, lk.b} != {a, b}]
        links.append(Link(a=a, b=b, bandwidth_bps=bw, latency_s=la.latency_s + lb.latency_s))
    return cluster.model_copy(update={"links": tuple(links)})


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.host = socket.gethostname()
        self.date = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
        self.prima = Path(args.prima_build) / "llama-cli" if args.prima_build else None
        self.prima_why = ""
        if self.prima is None:
            self.prima_why = "no --prima-build given"
        elif not self.prima.is_file():
            self.prima_why = f"{self.prima} not found"
            self.prima = None
        self.rpc = Path(args.rpc_build) if args.rpc_build else None
        self.rpc_why = ""
        if self.rpc is None:
            self.rpc_why = "no --rpc-build given (benchmarks/peers_build_rpc.sh builds it)"
        elif not all((self.rpc / b).is_file() for b in ("ggml-rpc-server", "llama-completion")):
            self.rpc_why = f"{self.rpc} holds no ggml-rpc-server and llama-completion"
            self.rpc = None

    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def run_group(self, name: str, spec: dict[str, Any], cases: list[tuple[Any, ...]]) -> None:
        a = self.args
        sc = group_scenario(name, spec, cases, a.tokens, a.reps)
        out = Path(a.out) / name
        opts = EmulateOptions(out_dir=out, decode_tokens=a.tokens, repetitions=a.reps, quick_profile=a.quick_profile,
                                     profile_repeats=a.profile_repeats, calibrate_runs=not a.no_run_calibration, plots=False, on_progress=self.say)  # fmt: skip
        model_path = ensure_model(sc.model, log=self.say)
        model = model_profile_from_gguf(model_path)
        n_prompt = count_prompt_tokens(model_path, PROMPT)
        wl = Workload(n_ctx=256, prompt_tokens=n_prompt, decode_tokens=a.tokens, n_ubatch=64)
        mem = (
            "3 x "
            + spec["devices"][0]["memory"]
            + ", "
            + spec["devices"][0]["disk_read"]
            + ", "
            + spec["network"]["bandwidth"]
        )
        out.mkdir(parents=True, exist_ok=True)
        n_plans = len(sc.run.schedulers) + len(sc.run.manual) + len(sc.run.single)
        with Testbed(sc, out / "work", model_bytes=model_path.stat().st_size, n_plans=n_plans,
                     say=self.say) as tb:  # fmt: skip
            cache = Path(a.profile_cache) if a.profile_cache else None
            cal = cal_mod.Calibrator(
                tb, out, quick=opts.quick_profile, repeats=opts.profile_repeats, cache=cache, say=self.say
            )
            profiles = cal.profile_devices(model_path, model)
            profiles = cal.calibrate_decode(model_path, model, profiles)
            raw_profiles = dict(profiles)
            fp = cal.runtime_footprint(model_path)
            for d in tb.ring:
                ov = cal_mod.executor_overhead(fp, d.name == sc.head_name)
                profiles[d.name] = cal_mod.with_executor_overhead(
                    profiles[d.name], d.memory, ov, d.name == sc.head_name
                )
            links, _ = measure_links(tb, out, self.say)
            cluster = Cluster(name=sc.name, devices=tuple(profiles[d.name] for d in tb.ring), head=sc.head_name,
                              default_link=LinkSpec(bandwidth_bps=sc.network.bandwidth, latency_s=0.0),
                              links=tuple(links))  # fmt: skip
            cluster = with_read_limits(cluster, sc)
            dump_model(cluster, out / "cluster.json")
            plans = make_plans(sc, cluster, model, wl, out, raw_profiles=raw_profiles,
                               overheads=fp)  # fmt: skip
            runs = RunSupervisor(tb, cal, out, raw_profiles, calibrate_runs=opts.calibrate_runs, say=self.say)
            whole = (
                tb.work / "model.gguf"
            )  # the unsplit GGUF on the emulated disk (prima.cpp, stock llama.cpp)
            shutil.copyfile(model_path, whole)
            # One copy per prima.cpp rank, as on separate machines: ranks mapping one file on one host share its
            # page cache across their cgroups (a page is charged to the cgroup that read it first, and a page
            # another rank keeps referencing stays active in the cgroup that holds it), so in a paging scenario
            # three 200 MiB devices would cache one shared 600 MB file like a 600 MiB device (measured: 274 MiB
            # read per token over one shared file against 600 over prima-sim's per-device shards).
            copies = {d.name: tb.work / f"model-{d.name}.gguf" for d in tb.ring}
            for dst in copies.values():
                shutil.copyfile(model_path, dst)
            assert tb.disk is not None
            cap = willneed_cap(tb.disk.device)
            self.say(f"{name}: one WILLNEED reads at most {cap // 1024} KiB on {tb.disk.device}")
            jobs: list[tuple[Row, Any]] = []
            for i, pr in enumerate(plans):
                if pr.plan is None:
                    raise SystemExit(f"{pr.label}: {pr.error}")
                # a new record with the simulation (PlanPrediction is frozen)
                plans[i] = pr = simulate_plan(pr, sc, model, wl, out)
                if pr.label.startswith("single"):
                    r = Row(cases[0][0], "llama.cpp", mem + "; one process in D0", [model.arch.n_layer], 1,
                            kind="stock", label=pr.label)  # fmt: skip
                    self.predict_from_profiles(r, sc, pr, model, wl, cap)
                    self.rows.append(r)
                    jobs.append((r, ("stock", pr)))
                    continue
                plan = pr.plan
                assert plan is not None  # simulate_plan keeps the plan checked above
                r_ps = Row(
                    pr.label, "prima-sim", mem, list(plan.windows), plan.k, kind="prima-sim", label=pr.label
                )
                r_pc = Row(
                    pr.label, "prima.cpp", mem, list(plan.windows), plan.k, kind="prima.cpp", label=pr.label
                )
                made = [r_pc, r_ps]
                jobs += [(r_pc, ("prima.cpp", pr)), (r_ps, ("prima-sim", pr))]
                if any(c[0] == pr.label and len(c) > 2 and c[2] for c in cases):
                    r_f = Row(pr.label, "prima.cpp --force", mem, list(plan.windows), plan.k,
                              kind="prima.cpp --force", label=pr.label)  # fmt: skip
                    made.append(r_f)
                    jobs.append((r_f, ("prima.cpp --force", pr)))
                r_rpc = Row(
                    pr.label, RPC_SYSTEM, mem, list(plan.windows), plan.k, kind=RPC_SYSTEM, label=pr.label
                )
                made.append(r_rpc)
                if plan.k == 1:
                    jobs.append((r_rpc, (RPC_SYSTEM, pr)))
                for r in made:
                    self.predict_from_profiles(r, sc, pr, model, wl, cap)
                self.rows += made
                self.say(f"{pr.label}: predicted TPOT prima-sim {r_ps.tpot_pred * 1e3:.0f} ms, prima.cpp "
                         f"{r_pc.tpot_pred * 1e3:.0f} ms, llama.cpp rpc {r_rpc.tpot_pred * 1e3:.0f} ms")  # fmt: skip
            for pr in plans:
                if not pr.label.startswith("single"):
                    runs.prepare_plan(pr, model_path)
            try:
                for rep in range(a.reps):
                    for row, (kind, pr) in jobs:
                        if kind == "prima-sim":
                            m = runs.run_rep(pr, wl, rep)
                            if m is not None and m.ok:
                                row.tpot.append(m.tpot_s)
                                row.ttft.append(m.ttft_s)
                                row.read_meas.append(sum(m.decode_disk_bytes.values()))
                                row.read_meas_dev.append(dict(m.decode_disk_bytes))
                            else:
                                row.errors.append(
                                    f"rep {rep}: {m.error}"
                                    if m is not None
                                    else "an earlier repetition failed"
                                )
                        elif kind.startswith("prima.cpp"):
                            self.run_primacpp(tb, out, row, pr, copies, rep, force=kind.endswith("--force"))
                        elif kind == RPC_SYSTEM:
                            self.run_rpc(tb, out, row, pr, copies, rep)
                        else:
                            self.run_stock(tb, out, row, whole, rep)
            finally:
                for pr in plans:
                    runs.finish_plan(pr)
            # Predict every system again with what the profiles could not know (docs/emulation.md findings 1 and 10):
            # the layers' streaming rate measured by llama.cpp in the devices around prima-sim's runs (this host's
            # memory bandwidth drifts by tens of percent within minutes), and for prima.cpp the room its own
            # processes leave for the page cache (C++, no Python runtime; the planner's cluster has prima-sim's
            # executor footprint). The predictions from the profiles alone stay in tpot_pred_profile_s.
            # layers and output head (the peers' TTFT is not predicted with a calibrated prefill)
            rates = {k: (r.layer_bps, r.out_bps) for k, r in runs.rates_during_runs().items()}
            for k, (lay, outr) in rates.items():
                self.say(
                    f"{name}: rates during the runs ({k}): layers {lay / 1e9:.2f} GB/s, output head {outr / 1e9:.2f} GB/s"
                )
            for row, (_kind, pr) in jobs:
                base = run_rates_cluster(pr.cluster, cal.key_of, cal.probe, rates)
                self.predict_at_run(row, sc, pr, base, model, wl, cap, bool(rates))
            # everything a later --repredict needs to predict again without running anything
            save_inputs(out / INPUTS_FILE, name, self, wl, cap, rates, cal.key_of, cal.probe,
                        [r for r in self.rows if r.scenario in {c[0] for c in cases}])  # fmt: skip

    def repredict(
        self, run_dir: Path, measured: list[dict[str, str]], log: Path | None, model: Any = None
    ) -> list[str]:
        """Predict every system of a finished run (its ``--out``) again with the code as it is now, from what the
        run saved: per group the cluster the plans were made on (``cluster.json``), the plans, and
        :data:`INPUTS_FILE` (the measurements, the rates measured around the runs, the WILLNEED cap). A run from
        before :data:`INPUTS_FILE` existed is rebuilt from its ``peers.csv`` rows (``measured``) and its printed log
        (``log``: the rates and the cap; without it the profiles' rates). Nothing runs; the measurements stay.
        ``model``: the model profile to use instead of the generated GGUF's (tests). Returns notes on what had to
        be rebuilt."""
        notes: list[str] = []
        models: dict[Path, Any] = {}
        for name, spec, cases in GROUPS:
            gdir = run_dir / name
            if not (gdir / "cluster.json").is_file():
                continue
            path = gdir / INPUTS_FILE
            if path.is_file():
                obj = json.loads(path.read_text())
                rows = [Row(**r) for r in obj["rows"]]
                cap = int(obj["willneed_cap_bytes"])
                rates = {k: (float(v[0]), float(v[1])) for k, v in obj["rates"].items()}
                key_of = dict(obj["key_of"])
                prompt_tokens, tokens = obj["workload"]["prompt_tokens"], obj["workload"]["decode_tokens"]
                self.host, self.date = obj["host"], obj["date"]
            else:
                rows = legacy_rows(measured, cases)
                if not rows:
                    notes.append(f"{name}: no {INPUTS_FILE} and no rows of it in the measured CSV: left out")
                    continue
                cap, rates = legacy_log(log, name)
                # the groups' devices are identical: the calibration kept one key (its log names it)
                key_of = {d["name"]: next(iter(rates)) for d in spec["devices"]} if len(rates) == 1 else {}
                first = Plan.load(gdir / "plans" / f"{rows[0].label}.json")
                prompt_tokens = first.prediction.prompt_tokens if first.prediction else 0
                tokens = self.args.tokens
                self.host = next((c["host"] for c in measured if c.get("host")), self.host)
                self.date = next((c["date"] for c in measured if c.get("date")), self.date)
                notes.append(f"{name}: no {INPUTS_FILE} (a run before it existed): measurements from the CSV (anonymous "
                             f"memory in whole MiB, no per-device reads), " + (f"rates and WILLNEED cap from {log}"
                             if rates else "the profiles' rates (no log with the rates measured around the runs)"))  # fmt: skip
            reps = max((len(r.tpot) for r in rows), default=0)
            sc = group_scenario(name, spec, cases, tokens, reps)
            mp = model
            if mp is None:
                gguf = ensure_model(sc.model, log=self.say)
                if gguf not in models:
                    models[gguf] = model_profile_from_gguf(gguf)
                mp = models[gguf]
            probe = probe_for(mp)
            wl = Workload(n_ctx=256, prompt_tokens=prompt_tokens, decode_tokens=tokens, n_ubatch=64)
            # a run saved before its devices' blk-throttled disks were marked (with_read_limits) gets them now
            cluster = with_read_limits(Cluster.model_validate_json((gdir / "cluster.json").read_text()), sc)
            for r in rows:
                plan = Plan.load(gdir / "plans" / f"{r.label}.json")
                cl = cluster
                # make_plans' one-device cluster for the stock process (its device is the head here)
                if r.label.startswith("single-"):
                    dev = r.label.removeprefix("single-")
                    cl = cluster.alone(cluster.device(dev))
                pr = PlanPrediction(r.label, plan, cl)
                r.tpot_pred = r.ttft_pred = r.read_pred = r.tpot_pred_before = math.nan
                r.read_pred_dev, r.predicted_as = {}, ""
                r.errors = [e for e in r.errors if not e.startswith("predict")]
                self.predict_from_profiles(r, sc, pr, mp, wl, cap)
                self.predict_at_run(
                    r, sc, pr, run_rates_cluster(cl, key_of, probe, rates), mp, wl, cap, bool(rates)
                )
                self.rows.append(r)
        return notes

    def predict_from_profiles(
        self, row: Row, sc: Scenario, pr: Any, model: Any, wl: Workload, cap: int
    ) -> None:
        """``row``'s prediction from the profiles alone (the planner's cluster, before anything ran)."""
        kind = row.kind
        if kind in ("prima-sim", "stock"):
            if math.isnan(pr.sim_tpot_s) or kind == "stock":
                try:  # stock llama.cpp leaves its window to the page cache (no streaming)
                    cfg = SimConfig(prefetch=sc.run.prefetch, warm=True, stream=kind != "stock")
                    res = simulate(pr.plan, pr.cluster, model, wl, cfg)
                except PrimaSimError as exc:
                    row.errors.append(f"predict: {exc}")
                    return
                row.tpot_pred, row.ttft_pred = res.tpot_s, res.ttft_s
                row.read_pred, row.read_pred_dev = sim_reads(res)
            else:
                row.tpot_pred, row.ttft_pred = pr.sim_tpot_s, pr.sim_ttft_s
                row.read_pred = pr.sim_disk_bytes_per_token
            row.predicted_as = "simulate (whole model on D0)" if kind == "stock" else "simulate"
        elif kind.startswith("prima.cpp"):
            self.predict_primacpp(row, pr, pr.cluster, model, wl, cap, force=kind.endswith("--force"))
        elif kind == RPC_SYSTEM:
            if pr.plan.k == 1:
                self.predict_rpc(row, sc, pr, pr.cluster, model, wl)
            else:
                row.skipped = (f"k = {pr.plan.k}: llama.cpp's layer split runs every device once per token "
                               "(k = 1 plans only)")  # fmt: skip

    def predict_at_run(self, row: Row, sc: Scenario, pr: Any, base: Cluster, model: Any, wl: Workload, cap: int,
                       run_rates: bool) -> None:  # fmt: skip
        """``row``'s prediction with what was measured while the systems ran: ``base`` is the planner's cluster with
        the streaming rates measured around the runs; prima.cpp's and the RPC head's rooms come from their measured
        anonymous memory (``row.anon_peak``). The prediction from the profiles moves to ``tpot_pred_profile_s``."""
        kind = row.kind
        row.tpot_pred_before = row.tpot_pred
        if kind == RPC_SYSTEM:
            if pr.plan.k != 1:
                return
            head = pr.plan.devices[0].name
            if head in row.anon_peak:  # the head's room: limit - llama-completion's own memory
                base = self.primacpp_cluster(sc, base, pr.plan, model, wl, {head: row.anon_peak[head]})
            self.predict_rpc(row, sc, pr, base, model, wl)
            if head in row.anon_peak:
                row.predicted_as += "; head memory: limit - llama-completion's measured anonymous memory"
        elif kind.startswith("prima.cpp"):
            # the anonymous memory held while decoding (a load-time peak is freed before the page cache fills;
            # measured: D2 of larger-than-memory peaked at 40 MiB, decoded at 32, and kept its whole window)
            anon = row.anon_decode or row.anon_peak
            if anon:
                base = self.primacpp_cluster(sc, base, pr.plan, model, wl, anon)
            self.predict_primacpp(row, pr, base, model, wl, cap, force=kind.endswith("--force"))
            row.predicted_as += (
                "; memory: limit - prima.cpp's measured anonymous memory beyond KV and buffers"
            )
        else:
            try:
                plan = manual_plan(base, model, wl, list(pr.plan.windows))
                res = simulate(
                    plan, base, model, wl, SimConfig(prefetch=True, warm=True, stream=kind != "stock")
                )
                row.tpot_pred, row.ttft_pred = res.tpot_s, res.ttft_s
                row.read_pred, row.read_pred_dev = sim_reads(res)
            except PrimaSimError as exc:
                row.errors.append(f"predict: {exc}")
        if run_rates:
            row.predicted_as += "; rates: measured in the devices during the runs"

    def predict_primacpp(self, row: Row, pr: Any, cluster: Cluster, model: Any, wl: Workload, cap: int,
                         force: bool) -> None:  # fmt: skip
        cfg = SimConfig(  # prima.cpp leaves every window to the page cache (no streaming)
            prefetch=True,
            prefetch_own_window=True,
            willneed_cap_bytes=cap,
            force_touch=force,
            warm=False,
            stream=False,
        )
        try:
            # a plan names the cluster it was made on: the same windows planned on the adjusted cluster
            plan = (
                pr.plan if cluster is pr.cluster else manual_plan(cluster, model, wl, list(pr.plan.windows))
            )
            res = simulate(plan, cluster, model, wl, cfg)
            row.tpot_pred, row.ttft_pred = res.tpot_s, res.ttft_s
            row.read_pred, row.read_pred_dev = sim_reads(res)
        except PrimaSimError as exc:
            row.errors.append(f"predict: {exc}")
        row.predicted_as = (
            f"simulate --prima-{'force' if force else 'prefetch'} --willneed-cap-kib {cap // 1024} --cold"
        )

    def predict_rpc(
        self, row: Row, sc: Scenario, pr: Any, cluster: Cluster, model: Any, wl: Workload
    ) -> None:
        """llama.cpp's RPC split as prima-sim's cost model sees it: the k = 1 ring of the plan's windows, every
        server's window resident (it was sent into anonymous buffers: its memory is its limit less the server's
        own, so the simulator never pages it; infeasible, no prediction, where window + KV cache + buffers do not
        fit: the server is killed loading), hops between servers through the head (:func:`star_links`), no
        prefetch (llama.cpp advises nothing), warm. Not modelled: the per-split RPC commands (a few small messages
        per server per token, about a loopback round trip each here); the head's window is first in llama.cpp
        and last in the plan (same sizes, identical layers here)."""
        plan = pr.plan
        ring = [d.name for d in plan.devices]
        too_big = []
        devs = []
        for d in cluster.devices:
            a = next((x for x in plan.devices if x.name == d.name), None)
            if a is None or d.name == ring[0] or a.window == 0:
                devs.append(d)
                continue
            mu = memory_use(DeviceCosts(d, model, wl), a, False)
            need = mu.weights_cpu + mu.kv_cpu + mu.buffers_cpu + RPC_SERVER_RUNTIME_BYTES
            limit = sc.device(d.name).memory
            if need > limit:
                too_big.append(
                    f"{d.name} needs {need / 2**20:.0f} MiB resident, its limit is {limit / 2**20:.0f} MiB"
                )
            room = max(0, min(d.ram_total_bytes, limit) - RPC_SERVER_RUNTIME_BYTES)
            devs.append(d.model_copy(update={"ram_available_bytes": room}))
        if too_big:
            row.tpot_pred = row.ttft_pred = row.read_pred = math.nan
            row.predicted_as = "infeasible (OOM expected): " + "; ".join(too_big)
            return
        star = star_links(cluster.model_copy(update={"devices": tuple(devs)}), ring)
        try:
            p2 = manual_plan(star, model, wl, list(plan.windows))
            res = simulate(p2, star, model, wl, SimConfig(prefetch=False, warm=True, stream=False))
            row.tpot_pred, row.ttft_pred = res.tpot_s, res.ttft_s
            row.read_pred, row.read_pred_dev = sim_reads(res)
        except PrimaSimError as exc:
            row.errors.append(f"predict: {exc}")
        row.predicted_as = (
            "simulate: k = 1 ring, servers resident, server-to-server hops via the head, no prefetch"
        )

    def run_rpc(self, tb: Testbed, out: Path, row: Row, pr: Any, copies: dict[str, Path], rep: int) -> None:
        """One run of llama.cpp's RPC split: the servers in their devices, then the head's client; the servers
        are stopped when the client ends."""
        if self.rpc is None:
            row.skipped = self.rpc_why
            return
        plan = pr.plan
        head = plan.devices[0].name
        hosts = {d.name: tb.ip(d.name) for d in plan.devices}
        # -n tokens + 1: llama.cpp's "eval time" counts the decode steps after the prompt's (tokens of them)
        rc = llamacpp_rpc_commands(plan, str(copies[head]), hosts, prompt=PROMPT, n_predict=self.args.tokens + 1,
                                   threads={d.name: 1 for d in plan.devices}, binary_dir=str(self.rpc),
                                   extra=["--temp", "0", "--ignore-eos", "-b", "64", "-ub", "64"])  # fmt: skip
        row.command = " ; ".join([*(shlex.join(s.argv) for s in rc.servers), shlex.join(rc.client)])
        rep_dir = out / "runs" / f"{pr.label}-llama.cpp-rpc" / f"rep{rep}"
        rep_dir.mkdir(parents=True, exist_ok=True)
        env = {"OMP_WAIT_POLICY": "passive"}
        cg.drop_caches()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        p: subprocess.Popen[bytes] | None = None
        sampler = MemorySampler(
            {d.name: tb.groups[d.name] for d in plan.devices}, device=tb.disk_dev or None
        ).start()
        try:
            for s in rc.servers:
                procs[s.device] = tb.spawn_in(s.device, s.argv, rep_dir / f"{s.device}.log", env)
            t_end = time.monotonic() + 20
            for s in rc.servers:
                q = procs[s.device]
                while not listening(q.pid, s.port):
                    if q.poll() is not None or time.monotonic() > t_end:
                        row.errors.append(f"rep {rep}: ggml-rpc-server in {s.device} "
                                          + (f"exited {q.returncode}" if q.poll() is not None else "never listened")
                                          + f": {log_tail(rep_dir / f'{s.device}.log', 300)}")  # fmt: skip
                        return
                    time.sleep(0.05)
            p = tb.spawn_in(head, rc.client, rep_dir / f"{head}.log", env)
            t_end = time.monotonic() + PRIMA_TIMEOUT_S
            while p.poll() is None:
                if time.monotonic() > t_end:
                    row.errors.append(f"rep {rep}: no end in {PRIMA_TIMEOUT_S:g} s")
                    return
                dead = [n for n, q in procs.items() if q.poll() is not None]
                if dead:
                    row.errors.append(f"rep {rep}: ggml-rpc-server in {dead[0]} exited {procs[dead[0]].returncode} "
                                      f"while the client ran: {log_tail(rep_dir / f'{dead[0]}.log', 200)} | client: "
                                      f"{log_tail(rep_dir / f'{head}.log', 200)}")  # fmt: skip
                    return
                time.sleep(0.2)
            self.record_llama_run(
                row, rep, rep_dir / f"{head}.log", "llama-completion", p.returncode, sampler, plan
            )
        finally:
            if p is not None:
                stop(p, 1.0)
            for q in procs.values():
                stop(q, 1.0)
            for n, pk in sampler.stop().items():
                row.anon_peak[n] = max(row.anon_peak.get(n, 0), pk.anon)
                if pk.oom_kills:
                    row.errors.append(f"rep {rep}: the OOM killer killed a process of {n}")
            row.lists_end.append({n: sampler.lists_at_stop(n) for n in sampler.groups})

    def primacpp_cluster(self, sc: Scenario, cluster: Cluster, plan: Any, model: Any, wl: Workload,
                         anon: dict[str, int]) -> Cluster:  # fmt: skip
        """The cluster with each device's room as prima.cpp leaves it: its limit minus what prima.cpp's process
        pinned beyond the cost model's KV cache and compute buffers (measured: peak anonymous memory)."""
        from prima_sim.halda.costmodel import DeviceCosts, memory_use

        devs = []
        for d in cluster.devices:
            raw = d  # its rates (maybe measured around the runs); only its room changes
            a = next((x for x in plan.devices if x.name == d.name), None)
            if a is None or d.name not in anon:
                devs.append(d)
                continue
            pinned = memory_use(DeviceCosts(raw, model, wl), a, d.name == plan.head).pinned_ram
            over = max(0, int(anon[d.name] - pinned))
            devs.append(
                cal_mod.with_executor_overhead(raw, sc.device(d.name).memory, over, d.name == plan.head)
            )
        return cluster.model_copy(update={"devices": tuple(devs)})

    def run_primacpp(
        self,
        tb: Testbed,
        out: Path,
        row: Row,
        pr: Any,
        copies: dict[str, Path],
        rep: int,
        force: bool = False,
    ) -> None:
        if self.prima is None:
            row.skipped = self.prima_why
            return
        plan = pr.plan
        hosts = {d.name: tb.ip(d.name) for d in plan.devices}
        # prima.cpp's perf counters leave out the first 5 decode calls ("preheat"): 5 more tokens, so that its
        # "eval time" covers --tokens decode steps
        cmds = primacpp_commands(plan, "MODEL", hosts, prompt=PROMPT, n_predict=self.args.tokens + 6,
                                 threads={d.name: 1 for d in plan.devices}, binary_dir=str(self.prima.parent), force=force)  # fmt: skip
        # each rank maps its own copy (see run_group)
        cmds = [
            dataclasses.replace(c, cli=[str(copies[c.device]) if a == "MODEL" else a for a in c.cli])
            for c in cmds
        ]
        extra = ["--temp", "0", "--ignore-eos", "-b", "64", "-ub", "64"]
        rep_dir = out / "runs" / f"{pr.label}-prima.cpp{'-force' if force else ''}" / f"rep{rep}"
        rep_dir.mkdir(parents=True, exist_ok=True)
        row.command = " ; ".join(" ".join(c.cli) for c in cmds)
        env = {"OMP_WAIT_POLICY": "passive"}
        cg.drop_caches()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        sampler = MemorySampler(
            {d.name: tb.groups[d.name] for d in plan.devices}, device=tb.disk_dev or None
        ).start()
        try:
            for c in cmds[1:]:
                procs[c.device] = tb.spawn_in(
                    c.device, [*c.cli, "-b", "64", "-ub", "64"], rep_dir / f"{c.device}.log", env
                )
            head = cmds[0]
            p = tb.spawn_in(head.device, head.cli + extra, rep_dir / f"{head.device}.log", env)
            t_end = time.monotonic() + PRIMA_TIMEOUT_S
            while p.poll() is None:
                if time.monotonic() > t_end:
                    row.errors.append(f"rep {rep}: no end in {PRIMA_TIMEOUT_S:g} s")
                    return
                dead = [n for n, q in procs.items() if q.poll() is not None and q.returncode != 0]
                if dead:
                    row.errors.append(f"rep {rep}: rank {dead[0]} exited {procs[dead[0]].returncode}: "
                                      f"{log_tail(rep_dir / f'{dead[0]}.log', 300)}")  # fmt: skip
                    return
                time.sleep(0.2)
            self.record_llama_run(
                row, rep, rep_dir / f"{head.device}.log", "llama-cli", p.returncode, sampler, plan
            )
        finally:
            deadline = time.monotonic() + 10
            for q in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    q.wait(timeout=max(0.1, deadline - time.monotonic()))
                stop(q, 1.0)
            for n, pk in sampler.stop().items():
                row.anon_peak[n] = max(row.anon_peak.get(n, 0), pk.anon)
                if pk.oom_kills:
                    row.errors.append(f"rep {rep}: the OOM killer killed a process of {n}")
            row.lists_end.append({n: sampler.lists_at_stop(n) for n in sampler.groups})

    def record_llama_run(self, row: Row, rep: int, log: Path, program: str, returncode: int | None, sampler: Any,
                         plan: Any) -> None:  # fmt: skip
        """One rep of a llama.cpp program (prima.cpp's llama-cli, the RPC split's llama-completion) that has exited:
        its TPOT and TTFT from the head's log and the bytes the plan's devices read in its timed decode steps (the
        last ``--tokens`` steps before it exited), or the error if it failed."""
        tpot, ttft = parse_llama_perf(log.read_text(errors="replace"))
        if returncode != 0 or math.isnan(tpot):
            row.errors.append(f"rep {rep}: {program} exited {returncode}: {log_tail(log, 300)}")
            return
        row.tpot.append(tpot)
        row.ttft.append(ttft)
        t_b = time.time()
        t_a = t_b - 0.2 - self.args.tokens * tpot
        per_dev = {d.name: sampler.io_between(d.name, t_a, t_b) / self.args.tokens for d in plan.devices}
        row.read_meas.append(sum(per_dev.values()))
        row.read_meas_dev.append(per_dev)
        for d in plan.devices:
            row.anon_decode[d.name] = max(
                row.anon_decode.get(d.name, 0), sampler.anon_peak_between(d.name, t_a, t_b)
            )
        self.say(f"{row.scenario} {row.system} rep {rep}: TPOT {tpot * 1e3:.1f} ms, TTFT {ttft * 1e3:.0f} ms")

    def run_stock(self, tb: Testbed, out: Path, row: Row, whole: Path, rep: int) -> None:
        rep_dir = out / "runs" / "stock" / f"rep{rep}"
        rep_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "prima_sim.exec.stock", "--model", str(whole), "--prompt", PROMPT, "-n",
               str(self.args.tokens + 1), "--ctx", "256", "--threads", "1", "--json"]  # fmt: skip
        row.command = " ".join(cmd[1:])
        cg.drop_caches()
        p = tb.spawn_in("D0", cmd, rep_dir / "D0.log", {"OMP_WAIT_POLICY": "passive"})
        try:
            p.wait(timeout=PRIMA_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop(p, 1.0)
            row.errors.append(f"rep {rep}: no end in {PRIMA_TIMEOUT_S:g} s")
            return
        text = (rep_dir / "D0.log").read_text(errors="replace")
        try:
            obj = parse_json_output(text)
        except ValueError:
            row.errors.append(f"rep {rep}: exited {p.returncode}: {log_tail(rep_dir / 'D0.log', 300)}")
            return
        row.tpot.append(float(obj["tpot_s"]))
        row.ttft.append(float(obj["ttft_s"]))
        self.say(
            f"{row.scenario} llama.cpp rep {rep}: TPOT {obj['tpot_s'] * 1e3:.1f} ms, TTFT {obj['ttft_s'] * 1e3:.0f} ms"
        )

    # --- report --------------------------------------------------------------------------------------------------
    def csv_rows(self) -> list[dict[str, Any]]:
        base = {(r.scenario, r.system): r for r in self.rows}
        out = []
        for r in self.rows:
            t, f = r.tpot_meas(), median(r.ttft)
            pc = base.get((r.scenario, "prima.cpp"))
            pc_t, pc_f = (pc.tpot_meas(), median(pc.ttft)) if pc else (math.nan, math.nan)
            status = (
                "skipped"
                if r.skipped
                else ("ok" if r.tpot and not r.errors else ("partial" if r.tpot else "failed"))
            )

            def pct(pred: float, meas: float) -> float:
                return 100.0 * (pred - meas) / meas if meas > 0 and not math.isnan(pred) else math.nan

            out.append({
                "scenario": r.scenario, "system": r.system, "devices": r.devices, "windows": ",".join(map(str, r.windows)),
                "k": r.k, "reps": len(r.tpot), "status": status,
                "tpot_meas_s": t, "tpot_meas_min_s": min(r.tpot, default=math.nan),
                "tpot_meas_max_s": max(r.tpot, default=math.nan), "ttft_meas_s": f,
                "tpot_pred_s": r.tpot_pred, "ttft_pred_s": r.ttft_pred,
                "tpot_err_pct": pct(r.tpot_pred, t), "ttft_err_pct": pct(r.ttft_pred, f),
                "tpot_pred_profile_s": r.tpot_pred_before,
                "anon_peak_mib": " ".join(f"{n}:{v / 2**20:.0f}" for n, v in sorted(r.anon_peak.items())),
                "disk_mib_per_token_meas": median(r.read_meas) / 2**20,
                "disk_mib_per_token_pred": r.read_pred / 2**20,
                "tpot_vs_primacpp": t / pc_t if pc_t > 0 else math.nan,
                "ttft_vs_primacpp": f / pc_f if pc_f > 0 else math.nan,
                "predicted_as": r.predicted_as, "error": (r.skipped or "; ".join(r.errors))[:500],
                "host": self.host, "date": self.date, "command": r.command[:1000],
                "disk_mib_per_token_meas_dev": per_device_mib(r.read_meas_dev),
                "disk_mib_per_token_pred_dev": per_device_mib([r.read_pred_dev] if r.read_pred_dev else []),
                "anon_decode_mib": " ".join(f"{n}:{v / 2**20:.0f}" for n, v in sorted(r.anon_decode.items())),
                "active_file_mib_end": per_device_mib(
                    [{n: float(v["active_file"]) for n, v in rep.items() if "active_file" in v} for rep in r.lists_end]
                ),
            })  # fmt: skip
        return out

    def write(self, reports: Path) -> None:
        rows = self.csv_rows()
        reports.mkdir(parents=True, exist_ok=True)
        with (reports / "peers.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        plot(rows, reports / "peers.png")
        print()
        print(f"{'scenario':22} {'system':17} {'windows':8} {'TPOT ms':>9} {'pred ms':>9} {'err%':>6} "
              f"{'x prima.cpp':>11} {'TTFT ms':>8} {'x prima.cpp':>11}  status")  # fmt: skip
        for r in rows:
            print(f"{r['scenario']:22} {r['system']:17} {r['windows']:8} {r['tpot_meas_s'] * 1e3:9.1f} "
                  f"{r['tpot_pred_s'] * 1e3:9.1f} {r['tpot_err_pct']:6.1f} {r['tpot_vs_primacpp']:11.2f} "
                  f"{r['ttft_meas_s'] * 1e3:8.0f} {r['ttft_vs_primacpp']:11.2f}  {r['status']} {r['error'][:80]}")  # fmt: skip


def per_device_mib(reps: list[dict[str, float]]) -> str:
    """``D0:210 D1:150 ...``: per device the median over ``reps`` of its bytes per token, in MiB."""
    names = sorted({n for r in reps for n in r})
    return " ".join(f"{n}:{median([r[n] for r in reps if n in r]) / 2**20:.0f}" for n in names)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(dict.fromkeys(r["scenario"] for r in rows))
    colors = {
        "prima.cpp": "tab:blue",
        "prima.cpp --force": "tab:cyan",
        "prima-sim": "tab:orange",
        "llama.cpp": "tab:gray",
        RPC_SYSTEM: "tab:green",
    }
    fig, ax = plt.subplots(figsize=(11, 5))
    labelled: set[str] = set()
    width = 0.16
    for i, s in enumerate(scen):
        for j, system in enumerate(SYSTEMS):
            r = next((x for x in rows if x["scenario"] == s and x["system"] == system), None)
            if r is None:
                continue
            x = i + (j - (len(SYSTEMS) - 1) / 2) * width
            v = r["tpot_meas_s"] * 1e3
            if not math.isnan(v):
                ax.bar(x, v, width, color=colors[system], label=None if system in labelled else system)
                labelled.add(system)
                if r["reps"] > 1:
                    ax.errorbar(x, v, yerr=[[v - r["tpot_meas_min_s"] * 1e3], [r["tpot_meas_max_s"] * 1e3 - v]],
                                color="black", capsize=2, lw=0.8)  # fmt: skip
            p = r["tpot_pred_s"] * 1e3
            if not math.isnan(p):
                ax.plot(
                    x,
                    p,
                    marker="D",
                    color="black",
                    ms=4,
                    ls="",
                    label="predicted" if i == 0 and j == 0 else None,
                )
    ax.set_xticks(range(len(scen)), [s.replace("-", "\n", 1) for s in scen], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("TPOT, ms (log)")
    ax.set_title("prima.cpp vs prima-sim ring vs one stock llama.cpp process vs llama.cpp's RPC split "
                 "(same emulated devices, 1B-shape Q4_0)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(v: str) -> Any:
    try:
        return float(v) if v not in ("",) else math.nan
    except ValueError:
        return v


def repredict_main(args: argparse.Namespace) -> int:
    """``--repredict``: the run's rows with new predictions; prints old against new prediction errors."""
    reports = Path(args.reports)
    measured_csv = Path(args.measured) if args.measured else reports / "peers.csv"
    measured: list[dict[str, str]] = []
    if measured_csv.is_file():
        with measured_csv.open() as fh:
            measured = list(csv.DictReader(fh))
    b = Bench(args)
    notes = b.repredict(Path(args.repredict), measured, Path(args.run_log) if args.run_log else None)
    if not b.rows:
        print(f"repredict: nothing to predict under {args.repredict}", file=sys.stderr)
        return 2
    old = {(c["scenario"], c["system"]): c for c in measured}
    b.write(reports)
    print()
    for n in notes:
        print("note:", n)
    print(f"\n{'scenario':22} {'system':17} {'TPOT ms':>8} {'pred before':>11} {'err':>7} {'pred now':>9} {'err':>7} "
          f"{'MiB/token meas':>14} {'pred before':>11} {'pred now':>9}  per device now")  # fmt: skip
    for r in b.csv_rows():
        o = old.get((r["scenario"], r["system"]), {})
        pb, eb, db = (
            float(o.get(k) or "nan") for k in ("tpot_pred_s", "tpot_err_pct", "disk_mib_per_token_pred")
        )
        print(f"{r['scenario']:22} {r['system']:17} {r['tpot_meas_s'] * 1e3:8.0f} {pb * 1e3:11.0f} {eb:+6.1f}% "
              f"{r['tpot_pred_s'] * 1e3:9.0f} {r['tpot_err_pct']:+6.1f}% {r['disk_mib_per_token_meas']:14.0f} "
              f"{db:11.0f} {r['disk_mib_per_token_pred']:9.0f}  {r['disk_mib_per_token_pred_dev']}")  # fmt: skip
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prima-build", help="prima.cpp build directory (holding llama-cli)")
    p.add_argument("--rpc-build", help="directory holding ggml-rpc-server and llama-completion built with "
                   "GGML_RPC=ON (benchmarks/peers_build_rpc.sh: /tmp/llamarpc/build/bin)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=6, help="timed decode tokens per run (default: %(default)s)")
    p.add_argument(
        "--reps", type=int, default=2, help="runs per system and scenario, interleaved (default: %(default)s)"
    )
    p.add_argument(
        "--groups", default=",".join(g for g, _, _ in GROUPS), help="device groups to run (default: all)"
    )
    p.add_argument("--out", default="/tmp/bench-peers", help="artefacts (default: %(default)s)")
    p.add_argument("--quick-profile", action="store_true", help="prima-sim profile --quick in the devices")
    p.add_argument(
        "--profile-repeats", type=int, default=3, help="profiles per device, median kept (default: 3)"
    )
    p.add_argument("--profile-cache", help="reuse device profiles measured under identical limits on this host "
                   "(a directory; groups with the same devices then profile once)")  # fmt: skip
    p.add_argument("--no-run-calibration", action="store_true",
                   help="predict from the profiles only (no streaming-rate probes around the runs)")  # fmt: skip
    p.add_argument("--reports", default=str(ROOT / "reports"), help="where peers.csv and peers.png go")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw peers.png from the reports' peers.csv; run nothing"
    )
    p.add_argument("--repredict", metavar="OUT",
                   help="predict the systems of a finished run (its --out) again with the current code and rewrite the "
                   "reports' peers.csv and peers.png (measured columns kept); runs nothing, needs no root")  # fmt: skip
    p.add_argument("--measured", help="with --repredict, for a run that saved no predict-inputs.json: its peers.csv "
                   "(default: the reports' peers.csv)")  # fmt: skip
    p.add_argument("--run-log", help="with --repredict, for a run that saved no predict-inputs.json: its printed log "
                   "(the rates measured around the runs, the WILLNEED cap)")  # fmt: skip
    args = p.parse_args()
    if args.repredict:
        return repredict_main(args)
    if args.plot_only:
        with (Path(args.reports) / "peers.csv").open() as fh:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        plot(rows, Path(args.reports) / "peers.png")
        return 0
    cg.check_root()
    b = Bench(args)
    t0 = time.monotonic()
    wanted = args.groups.split(",")
    for name, spec, cases in GROUPS:
        if name in wanted:
            b.run_group(name, spec, cases)
    b.write(Path(args.reports))
    print(f"\n{time.monotonic() - t0:.0f} s; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
