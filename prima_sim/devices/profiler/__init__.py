"""The device profiler: measure this host and return a :class:`~prima_sim.devices.profile.DeviceProfile`.

``prima-sim profile`` calls :func:`profile_device`. Each figure is measured the way llama.cpp would experience
it (docs/profiler.md has the details and the cross-checks):

=====================  ==============================================================================
cpu_flops[type]        ggml_mul_mat of a [2048 x 2048] weight of the type by a [2048 x 128] f32 matrix
cpu_row_flops[type]    the model's matrices of the type by 1 and by 8 rows: FLOPs of 7 rows / the difference
memory_bandwidth_bps   a layer's ggml_mul_mats by one f32 vector (decode), weights >= 4x last-level cache
kv_copy_s_per_layer    ggml_cpy F32 -> F16 of one token's K and V (difference of two graph sizes)
decode_overhead_s      one-token llama_decode of a tiny model (a probe passed in by the caller)
disk_*_read_bps        O_DIRECT reads of a temporary file, sequential (readahead blocks) and random (pages)
ram / swap             /proc/meminfo, capped by memory cgroup limits (v1 and v2)
cores                  sched_getaffinity, capped by a CPU cgroup quota
gpu                    ggml's backend registry; the same ggml measurements on the GPU backend (untested)
=====================  ==============================================================================

ggml is reached through :mod:`prima_sim.ggml` (ctypes), never through the ``llama_cpp`` Python module; the one
measurement that needs llama.cpp's C API (``decode_overhead_s``) is passed in as ``decode_probe`` by the
command line from :mod:`prima_sim.exec.decode_probe`.
"""

from __future__ import annotations

import datetime as _dt
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prima_sim import __version__
from prima_sim.devices.ggml_types import TYPE_BY_NAME
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile, GpuProfile, Provenance
from prima_sim.devices.profiler import compute, disk, system
from prima_sim.devices.profiler.batches import BATCH_SIZES, batch_efficiency, row_flops_by_type
from prima_sim.errors import InputError
from prima_sim.ggml import Backend, DeviceInfo, Ggml, GgmlError
from prima_sim.ggml import load as load_ggml
from prima_sim.units import fmt_bandwidth, fmt_bytes, fmt_flop_rate, fmt_seconds

DEFAULT_TYPES: tuple[str, ...] = ("f32", "f16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k")
"""Weight types profiled when no model is given."""

DecodeProbe = Callable[[int], tuple[float, str]]
"""``probe(n_threads) -> (seconds, description)``: the fixed cost of one llama_decode call."""

_GPU_KINDS = {
    "cuda": "cuda",
    "metal": "metal",
    "mtl": "metal",
    "vulkan": "vulkan",
    "rocm": "rocm",
    "hip": "rocm",
    "sycl": "sycl",
}


@dataclass
class ProfileOptions:
    """What to measure and how long to spend on it.

    Args:
        name: the profile's name (default: the host name, made file-name safe).
        threads: threads for every measurement (default: usable cores, or physical cores when fewer).
        model: measure the weight types this model needs (and use its KV width and dominant weight type).
        types: explicit weight types (overrides the model's); f32 is always added.
        quick: a run of a few seconds (smaller test file, fewer repetitions) for tests and CI.
        disk_dir: folder for the disk test file (default: the model's folder, else the working directory).
        disk_file_bytes: size of the disk test file (default 1 GiB; 256 MiB with ``quick``).
        disk_seconds: seconds of each disk read phase (default 1.5; 0.3 with ``quick``).
        decode_probe: measures ``decode_overhead_s``; without one the field stays 0 and sources say why.
        progress: show a progress bar on stderr.
    """

    name: str | None = None
    threads: int | None = None
    model: ModelProfile | None = None
    types: tuple[str, ...] | None = None
    quick: bool = False
    disk_dir: Path | None = None
    disk_file_bytes: int | None = None
    disk_seconds: float | None = None
    decode_probe: DecodeProbe | None = None
    progress: bool = True


@dataclass
class ProfileRun:
    """A finished profile and how long its steps took."""

    profile: DeviceProfile
    elapsed_s: float
    step_s: dict[str, float] = field(default_factory=dict)
    numpy_bandwidth_bps: float = 0.0
    bandwidth_layer: str = ""
    background_cpus: float | None = None  # CPUs other processes used during the CPU measurements


def host_profile_name(host: str | None = None) -> str:
    """A profile name from the host name: characters outside ``[A-Za-z0-9_.-]`` become '-'."""
    raw = host if host is not None else socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", raw).lstrip("-_.")
    return name or "host"


def weight_types_for(options: ProfileOptions) -> tuple[str, ...]:
    """The weight types to measure: explicit ``types``, else the model's, else :data:`DEFAULT_TYPES`; f32 first."""
    if options.types:
        wanted = [t.lower() for t in options.types]
    elif options.model is not None:
        wanted = sorted(options.model.weight_types() | {"f16"})
    else:
        wanted = list(DEFAULT_TYPES)
    bad = [t for t in wanted if t not in TYPE_BY_NAME]
    if bad:
        raise InputError("--types", "", f"unknown ggml type(s) {bad}; use names like f32, f16, q4_k, q8_0")
    return tuple(dict.fromkeys(["f32", *wanted]))


def layer_shape_for(model: ModelProfile | None) -> tuple[compute.LayerShape, str]:
    """The matrices whose decode-time streaming rate becomes ``memory_bandwidth_bps``, and a label: the
    model's first layer (2-D weights; MoE experts count as the used ones), else a Llama-3-8B layer in Q4_0."""
    if model is None:
        return compute.LLAMA3_8B_Q4_0_LAYER, "a Llama-3-8B layer in Q4_0"
    out: list[tuple[str, int, int]] = []
    for t in model.layer_tensors(0):
        if len(t.shape) == 2 and t.shape[1] > 1:
            out.append((t.ggml_type, int(t.shape[0]), int(t.shape[1])))
        elif len(t.shape) == 3:
            used = model.arch.n_expert_used or int(t.shape[2])
            out.append((t.ggml_type, int(t.shape[0]), int(t.shape[1]) * used))
    if not out:
        return compute.LLAMA3_8B_Q4_0_LAYER, "a Llama-3-8B layer in Q4_0"
    return tuple(out), f"layer 0 of {model.id}"


class _Progress:
    def __init__(self, steps: list[str], enabled: bool) -> None:
        self.bar: Any = None
        self.times: dict[str, float] = {}
        self._cur: str | None = None
        self._t0 = time.perf_counter()
        if enabled:
            from prima_sim.progress import Progress

            self.bar = Progress(len(steps), "profile", "step")

    def step(self, label: str) -> None:
        now = time.perf_counter()
        if self._cur is not None:
            self.times[self._cur] = now - self._t0
            if self.bar is not None:
                self.bar.update(1)
        self._cur, self._t0 = label, now
        if self.bar is not None:
            self.bar.set_description(label)

    def close(self) -> None:
        self.step("done")
        self.times.pop("done", None)
        if self.bar is not None:
            self.bar.close()


def profile_device(options: ProfileOptions | None = None) -> ProfileRun:
    """Measure this host. See the module documentation for what each figure is.

    Raises:
        MissingDependencyError: llama-cpp-python (ggml) is not installed.
        InputError: a bad option (unknown type, unusable disk folder).
        GgmlError: a ggml measurement failed.
    """
    opt = options or ProfileOptions()
    t_start = time.perf_counter()
    types = weight_types_for(opt)
    layer, layer_label = layer_shape_for(opt.model)
    lib = load_ggml()
    gpus = lib.gpu_devices()

    steps = [
        "system",
        *[f"flops {t}" for t in types],
        "bandwidth (decode matvecs)",
        "prefill batches",
        "serving rows",
        "bandwidth (numpy)",
        "kv copy",
    ]
    steps += ["decode overhead", "disk: writing test file", "disk: sequential reads", "disk: random reads"]
    if gpus:
        steps.append("gpu")
    prog = _Progress(steps, opt.progress)
    sources: dict[str, str] = {}
    try:
        # --- the operating system ---------------------------------------------------------------------------
        prog.step("system")
        os_family = system.detect_os()
        cores = system.read_cores()
        mem = system.read_memory(os_family=os_family)
        threads = opt.threads
        if threads is not None and threads < 1:
            raise InputError("--threads", "", f"must be at least 1, got {threads}")
        if threads is None and cores.physical and cores.physical < cores.cores:
            threads = cores.physical  # llama.cpp's default: one thread per physical core
        n_threads = threads or cores.cores
        llc = system.last_level_cache_bytes()
        sources["os"] = f"{os_family}: sys.platform={sys.platform}, Termux/Android markers checked"
        sources["cores"] = (
            f"{cores.cores} = min(sched_getaffinity {cores.affinity} CPUs, cgroup CPU quota "
            f"{'none' if cores.quota is None else f'{cores.quota:g} CPUs'}) of {cores.online} online, "
            f"{cores.physical or '?'} physical cores; measurements ran with {n_threads} thread(s)"
        )
        sources.update(_memory_sources(mem))

        # --- compute ---------------------------------------------------------------------------------------
        load = system.CpuLoadMonitor().start()
        budget = 0.08 if opt.quick else 0.3
        cpu_flops: dict[str, float] = {}
        with Backend(lib, lib.cpu_device(), n_threads) as cpu:
            for t in types:
                prog.step(f"flops {t}")
                try:
                    r = compute.matmul_flops(lib, cpu, t, budget_s=budget)
                except GgmlError as exc:
                    if t == "f32":
                        raise
                    sources[f"cpu_flops.{t}"] = f"not measured: {exc}"
                    continue
                cpu_flops[t] = r.flops
                sources[f"cpu_flops.{t}"] = f"{fmt_flop_rate(r.flops)}: {r.describe()}"
            sources["cpu_flops"] = (
                "per weight type: ggml_mul_mat (CPU backend, default buffer type, no AMX/repacking) of a quantized "
                f"[K=2048 x N=2048] weight by an f32 [2048 x 128] activation, {n_threads} thread(s); 2 warm-ups, "
                "median of the timed runs; FLOP/s = 2*K*N*128 / median"
            )

            target = max(4 * llc, (128 << 20) if opt.quick else (256 << 20))
            target = min(target, max(64 << 20, mem.available_bytes // 4))
            prog.step("bandwidth (decode matvecs)")
            mv_budget = 0.2 if opt.quick else 0.6
            try:
                mv = compute.matvec_bandwidth(lib, cpu, layer, target, budget_s=mv_budget)
            except GgmlError as exc:  # a model type ggml cannot quantize: fall back to the standard layer
                layer_label = f"a Llama-3-8B layer in Q4_0 ({layer_label} failed: {exc})"
                mv = compute.matvec_bandwidth(
                    lib, cpu, compute.LLAMA3_8B_Q4_0_LAYER, target, budget_s=mv_budget
                )
            sources["memory_bandwidth_bps"] = (
                f"{fmt_bandwidth(mv.bandwidth_bps)}: the rate llama.cpp's decode streams weights, measured on the "
                f"matrices of {layer_label}: {mv.describe()}; last-level cache {fmt_bytes(llc)}"
            )
            prog.step("prefill batches")
            batch_eff = batch_efficiency(lib, cpu, mv.layer, cpu_flops, (16,) if opt.quick else BATCH_SIZES,
                                          0.3 if opt.quick else 1.0, sources)  # fmt: skip
            prog.step("serving rows")
            row_rates = row_flops_by_type(
                lib, cpu, row_matrices(opt.model, types), 0.15 if opt.quick else 0.5, sources
            )
            prog.step("bandwidth (numpy)")
            npb = compute.numpy_read_bandwidth(mv.weight_bytes, n_threads, budget_s=0.2 if opt.quick else 0.5)
            sources["memory_bandwidth_numpy"] = f"for comparison, a plain read: {npb.describe()}"

            prog.step("kv copy")
            n_k, n_v = (
                (opt.model.arch.n_embd_k_gqa, opt.model.arch.n_embd_v_gqa) if opt.model else (1024, 1024)
            )
            kv = compute.kv_copy_time(lib, cpu, n_k, n_v, budget_s=0.1 if opt.quick else 0.4)
            sources["kv_copy_s_per_layer"] = f"{fmt_seconds(kv.seconds)}: {kv.method}"

        prog.step("decode overhead")
        decode_s = 0.0
        if opt.decode_probe is not None:
            decode_s, note = opt.decode_probe(n_threads)
            sources["decode_overhead_s"] = f"{fmt_seconds(decode_s)}: {note}"
        else:
            sources["decode_overhead_s"] = "not measured (no llama.cpp decode probe given): 0"
        busy = load.stop()
        background = busy[0] if busy else None
        if busy is not None:
            sources["background_load"] = (
                f"while the CPU figures were measured, other processes kept {busy[0]:.2f} of {cores.online} CPUs busy "
                f"and the hypervisor stole {busy[1]:.2f} CPUs (/proc/stat minus this process's CPU time); "
                "figures of a busy host are lower than an idle one's"
            )

        # --- disk ------------------------------------------------------------------------------------------
        folder = opt.disk_dir or (
            Path(opt.model.source[5:]).parent
            if opt.model and opt.model.source.startswith("gguf:")
            else Path.cwd()
        )
        dres = disk.measure_disk(
            folder,
            opt.disk_file_bytes or ((256 << 20) if opt.quick else (1 << 30)),
            opt.disk_seconds or (0.3 if opt.quick else 1.5),
            n_threads,
            progress=prog.step,
        )
        sources["disk_seq_read_bps"] = f"{fmt_bandwidth(dres.seq_bps)}: {dres.describe_seq()}"
        sources["disk_rand_read_bps"] = f"{fmt_bandwidth(dres.rand_bps)}: {dres.describe_rand()}"
        if dres.notes:
            sources["disk_notes"] = "; ".join(dres.notes)

        # --- GPU -------------------------------------------------------------------------------------------
        gpu: GpuProfile | None = None
        if gpus:
            prog.step("gpu")
            gpu = _profile_gpu(lib, gpus[0], types, opt, sources, (n_k, n_v))
        else:
            sources["gpu"] = (
                "none: ggml's backend registry lists no GPU device ("
                + ", ".join(f"{d.name} ({d.type})" for d in lib.devices())
                + ")"
            )
        prog.close()
    except BaseException:
        if prog.bar is not None:
            prog.bar.close()
        raise

    host = socket.gethostname()
    elapsed = time.perf_counter() - t_start
    profile = DeviceProfile(
        name=opt.name or host_profile_name(host),
        os=os_family,
        unified_memory=bool(gpu is not None and (gpu.kind == "metal" or gpus[0].type == "igpu")),
        cores=cores.cores,
        threads=threads,
        cpu_flops=cpu_flops,
        cpu_batch_efficiency=batch_eff,
        cpu_row_flops=row_rates,
        memory_bandwidth_bps=mv.bandwidth_bps,
        ram_total_bytes=mem.total_bytes,
        ram_available_bytes=mem.available_bytes,
        swap_total_bytes=mem.swap_total_bytes,
        swap_available_bytes=mem.swap_available_bytes,
        swappable_bytes=mem.swappable_bytes,
        kv_copy_s_per_layer=kv.seconds,
        decode_overhead_s=decode_s,
        disk_seq_read_bps=dres.seq_bps,
        disk_rand_read_bps=dres.rand_bps,
        gpu=gpu,
        provenance=Provenance(
            kind="measured",
            host=host,
            date=_dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
            tool=f"prima-sim {__version__} profile",
            notes=(
                f"CPU: {system.cpu_model()}; ggml from {lib.folder}; {n_threads} thread(s); "
                f"{'quick run; ' if opt.quick else ''}"
                f"model: {opt.model.id if opt.model else 'none'}; measured in {elapsed:.1f} s"
                + (f"; background load {background:.2f} CPUs" if background is not None else "")
            ),
        ),
        sources=sources,
    )
    return ProfileRun(profile, elapsed, prog.times, npb.bandwidth_bps, layer_label, background)


def row_matrices(model: ModelProfile | None, types: tuple[str, ...]) -> dict[str, compute.LayerShape]:
    """The matrices whose further rows ``cpu_row_flops`` times, by weight type: the model's layer 0 and its output
    head (``output.weight``, or the embedding table when tied), else a [2048 x 2048] weight of each quantized type
    profiled."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    if model is None:
        return {t: ((t, 2048, 2048),) for t in types if t not in ("f32", "f16")}
    mats, _ = layer_shape_for(model)
    head = model.tensor("output.weight") or model.tensor("token_embd.weight")
    if head is not None and len(head.shape) == 2:
        mats = (*mats, (head.ggml_type, int(head.shape[0]), int(head.shape[1])))
    for m in mats:
        out.setdefault(m[0], []).append(m)
    return {t: tuple(v) for t, v in out.items() if t not in ("f32", "f16")}


def _memory_sources(mem: system.MemoryInfo) -> dict[str, str]:
    cg = f"; memory cgroup {mem.cgroup}" if mem.cgroup else "; no memory cgroup limit applies"
    detail = ("; " + "; ".join(mem.notes)) if mem.notes else ""
    return {
        "ram_total_bytes": f"{fmt_bytes(mem.total_bytes)}: min(MemTotal {fmt_bytes(mem.host_total_bytes)}, cgroup limits){cg}",
        "ram_available_bytes": (
            f"{fmt_bytes(mem.available_bytes)}: min(MemAvailable {fmt_bytes(mem.host_available_bytes)}, "
            f"cgroup limit - (usage - reclaimable page cache)){cg}{detail}"
        ),
        "swap": (
            f"total {fmt_bytes(mem.swap_total_bytes)}, available {fmt_bytes(mem.swap_available_bytes)}: SwapTotal/SwapFree "
            "capped by memory.swap.max (v2) or memsw - mem limits (v1)"
        ),
        "swappable_bytes": (
            f"{fmt_bytes(mem.swappable_bytes)}: anonymous pages minus Mlocked on Android, anonymous pages on macOS, "
            "else 0"
        ),
    }


def _profile_gpu(
    lib: Ggml,
    dev: DeviceInfo,
    types: tuple[str, ...],
    opt: ProfileOptions,
    sources: dict[str, str],
    kv_dims: tuple[int, int],
) -> GpuProfile | None:
    """The same ggml measurements on the first GPU of the registry. UNTESTED: no GPU on the machines prima-sim
    is developed on; a failure leaves the profile without a GPU and says why in ``sources``."""
    kind = _GPU_KINDS.get(dev.backend.lower()) or next(
        (v for k, v in _GPU_KINDS.items() if dev.backend.lower().startswith(k)), None
    )
    if kind is None:
        sources["gpu"] = (
            f"{dev.name} ({dev.description}) skipped: backend {dev.backend!r} is not a known GPU kind"
        )
        return None
    budget = 0.05 if opt.quick else 0.2
    try:
        with Backend(lib, dev) as be:
            flops: dict[str, float] = {}
            for t in types:
                try:
                    r = compute.matmul_flops(lib, be, t, k=4096, n=4096, b=512, budget_s=budget)
                except GgmlError as exc:
                    if t == "f32":
                        raise
                    sources[f"gpu.flops.{t}"] = f"not measured: {exc}"
                    continue
                flops[t] = r.flops
                sources[f"gpu.flops.{t}"] = f"{fmt_flop_rate(r.flops)}: {r.describe()}"
            target = int(min(1 << 30, max(64 << 20, dev.memory_free_bytes // 4)))
            mv = compute.matvec_bandwidth(lib, be, compute.LLAMA3_8B_Q4_0_LAYER, target, budget_s=budget)
            kv = compute.kv_copy_time(lib, be, *kv_dims, budget_s=budget)
            unified = kind == "metal" or dev.type == "igpu"
            link = 0.0
            if not unified:
                up = compute.upload_bandwidth(lib, be, 256 << 20, budget_s=budget)
                link = up.bandwidth_bps
                sources["gpu.host_link_bps"] = (
                    f"{fmt_bandwidth(link)}: ggml_backend_tensor_set of {up.nbytes >> 20} MiB (pageable host memory)"
                )
    except GgmlError as exc:
        sources["gpu"] = (
            f"{dev.name} ({dev.description}, {dev.backend}) found but its measurement failed: {exc}"
        )
        return None
    sources["gpu"] = (
        f"{dev.name} ({dev.description}), ggml backend {dev.backend}, device type {dev.type}; memory from "
        "ggml_backend_dev_memory; the GPU path of the profiler is untested (no GPU where it was developed)"
    )
    sources["gpu.memory_bandwidth_bps"] = f"{fmt_bandwidth(mv.bandwidth_bps)}: {mv.describe()}"
    sources["gpu.kv_copy_s_per_layer"] = f"{fmt_seconds(kv.seconds)}: {kv.method}"
    return GpuProfile(
        kind=kind,
        name=dev.description or dev.name,
        flops=flops,
        vram_total_bytes=dev.memory_total_bytes,
        vram_free_bytes=min(dev.memory_free_bytes, dev.memory_total_bytes),
        memory_bandwidth_bps=mv.bandwidth_bps,
        kv_copy_s_per_layer=kv.seconds,
        working_set_limit_bytes=dev.memory_total_bytes if kind == "metal" else None,
        host_link_bps=link,
    )
