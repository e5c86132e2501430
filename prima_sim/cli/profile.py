"""``prima-sim profile``: measure this host and write its device profile (TOML or JSON)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prima_sim.cli.common import check_number, check_threads, load_model_arg, print_json
from prima_sim.devices.profile import DeviceProfile
from prima_sim.errors import InputError, PrimaSimError
from prima_sim.schema import dump_model
from prima_sim.units import UnitError, fmt_bandwidth, fmt_bytes, fmt_flop_rate, fmt_seconds, parse_bytes

BUSY_WARNING_CPUS = 0.25
"""Other processes using at least this many CPUs while the profiler measured make a profile "busy": it is measured
again (``--busy-retries``), then written with a warning or refused (``--refuse-busy``)."""
BUSY_RETRY_WAIT_S = 5.0
"""Pause before measuring a busy host again (a short burst of other work may be over)."""
DEFAULT_BUSY_RETRIES = 2


class BusyHostError(PrimaSimError):
    """The host stayed busy through every measurement and ``--refuse-busy`` was given."""

    exit_code = 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile`` subcommand."""
    p = sub.add_parser(
        "profile",
        help="measure this host (CPU/GPU throughput per weight type, memory, disk) and write a device profile",
        description="Measure this host through ggml (the library llama.cpp computes with) and write a device "
        "profile: matmul throughput per weight type, the decode weight-streaming bandwidth, KV-copy and "
        "llama_decode overheads, disk read bandwidth with the page cache bypassed, RAM/swap within cgroup "
        "limits, cores and GPUs. A default run takes well under a minute; --quick takes a few seconds.",
    )
    p.add_argument("--model", help="GGUF path or catalog id: profile the weight types this model uses")
    p.add_argument("--out", help="profile file to write, .toml or .json (default: <name>.toml)")
    p.add_argument("--name", help="profile name (default: the host name)")
    p.add_argument("--threads", type=int, help="threads for the measurements (default: usable cores)")
    p.add_argument("--types", help="comma-separated weight types to measure instead, e.g. f32,q4_k,q6_k")
    p.add_argument("--quick", action="store_true", help="a run of a few seconds with smaller samples")
    p.add_argument(
        "--disk-dir",
        help="folder for the disk test file (default: the model's folder or the working directory)",
    )
    p.add_argument(
        "--disk-file-size",
        help="size of the disk test file, e.g. 1GiB (default: 1 GiB, 256 MiB with --quick)",
    )
    p.add_argument("--no-write", action="store_true", help="print the profile without writing a file")
    p.add_argument(
        "--json", action="store_true", help="print the profile as one JSON object instead of a table"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--busy-retries",
        type=int,
        default=DEFAULT_BUSY_RETRIES,
        help="when other processes kept the CPUs busy during the measurements, measure again up to this many "
        "times and keep the quietest run (default: %(default)s)",
    )
    p.add_argument(
        "--refuse-busy",
        action="store_true",
        help="write nothing and exit 1 when the host is still busy after the retries (default: write the "
        "quietest run with a warning)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure, write, print."""
    # Imported here: the profiler loads ggml, which other subcommands do not need.
    from prima_sim.devices.profiler import ProfileOptions, profile_device, weight_types_for
    from prima_sim.exec.decode_probe import measure_decode_overhead

    check_threads("--threads", args.threads)
    check_number("--busy-retries", args.busy_retries, minimum=0, maximum=10)
    model = load_model_arg(args.model) if args.model else None
    size = None
    if args.disk_file_size:
        try:
            size = parse_bytes(args.disk_file_size)
        except UnitError as exc:
            raise InputError("--disk-file-size", "", str(exc)) from None
        if size < (8 << 20):
            raise InputError("--disk-file-size", "", f"must be at least 8 MiB, got {args.disk_file_size!r}")
    disk_dir = Path(args.disk_dir) if args.disk_dir else None
    if disk_dir is not None and not disk_dir.is_dir():
        raise InputError("--disk-dir", "", f"{disk_dir} is not a directory")
    types = tuple(t.strip() for t in args.types.split(",") if t.strip()) if args.types else None
    opt = ProfileOptions(
        name=args.name,
        threads=args.threads,
        model=model,
        types=types,
        quick=args.quick,
        disk_dir=disk_dir,
        disk_file_bytes=size,
        decode_probe=measure_decode_overhead,
        progress=not args.no_progress,
    )
    weight_types_for(opt)  # reject bad --types before measuring anything
    if args.name is not None:
        from prima_sim.devices.profile import NAME_PATTERN

        if not NAME_PATTERN.match(args.name):
            raise InputError(
                "--name", "", "must start with a letter or digit and use only letters, digits, '_', '.', '-'"
            )
    result = profile_device(opt)
    for attempt in range(1, args.busy_retries + 1):
        if not _is_busy(result.background_cpus):
            break
        print(f"the host is busy (other processes kept {result.background_cpus:.2f} CPUs busy while the CPU "
              f"figures were measured): measuring again in {BUSY_RETRY_WAIT_S:g} s "
              f"({attempt}/{args.busy_retries})", file=sys.stderr)  # fmt: skip
        time.sleep(BUSY_RETRY_WAIT_S)
        again = profile_device(opt)
        if (again.background_cpus or 0.0) < (result.background_cpus or 0.0):
            result = again
    if _is_busy(result.background_cpus) and args.refuse_busy:
        raise BusyHostError(
            f"other processes kept {result.background_cpus:.2f} CPUs busy during every measurement "
            f"({1 + args.busy_retries} tries): nothing written; profile an idle host, or drop --refuse-busy"
        )
    prof = result.profile
    out = None
    if not args.no_write:
        out = Path(args.out) if args.out else Path(f"{prof.name}.toml")
        dump_model(prof, out)
    if args.json:
        print_json(prof.model_dump(mode="json", exclude_none=True))
    else:
        print(format_table(prof, result.elapsed_s, result.numpy_bandwidth_bps, result.bandwidth_layer))
    if out is not None:
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    if _is_busy(result.background_cpus):
        print(
            f"warning: other processes kept {result.background_cpus:.2f} CPUs busy during the measurements; "
            "the CPU figures are lower than this host's idle capability (run again on an idle host)",
            file=sys.stderr,
        )
    print(f"profiled in {result.elapsed_s:.1f} s", file=sys.stderr)
    return 0


def _is_busy(background_cpus: float | None) -> bool:
    return background_cpus is not None and background_cpus >= BUSY_WARNING_CPUS


def format_table(p: DeviceProfile, elapsed_s: float, numpy_bps: float = 0.0, bw_layer: str = "") -> str:
    """A readable summary of a profile."""
    rows: list[tuple[str, str, str]] = []
    for t, f in p.cpu_flops.items():
        rows.append((f"cpu_flops {t}", fmt_flop_rate(f), "ggml_mul_mat 2048x2048 x 128 cols"))
    cmp_ = f" (numpy sum: {fmt_bandwidth(numpy_bps)})" if numpy_bps else ""
    rows.append(
        (
            "memory_bandwidth",
            fmt_bandwidth(p.memory_bandwidth_bps),
            f"decode matvecs of {bw_layer or 'a layer'}{cmp_}",
        )
    )
    if p.cpu_batch_efficiency:
        eff = ", ".join(f"{n}: {e:.2f}" for n, e in sorted(p.cpu_batch_efficiency.items()))
        rows.append(("prefill batches", eff, "tokens: rate / cpu_flops of the layer's main type"))
    for t, f in p.cpu_row_flops.items():
        rows.append((f"cpu_row_flops {t}", fmt_flop_rate(f), "a further row of a small batch (1 -> 8 rows)"))
    rows.append(("ram total", fmt_bytes(p.ram_total_bytes), "MemTotal within cgroup limits"))
    rows.append(("ram available", fmt_bytes(p.ram_available_bytes), "MemAvailable within cgroup headroom"))
    rows.append(
        ("swap total / avail", f"{fmt_bytes(p.swap_total_bytes)} / {fmt_bytes(p.swap_available_bytes)}", "")
    )
    rows.append(("swappable", fmt_bytes(p.swappable_bytes), "other apps' memory the OS swaps first"))
    rows.append(
        ("kv_copy per layer", fmt_seconds(p.kv_copy_s_per_layer), "ggml_cpy F32->F16, K+V of one token")
    )
    rows.append(
        ("decode overhead", fmt_seconds(p.decode_overhead_s), "one-token llama_decode of a tiny model")
    )
    rows.append(("disk seq read", fmt_bandwidth(p.disk_seq_read_bps), "O_DIRECT, readahead-sized blocks"))
    rows.append(("disk random read", fmt_bandwidth(p.disk_rand_read_bps), "O_DIRECT, page-sized blocks"))
    if p.gpu is None:
        rows.append(("gpu", "none", ""))
    else:
        g = p.gpu
        rows.append(
            (
                "gpu",
                f"{g.kind} {g.name}",
                f"VRAM {fmt_bytes(g.vram_free_bytes)} free of {fmt_bytes(g.vram_total_bytes)}",
            )
        )
        for t, f in g.flops.items():
            rows.append((f"gpu_flops {t}", fmt_flop_rate(f), ""))
        rows.append(
            (
                "gpu memory_bandwidth",
                fmt_bandwidth(g.memory_bandwidth_bps),
                "decode matvecs, Llama-3-8B Q4_0 layer",
            )
        )
        if g.host_link_bps:
            rows.append(("gpu host link", fmt_bandwidth(g.host_link_bps), "host -> VRAM copy"))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    head = f"device profile {p.name}: {p.os}, {p.cores} core(s), {p.n_threads} thread(s), measured in {elapsed_s:.1f} s"
    lines = [head] + [f"  {a:<{w1}}  {b:>{w2}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)
