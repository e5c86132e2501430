"""``prima-sim simulate``: run a plan through the discrete-event simulator (page cache, prefetch, disk, Wi-Fi)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prima_sim.cli.common import (
    add_serving_args,
    add_workload_args,
    charge_draft_arg,
    check_number,
    load_cluster_arg,
    load_model_arg,
    plan_cluster,
    plan_model,
    print_json,
    print_serving,
    serving_predictions,
    workload_from_args,
)
from prima_sim.cli.plan import DEFAULT_CLUSTER, DEFAULT_MODEL
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InputError
from prima_sim.halda.planner import SCHEDULERS, make_plan, manual_plan
from prima_sim.plan import Plan
from prima_sim.sim import DEFAULT_CHUNK_BYTES, SimConfig, SimResult, simulate
from prima_sim.sim.config import DEFAULT_WILLNEED_CAP_BYTES, PAGE_BYTES
from prima_sim.units import MiB
from prima_sim.workload import DEFAULT_CTX, Workload

MAX_CHUNK_MIB = 1024 * 1024.0
"""Largest page-cache chunk the flags accept (1 TiB: larger than any layer, so every layer is one chunk)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` subcommand."""
    p = sub.add_parser(
        "simulate",
        help="simulate a plan: per-token latency with page cache, prefetch, disk and network dynamics",
        description="Simulate a plan (from --plan, or made here with --scheduler) on a cluster: a prompt prefill "
        "(TTFT) and N decode tokens (TPOT). Writes tokens.csv, summary.json, trace.json and Gantt PNGs with --out; "
        "--json prints the summary.",
    )
    src = p.add_argument_group("what to simulate")
    src.add_argument(
        "--plan",
        help="plan JSON from 'prima-sim plan --out' (cluster and model: the files the plan was made from)",
    )
    src.add_argument(
        "--cluster",
        help=f"bundled cluster name or TOML/JSON file (default: the plan's, else {DEFAULT_CLUSTER})",
    )
    src.add_argument("--model", help=f"catalog id or GGUF path (default: the plan's, else {DEFAULT_MODEL})")
    src.add_argument(
        "--scheduler",
        default="halda",
        type=str.lower,
        choices=SCHEDULERS,
        help="plan with this scheduler (default: %(default)s)",
    )
    src.add_argument("--k", type=int, default=None, help="force Halda's number of rounds")
    src.add_argument("--no-drop", action="store_true", help="Halda without device selection")
    src.add_argument("--windows", help="manual windows in ring order, e.g. 10,10,10,10 (no solving)")
    src.add_argument("--gpu-layers", help="manual GPU layers per window in ring order")
    wl = p.add_argument_group("workload")
    add_workload_args(wl, unset={"n_ctx": f"the plan's, else {DEFAULT_CTX}", "n_seq": "the plan's, else 1"})
    sm = p.add_argument_group("simulator")
    sm.add_argument(
        "--seed", type=int, default=0, help="root seed of every random stream (default: %(default)s)"
    )
    sm.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="log-normal sigma of noise on compute times and link latencies (default: 0 = none)",
    )
    sm.add_argument(
        "--no-prefetch",
        action="store_true",
        help="devices do not advise the kernel to load their next window",
    )
    sm.add_argument(
        "--no-stream",
        action="store_true",
        help="no device streams its window (drop-behind): each is left to the page cache, as prima.cpp runs "
        "(implied by --prima-prefetch/--prima-force)",
    )
    sm.add_argument(
        "--page-cache",
        choices=("linux", "lru"),
        default="linux",
        help="linux: Linux devices keep the part of a paging share their kernel's active list freezes "
        "(docs/pagecache.md); lru: a plain LRU everywhere (default: %(default)s)",
    )
    sm.add_argument("--prima-prefetch", action="store_true",
                    help="predict prima.cpp --prefetch: one WILLNEED per window after sending, which Linux caps "
                         "(--willneed-cap-kib), and also a device's only window after it has run it (this project's "
                         "executor advises in uncapped pieces and skips that advice; see docs/sim.md)")  # fmt: skip
    sm.add_argument("--prima-force", action="store_true",
                    help="predict prima.cpp --prefetch --force: as --prima-prefetch, then the device's thread reads "
                         "every page of the advised window itself before taking its next input")  # fmt: skip
    sm.add_argument("--willneed-cap-kib", type=float, default=None,
                    help="with --prima-prefetch/--prima-force: KiB one WILLNEED advice reads at most, per contiguous "
                         "range (max(max_sectors_kb, 2 x read_ahead_kb) of the disk; 0 = uncapped; default: "
                         f"{DEFAULT_WILLNEED_CAP_BYTES // 1024})")  # fmt: skip
    start = sm.add_mutually_exclusive_group()
    start.add_argument(
        "--warm",
        dest="warm",
        action="store_true",
        default=True,
        help="page cache as llama.cpp's mmap load leaves it (default; what the executor measures)",
    )
    start.add_argument("--cold", dest="warm", action="store_false", help="start with every weight on disk")
    sm.add_argument(
        "--chunk-mib",
        type=float,
        default=DEFAULT_CHUNK_BYTES / MiB,
        help="largest page-cache chunk of a layer, MiB (default: %(default)g)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--out", help="directory for tokens.csv, summary.json, trace.json, gantt.png, gantt_full.png"
    )
    out.add_argument("--no-gantt", action="store_true", help="skip the PNGs (faster)")
    out.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_serving_args(p)
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(flag, "", f"expected comma-separated integers like 10,10,10, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The simulator settings the flags describe (validated)."""
    check_number("--chunk-mib", args.chunk_mib, minimum=PAGE_BYTES / MiB, maximum=MAX_CHUNK_MIB)
    check_number("--jitter", args.jitter, minimum=0, maximum=1)
    check_number("--seed", args.seed, minimum=0)
    prima = args.prima_prefetch or args.prima_force
    cap_kib = args.willneed_cap_kib
    if cap_kib is not None and not prima:
        raise InputError(
            "--willneed-cap-kib",
            "",
            "applies to prima.cpp's advice only: add --prima-prefetch or --prima-force",
        )
    if prima and args.no_prefetch:
        raise InputError(
            "--no-prefetch",
            "",
            "--prima-prefetch/--prima-force predict prima.cpp --prefetch; drop one of them",
        )
    if cap_kib is None:
        cap_kib = DEFAULT_WILLNEED_CAP_BYTES / 1024 if prima else 0.0
    check_number("--willneed-cap-kib", cap_kib, minimum=0, maximum=MAX_CHUNK_MIB * 1024)
    try:
        return SimConfig(prefetch=not args.no_prefetch, prefetch_own_window=prima, warm=args.warm,
                         willneed_cap_bytes=int(cap_kib * 1024), force_touch=args.prima_force,
                         chunk_bytes=int(args.chunk_mib * MiB), jitter=args.jitter, seed=args.seed,
                         page_cache=args.page_cache, stream=not (args.no_stream or prima))  # fmt: skip
    except ValueError as exc:
        raise InputError("--seed/--jitter/--chunk-mib", "", str(exc).replace('"', "")) from None


def resolve(args: argparse.Namespace) -> tuple[Plan, Cluster, ModelProfile, Workload]:
    """The plan, cluster, model and workload the flags describe.

    Raises:
        InputError: files or flags are invalid or inconsistent with the plan.
        InfeasiblePlanError: planning found no assignment.
    """
    if args.plan:
        for flag, given in (("--windows", args.windows), ("--gpu-layers", args.gpu_layers), ("--k", args.k is not None),
                            ("--no-drop", args.no_drop), ("--scheduler", args.scheduler != "halda")):  # fmt: skip
            if given:
                raise InputError(flag, "", f"makes a new plan: give either --plan or {flag}, not both")
        plan = Plan.load(args.plan)
        cluster = plan_cluster(plan, args.plan, args.cluster)
        model = plan_model(plan, args.plan, args.model)
        if args.ctx is not None and args.ctx != plan.n_ctx:
            raise InputError(
                "--ctx", "", f"the plan reserves KV cache for {plan.n_ctx} tokens; omit --ctx or re-plan"
            )
        if args.parallel is not None and args.parallel != plan.n_seq:
            raise InputError("--parallel", "", f"the plan reserves KV cache for {plan.n_seq} sequence(s); omit "
                             "--parallel or re-plan with it")  # fmt: skip
        wl = workload_from_args(args, n_ctx=plan.n_ctx, n_seq=plan.n_seq)
        return plan, cluster, model, wl
    cluster = load_cluster_arg(args.cluster or DEFAULT_CLUSTER)
    model = load_model_arg(args.model or DEFAULT_MODEL)
    wl = workload_from_args(
        args, n_ctx=args.ctx if args.ctx is not None else DEFAULT_CTX, n_seq=args.parallel or 1
    )
    if args.windows:
        gpu = _int_list(args.gpu_layers, "--gpu-layers") if args.gpu_layers else None
        plan = manual_plan(
            cluster, model, wl, _int_list(args.windows, "--windows"), gpu, stream=not args.no_stream
        )
    else:
        if args.k is not None and args.k <= 0:
            raise InputError("--k", "", f"must be a positive divisor of the layer count, got {args.k}")
        plan = make_plan(
            cluster, model, wl, args.scheduler, args.k, allow_drop=not args.no_drop, stream=not args.no_stream
        )
    return plan, cluster, model, wl


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 1e3:.1f}"


def print_report(res: SimResult, wall_s: float, paths: dict[str, Path] | None) -> None:
    """Human-readable summary of a simulation."""
    s = res.summary()
    p = res.plan
    print(f"simulated {p.scheduler} plan of {res.model_id} on {res.cluster_name}: k = {p.k}, windows "
          f"{','.join(str(w) for w in p.windows)} (ring {', '.join(res.devices)})")  # fmt: skip
    cfg = res.config
    print(f"prompt {res.workload['prompt_tokens']} tokens, {res.workload['decode_tokens']} decode tokens, ctx "
          f"{res.workload['n_ctx']}; prefetch {'on' if cfg['prefetch'] else 'off'}, {'warm' if cfg['warm'] else 'cold'}"
          f" start, seed {cfg['seed']}, jitter {cfg['jitter']:g}")  # fmt: skip
    hdr = (f"{'device':<14}{'compute':>9}{'disk':>9}{'recv':>9}{'send':>8}{'idle':>9}{'prefetch':>10}"
           f"{'read MB':>9}{'pressure':>10}{'cache GiB':>11}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for name in res.devices:
        d = s["per_device"].get(name, {})
        st = res.device_stats[name]
        print(f"{name:<14}{_ms(d.get('compute_s')):>9}{_ms(d.get('disk_wait_s')):>9}{_ms(d.get('recv_wait_s')):>9}"
              f"{_ms(d.get('send_s')):>8}{_ms(d.get('idle_s')):>9}{_ms(d.get('prefetch_s')):>10}"
              f"{d.get('disk_read_bytes', 0.0) / 1e6:>9.1f}{st['memory_pressure'] * 100:>9.1f}%"
              f"{st['model_page_cache_peak_bytes'] / 2**30:>6.2f}/{st['page_cache_capacity_bytes'] / 2**30:<4.1f}")  # fmt: skip
    print(
        "(ms per decode token; read MB per decode token; pressure = pinned RAM / total RAM; cache = model pages peak/room)"
    )
    a = s["analytic"] or {}
    print(f"TTFT {_ms(s['ttft_s'])} ms (analytic {_ms(a.get('ttft_s'))} ms); TPOT median {_ms(s['tpot_s'])} ms, mean "
          f"{_ms(s['tpot_mean_s'])} ms, p90 {_ms(s['tpot_p90_s'])} ms (analytic {_ms(a.get('tpot_s'))} ms)")  # fmt: skip
    a_t = a.get("tpot_s")
    if a_t and s["tpot_s"] and abs(s["tpot_s"] / a_t - 1) > 0.02:
        print("why the simulation differs from the cost model:")
        for line in s["differences"]:
            print(f"  - {line}")
    print(
        f"{s['events']} events in {wall_s:.2f} s of wall time ({s['events'] / max(wall_s, 1e-9):,.0f} events/s)",
        file=sys.stderr,
    )
    if paths:
        print("wrote " + ", ".join(str(v) for v in paths.values()))


def simulate_serving(serving: dict[str, Any], plan: Plan, cluster: Cluster, model: ModelProfile, wl: Workload,
                     cfg: SimConfig, res: SimResult, draft: ModelProfile | None = None,
                     draft_arg: Any = None) -> None:  # fmt: skip
    """Add the simulator's figures to each ``--concurrency`` level of ``serving``: the plan simulated with that many
    sequences generated together (``SimConfig.concurrency``), their TPOT (the median decode pass) and aggregate
    tokens/s (every sequence's ``decode_tokens + 1`` tokens over the run, prefill included); and to its
    ``speculation`` (``draft``, ``draft_arg`` the parsed arguments naming it): the plan simulated with the draft
    (``SimConfig.draft_max``), its TPOT (decode time over tokens produced), tokens per verification pass as drawn
    at the acceptance rate, and the plain TPOT it is compared with, both on the cluster charged for the draft, and the
    TPOT without a draft on the devices as given (``res`` where that is what it simulated)."""
    for p in serving.get("concurrency", []):
        n = p["concurrency"]
        r = res if n == cfg.concurrency else simulate(plan, cluster, model, wl,
                                                       replace(cfg, concurrency=n, record_spans=False))  # fmt: skip
        p["sim_tpot_s"] = r.tpot_s
        p["sim_throughput_tps"] = n * (wl.decode_tokens + 1) / r.sim_time_s if r.sim_time_s > 0 else math.inf
    spec = serving.get("speculation")
    if spec is not None and draft is not None:
        # the head holds the draft beside its share (as the cost model's figures); plain and speculative alike
        charged = charge_draft_arg(cluster, wl, draft_arg)
        # the same devices
        on_charged = plan.model_copy(update={"cluster_fingerprint": charged.fingerprint()})
        quiet = replace(cfg, record_spans=False, concurrency=1)
        plain = simulate(on_charged, charged, model, wl, quiet)
        r = simulate(on_charged, charged, model, wl,
                     replace(quiet, draft_max=spec["draft_max"], accept=spec["accept"]), draft=draft)  # fmt: skip
        spec["sim_tpot_s"] = r.tpot_s
        spec["sim_tokens_per_pass"] = r.tokens_per_pass
        spec["sim_plain_tpot_s"] = plain.tpot_s
        spec["sim_speedup"] = plain.tpot_s / r.tpot_s if r.tpot_s > 0 else math.inf
        # and without a draft at all (the devices as given): the run above where it was plain decoding
        free = res if cfg.concurrency == 1 else simulate(plan, cluster, model, wl, quiet)
        spec["sim_no_draft_tpot_s"] = free.tpot_s
        spec["sim_speedup_vs_no_draft"] = free.tpot_s / r.tpot_s if r.tpot_s > 0 else math.inf


def run(args: argparse.Namespace) -> int:
    """Handler of ``prima-sim simulate``."""
    cfg = config_from_args(args)
    plan, cluster, model, wl = resolve(args)
    t0 = time.perf_counter()
    res = simulate(plan, cluster, model, wl, cfg)
    wall = time.perf_counter() - t0
    paths = res.write(args.out) if args.out else None
    if paths is not None and not args.no_gantt:
        from prima_sim.reports.timeline import draw_simulation

        paths.update(draw_simulation(res, args.out))
    serving = serving_predictions(plan, cluster, model, wl, args)
    draft = load_model_arg(args.draft) if "speculation" in serving else None
    simulate_serving(serving, plan, cluster, model, wl, cfg, res, draft, args)
    if args.json:
        obj = res.summary()
        if paths:
            obj["outputs"] = {k: str(v) for k, v in paths.items()}
        obj.update(serving)
        print_json(obj)
        return 0
    print_report(res, wall, paths)
    print_serving(serving)
    return 0
