"""``prima-sim plan``: choose which device runs which layers (Halda, a baseline, or manual windows)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from prima_sim.cli.common import (
    add_serving_args,
    add_workload_args,
    charge_draft_arg,
    load_cluster_arg,
    load_model_arg,
    print_json,
    print_serving,
    serving_predictions,
    source_of,
    table,
    workload_from_args,
)
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError, InputError
from prima_sim.halda.explain import GLOSSARY, explain
from prima_sim.halda.planner import SCHEDULERS, make_plan, manual_plan
from prima_sim.peers import (
    DEFAULT_DATA_PORT,
    DEFAULT_RPC_PORT,
    DEFAULT_SERVER_PORT,
    DEFAULT_SIGNAL_PORT,
    format_commands,
    format_rpc_commands,
    llamacpp_rpc_commands,
    primacpp_commands,
)
from prima_sim.plan import Plan
from prima_sim.solver import HaldaDetails, PublishedDetails
from prima_sim.workload import Workload

DEFAULT_CLUSTER = "default"
DEFAULT_MODEL = "llama3-70b"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = sub.add_parser(
        "plan",
        help="plan layer windows for a model on a cluster (Halda or a baseline)",
        description="Assign the model's layers to the cluster's devices and predict TPOT/TTFT. "
        "Without --json prints a table; --compare shows every scheduler side by side.",
    )
    p.add_argument(
        "--cluster",
        default=DEFAULT_CLUSTER,
        help="bundled cluster name or TOML/JSON file (default: %(default)s)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog id or GGUF path (default: %(default)s)")
    p.add_argument(
        "--scheduler", default="halda", type=str.lower, choices=SCHEDULERS, help="(default: %(default)s)"
    )
    p.add_argument(
        "--k", type=int, default=None, help="force the number of ring rounds (must divide the layer count)"
    )
    add_workload_args(p)
    p.add_argument("--no-drop", action="store_true", help="Halda without device selection: keep every device")
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="plan for a run without prefetch (reads then always stall the device that needs them)",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="leave a window larger than its device's page cache to the page cache instead of streaming its last "
        "layers (drop-behind; by default a k = 1 device streams where that reads less: docs/exec.md)",
    )
    p.add_argument(
        "--cpu-only",
        action="store_true",
        help="ignore every GPU of the cluster (for a real run with a llama.cpp build without a GPU "
        "backend; 'run --local' on such a build runs a plan's GPU layers on the CPU by itself)",
    )
    p.add_argument(
        "--sim-k",
        action="store_true",
        help="plan every valid k with Halda and keep the plan that simulates fastest (prefetch-aware)",
    )
    p.add_argument("--windows", help="manual windows in ring order (head first), e.g. 10,10,10 (no solving)")
    p.add_argument("--gpu-layers", help="manual GPU layers per window in ring order, e.g. 0,4,0")
    p.add_argument("--out", help="write the plan (JSON) to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compare", action="store_true", help="plan with every scheduler and compare")
    p.add_argument("--explain", action="store_true", help="say why each device got what it got")
    em = p.add_argument_group("command lines of peer systems (docs/peers.md)")
    em.add_argument("--emit", choices=("prima.cpp", "llama.cpp-rpc"),
                    help="print the plan as prima.cpp's llama-cli / llama-server command per device (-lw, -ngl, "
                         "--world, --rank, --master, --next, ports), or as llama.cpp's own RPC split (k = 1: "
                         "ggml-rpc-server per device, the head's llama-completion with --rpc, -ngl, -ts); with "
                         "--json as one JSON object. The plan is made for that executor: no streaming of a "
                         "window's last layers, and prima.cpp's prefetch counted only with --force")  # fmt: skip
    em.add_argument(
        "--hosts", help="with --emit: hosts.toml giving each device's address (default: 127.0.0.1)"
    )
    em.add_argument(
        "--gguf", help="with --emit: the GGUF path in the commands (default: --model if it is a file)"
    )
    em.add_argument(
        "--data-port",
        type=int,
        default=DEFAULT_DATA_PORT,
        help="with --emit: prima.cpp's data port base, rank r listens on it + r (default: %(default)s)",
    )
    em.add_argument(
        "--signal-port",
        type=int,
        default=DEFAULT_SIGNAL_PORT,
        help="with --emit: prima.cpp's signal port base (default: %(default)s)",
    )
    em.add_argument(
        "--server-port",
        type=int,
        default=DEFAULT_SERVER_PORT,
        help="with --emit: llama-server's HTTP port on the head (default: %(default)s)",
    )
    em.add_argument("--force", action="store_true", help="with --emit: add prima.cpp's --force to --prefetch")
    em.add_argument("--rpc-port", type=int, default=DEFAULT_RPC_PORT,
                    help="with --emit llama.cpp-rpc: every ggml-rpc-server's port (default: %(default)s)")  # fmt: skip
    add_serving_args(p)
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise InputError(flag, "", f"expected comma-separated integers like 10,10,10, got {text!r}") from None


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The JSON object ``plan --json`` prints (the issue's required keys plus the full plan)."""
    pred = plan.prediction
    per = {t.name: t for t in (pred.per_device if pred else ())}
    return {
        "scheduler": plan.scheduler,
        "model": plan.model_id,
        "cluster": plan.cluster_name,
        "k": plan.k,
        "n_ctx": plan.n_ctx,
        "n_seq": plan.n_seq,
        "devices": [
            {
                "name": d.name,
                "window": d.window,
                "gpu_layers": d.gpu_layers,
                "layers": [list(r) for r in d.layers],
                "predicted_s": per[d.name].model_dump(mode="json") | {"total_s": per[d.name].total_s}
                if d.name in per
                else None,
            }
            for d in plan.devices
        ],
        "dropped": [dr.model_dump() for dr in plan.dropped],
        "predicted_tpot_s": pred.tpot_s if pred else None,
        "predicted_ttft_s": pred.ttft_s if pred else None,
        "solve_time_s": plan.solver.solve_time_s,
        "plan": plan.model_dump(mode="json"),
    }


def _ms(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x * 1e3:.1f}"


def _duration(x: float) -> str:
    """Milliseconds below 10 s, seconds above (a 70B plan on a slow home predicts tens of seconds per token)."""
    if math.isinf(x):
        return "inf"
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.2f} s"


def print_table(plan: Plan) -> None:
    """Human-readable plan: one row per device, one header per column."""
    pred = plan.prediction
    rounds = "round" if plan.k == 1 else "rounds"
    seqs = f" x {plan.n_seq} sequences" if plan.n_seq > 1 else ""
    print(f"{plan.scheduler} plan of {plan.model_id} ({plan.n_layers} layers) on {plan.cluster_name}"
          f"{' (CPUs only)' if plan.cpu_only else ''}, context {plan.n_ctx}{seqs}: {len(plan.devices)} devices, "
          f"k = {plan.k} {rounds} of the ring per token")  # fmt: skip
    per = {t.name: t for t in (pred.per_device if pred else ())}
    rows = []
    for d in plan.devices:
        t = per.get(d.name)
        ranges = " ".join(f"[{a},{b})" for a, b in d.layers)
        if len(ranges) > 48:
            ranges = ranges[:45] + "..."
        times = (
            [_ms(x) for x in (t.compute_s, t.memory_s, t.disk_s, t.comm_s, t.overhead_s, t.total_s)]
            if t
            else [""] * 6
        )
        rows.append([d.name, "head" if d.name == plan.head else "", str(d.window), str(d.gpu_layers),
                     str(d.n_layers), *times, ranges])  # fmt: skip
    headers = ["device", " role", "window", "GPU/window", "layers", "compute", "memory", "disk", "network",
               "overhead", "total", " layer ranges"]  # fmt: skip
    for line in table(headers, rows):
        print(line)
    print("window = layers per round; GPU/window = its last layers that run on the GPU; layers = per token; "
          "times = predicted ms per token")  # fmt: skip
    for dr in plan.dropped:
        print(f"dropped {dr.name}: {dr.reason}")
    if pred:
        wait = (f"; the ring waits {_duration(pred.disk_wait_s)} more for the {pred.bound}, whose reads take longer "
                "than the rest of the ring" if pred.disk_wait_s > 0 else "")  # fmt: skip
        print(f"predicted time per token (TPOT) {_duration(pred.tpot_s)} (of which the head's embedding, output layer and "
              f"sampling {_duration(pred.head_s)}{wait}); time to first token (TTFT) {_duration(pred.ttft_s)} for a "
              f"{pred.prompt_tokens}-token prompt")  # fmt: skip
    details = plan.solver.details
    how = (f" ({details.dynamic_programs} dynamic programs)" if isinstance(details, HaldaDetails) else
           f" ({details.ilp_solves} integer programs)" if isinstance(details, PublishedDetails) else "")  # fmt: skip
    print(f"solve time {plan.solver.solve_time_s * 1e3:.1f} ms{how}")


def _plan_by_simulation(cluster: Cluster, model: ModelProfile, wl: Workload, quiet: bool) -> Plan:
    from prima_sim.progress import Progress
    from prima_sim.sim.refine import plan_by_simulated_k

    bar: Progress | None = None

    def progress(i: int, n: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = Progress(n, "simulating k candidates", "plan")
        bar.update(i - bar.n)
        if i >= n:
            bar.close()

    plan, candidates = plan_by_simulated_k(cluster, model, wl, progress=progress)
    if bar is not None:
        bar.close()
    if not quiet:
        print(f"{'k':>4}{'windows':>24}{'analytic ms':>13}{'simulated ms':>14}")
        for c in candidates:
            if c.plan is not None:
                print(f"{c.k:>4}{','.join(map(str, c.plan.windows)):>24}{_ms(c.analytic_tpot_s):>13}"
                      f"{_ms(c.simulated_tpot_s):>14}" + ("  <- chosen" if c.plan.k == plan.k else ""))  # fmt: skip
        print()
    return plan


def _compare(cluster: Cluster, model: ModelProfile, wl: Workload, args: argparse.Namespace) -> int:
    rows: list[tuple[str, Plan | None, str]] = []
    for s in SCHEDULERS:
        try:
            rows.append(
                (
                    s,
                    make_plan(
                        cluster,
                        model,
                        wl,
                        s,
                        args.k,
                        prefetch=not args.no_prefetch,
                        stream=not args.no_stream,
                    ),
                    "",
                )
            )
        except InfeasiblePlanError as exc:
            rows.append((s, None, str(exc)))
    if args.json:
        print_json({s: (plan_summary(p) if p else {"error": e}) for s, p, e in rows})
        return 0
    print(f"{model.id} on {cluster.name} ({len(cluster.devices)} devices), context {wl.n_ctx}")
    cells = []
    for s, p, _e in rows:
        if p is None:
            continue
        pr = p.prediction
        cells.append([s, str(p.k), ",".join(d.name for d in p.devices), ",".join(str(w) for w in p.windows),
                      ",".join(str(d.gpu_layers) for d in p.devices), _ms(pr.tpot_s) if pr else "-",
                      _ms(pr.ttft_s) if pr else "-", f"{p.solver.solve_time_s * 1e3:.1f}"])  # fmt: skip
    headers = [
        "scheduler",
        "k",
        " ring (head first)",
        " windows",
        " GPU/window",
        "TPOT ms",
        "TTFT ms",
        "solve ms",
    ]
    if cells:
        for line in table(headers, cells):
            print(line)
    for s, p, e in rows:
        if p is None:
            print(f"{s}: infeasible: {e}")
    return 0


def _emit(plan: Plan, cluster: Cluster, args: argparse.Namespace) -> int:
    """Print the plan as prima.cpp command lines (``--emit prima.cpp``) or llama.cpp's RPC split
    (``--emit llama.cpp-rpc``)."""
    from prima_sim.exec.hosts import load_hosts  # the hosts.toml format of 'run'

    hosts = {name: e.host for name, e in load_hosts(args.hosts).devices.items()} if args.hosts else {}
    gguf = args.gguf or (args.model if Path(args.model).is_file() else f"{args.model}.gguf")
    threads = {d.name: cluster.device(d.name).n_threads for d in plan.devices}
    if args.emit == "llama.cpp-rpc":
        rc = llamacpp_rpc_commands(
            plan, gguf, hosts, port=args.rpc_port, n_predict=args.tokens, threads=threads
        )
        if args.json:
            print_json({"emit": "llama.cpp-rpc", "plan": plan_summary(plan), **rc.to_dict()})
            return 0
        if not args.gguf and not Path(args.model).is_file():
            print(f"# {args.model} is a catalog id: replace {gguf} with the GGUF file (or give --gguf)")
        print(format_rpc_commands(rc))
        return 0
    cmds = primacpp_commands(plan, gguf, hosts, data_port=args.data_port, signal_port=args.signal_port,
                             n_predict=args.tokens, prefetch=not args.no_prefetch, force=args.force, threads=threads,
                             server_port=args.server_port)  # fmt: skip
    if args.json:
        print_json({"emit": "prima.cpp", "plan": plan_summary(plan), "devices": [c.to_dict() for c in cmds]})
        return 0
    if not args.gguf and not Path(args.model).is_file():
        print(f"# {args.model} is a catalog id: replace {gguf} with the GGUF file (or give --gguf)")
    if plan.prediction is not None:
        how = (
            "with --force's prefetch"
            if args.force
            else "prefetch as none (Linux caps its WILLNEED without --force)"
        )
        print(f"# planned for prima.cpp's executor: no layer streamed, {how}; predicted "
              f"{plan.prediction.tpot_s * 1e3:.0f} ms per token")  # fmt: skip
    print(format_commands(cmds))
    if args.out:
        print(f"# plan written to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Handler of ``prima-sim plan``."""
    if not args.emit:
        for flag, given in (("--hosts", args.hosts), ("--gguf", args.gguf), ("--force", args.force),
                            ("--data-port", args.data_port != DEFAULT_DATA_PORT),
                            ("--signal-port", args.signal_port != DEFAULT_SIGNAL_PORT),
                            ("--server-port", args.server_port != DEFAULT_SERVER_PORT),
                            ("--rpc-port", args.rpc_port != DEFAULT_RPC_PORT)):  # fmt: skip
            if given:
                raise InputError(flag, "", "applies to --emit only")
    elif args.compare:
        raise InputError("--emit", "", "prints one plan's commands: drop --compare")
    elif args.sim_k:
        raise InputError(
            "--sim-k", "", "simulates this project's executor, not the peer's: drop it with --emit"
        )
    cluster = load_cluster_arg(args.cluster)
    if args.cpu_only:
        cluster = cluster.without_gpus()
        if args.gpu_layers:
            raise InputError("--gpu-layers", "", "a --cpu-only plan has no GPU layers: drop one of the two")
    model = load_model_arg(args.model)
    wl = workload_from_args(args)
    n_layer = model.arch.n_layer
    if args.k is not None and (args.k <= 0 or n_layer % args.k):
        valid = ", ".join(str(k) for k in range(1, n_layer + 1) if n_layer % k == 0)
        raise InputError("--k", "", f"must divide {model.id}'s {n_layer} layers (rounds of the ring), got {args.k}; "
                         f"valid: {valid}")  # fmt: skip
    planning = charge_draft_arg(cluster, wl, args)  # with --draft, the head keeps room for the draft model
    # plan for the executor that will run it: a peer cannot stream a window's last layers (drop-behind is this
    # project's executor), and prima.cpp's --prefetch, one WILLNEED per sub-graph, is capped by Linux at a few hundred
    # KiB unless --force (docs/peers.md): without --force its prefetch is planned as none
    stream = not args.no_stream and not args.emit
    prefetch = not args.no_prefetch and (args.emit != "prima.cpp" or args.force)
    if args.compare:
        return _compare(planning, model, wl, args)
    if args.windows:
        windows = _int_list(args.windows, "--windows")
        gpu = _int_list(args.gpu_layers, "--gpu-layers") if args.gpu_layers else None
        plan = manual_plan(planning, model, wl, windows, gpu, prefetch=prefetch, stream=stream)
    else:
        if args.sim_k:
            if args.scheduler != "halda" or args.k is not None or args.no_drop:
                raise InputError(
                    "--sim-k",
                    "",
                    "chooses k for Halda itself: do not combine it with --scheduler, --k or --no-drop",
                )
            plan = _plan_by_simulation(planning, model, wl, quiet=args.json)
        else:
            plan = make_plan(
                planning,
                model,
                wl,
                args.scheduler,
                args.k,
                allow_drop=not args.no_drop,
                prefetch=prefetch,
                stream=stream,
            )
    plan = plan.model_copy(update={"cluster_source": source_of(args.cluster), "model_source": source_of(args.model),
                                   "cpu_only": args.cpu_only})  # fmt: skip
    if planning is not cluster and plan.cluster_fingerprint == planning.fingerprint():
        # made on the cluster less the draft's RAM on the head: the devices are still these (simulate, run check it)
        plan = plan.model_copy(update={"cluster_fingerprint": cluster.fingerprint()})
    if args.out:
        plan.save(args.out)
    if args.emit:
        return _emit(plan, cluster, args)
    serving = serving_predictions(plan, cluster, model, wl, args)
    if args.json:
        obj = plan_summary(plan)
        if args.explain:
            obj["explain"] = explain(plan, cluster, model, wl)
        obj.update(serving)
        print_json(obj)
        return 0
    print_table(plan)
    print_serving(serving)
    if args.explain:
        print()
        for name, lines in explain(plan, cluster, model, wl).items():
            print(f"{name}:")
            for line in lines:
                print(f"  - {line}")
        print(f"\n({GLOSSARY})")
    if args.out:
        print(f"plan written to {args.out}")
    return 0
