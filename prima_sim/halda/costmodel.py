"""The analytic cost model: per-layer, per-hop and per-device times, memory needs, and a plan's TPOT/TTFT.

This module is the single description of what one step of the piped ring costs. The Halda solver builds its
coefficients from it, :func:`predict` scores any plan with it (so every scheduler is judged by the same
function), and the simulator takes its per-layer compute times and per-hop costs from it, adding the dynamic
mechanisms (page cache, prefetch, contention) that a formula cannot express.

Per layer, on a device's CPU or GPU, for a batch of ``n`` tokens attending to ``n_kv`` cached tokens::

    t_layer = max(sum_q F_q / S_q, (layer bytes + KV bytes read) / BW) + t_kvcopy

a roofline: matmul work at the profiled throughput for each weight type, or streaming the weights and the
cache through memory, whichever is slower (prima.cpp's paper sums the two; its code drops the memory term;
see docs/halda.md for why we take the maximum). Per window (one ``llama_decode`` call) a fixed overhead; per
window boundary one hop: ``latency + (4 * n_embd * n + header) / bandwidth``. The head adds the embedding
lookup and the output head. Memory that does not fit in a device's budget is re-read from disk every step
(prima.cpp's linear model); KV cache and compute buffers are pinned and must fit.

All times in seconds, sizes in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile, sum_flops
from prima_sim.devices.profile import DeviceProfile
from prima_sim.plan import DeviceAssignment, DeviceTimes, Plan, Prediction
from prima_sim.units import MiB

HEADER_BYTES = 96
"""Per-hop message overhead beyond the activations (header frame with positions, shape, fingerprint)."""
ACTIVATION_BYTES_PER_ELEMENT = 4
"""Hidden states travel as float32, as in prima.cpp (``n_embd * n_tokens * 4`` bytes per hop)."""
CUDA_RESERVE_BYTES = 700 * MiB
"""VRAM prima.cpp keeps free for the CUDA context and compute scratch (common.cpp, after several OOM fixes)."""
METAL_RESERVE_BYTES = 300 * MiB
"""The same reserve on Metal."""
DEFAULT_UBATCH = 512
"""llama.cpp's default micro-batch: prompts are prefilled in chunks of this many tokens."""


@dataclass(frozen=True)
class Workload:
    """What the plan is for: the KV cache to reserve and the request shape.

    Attributes:
        n_ctx: context length reserved in every window's KV cache (tokens).
        prompt_tokens: prompt length (prefill, TTFT).
        decode_tokens: tokens generated after the first (TPOT is their median).
        n_ubatch: prefill micro-batch size.
    """

    n_ctx: int = 4096
    prompt_tokens: int = 64
    decode_tokens: int = 128
    n_ubatch: int = DEFAULT_UBATCH

    def __post_init__(self) -> None:
        if self.n_ctx <= 0:
            raise ValueError(f"n_ctx must be > 0, got {self.n_ctx}")
        if self.prompt_tokens < 1 or self.decode_tokens < 0 or self.n_ubatch < 1:
            raise ValueError("prompt_tokens >= 1, decode_tokens >= 0 and n_ubatch >= 1 are required")
        if self.prompt_tokens + self.decode_tokens > self.n_ctx:
            raise ValueError(
                f"prompt ({self.prompt_tokens}) + decode ({self.decode_tokens}) tokens exceed n_ctx ({self.n_ctx})"
            )

    @property
    def decode_kv_tokens(self) -> int:
        """Cached tokens a typical decode step attends to (the middle of generation)."""
        return max(1, min(self.n_ctx, self.prompt_tokens + self.decode_tokens // 2))


def roofline(flops: dict[str, float], rate: callable, nbytes: float, bandwidth: float) -> tuple[float, float]:
    """(compute seconds, memory seconds) of a piece of work; its time is the larger of the two."""
    compute = sum(f / rate(t) for t, f in flops.items())
    memory = nbytes / bandwidth if bandwidth > 0 else 0.0
    return compute, memory


@dataclass(frozen=True)
class LayerTime:
    """Time of one layer (or the output head) split into its compute-bound and memory-bound parts."""

    compute_s: float
    memory_s: float
    kv_copy_s: float = 0.0

    @property
    def total_s(self) -> float:
        """max(compute, memory) + KV copy."""
        return max(self.compute_s, self.memory_s) + self.kv_copy_s

    def split(self) -> tuple[float, float]:
        """(compute-bound seconds, memory-bound seconds): the layer's time attributed to its bottleneck."""
        t = self.total_s
        return (t, 0.0) if self.compute_s >= self.memory_s else (0.0, t)


@dataclass
class DeviceCosts:
    """Everything the cost model knows about one device for one model and workload."""

    device: DeviceProfile
    model: ModelProfile
    workload: Workload
    _cache: dict = field(default_factory=dict, repr=False)

    # --- per layer ------------------------------------------------------------------------------------
    def layer_time(self, layer: int, on_gpu: bool, n_tokens: int = 1, n_kv: int | None = None) -> LayerTime:
        """Time of ``layer`` for ``n_tokens`` tokens attending to ``n_kv`` cached tokens, on CPU or GPU."""
        n_kv = self.workload.decode_kv_tokens if n_kv is None else max(1, n_kv)
        m, d = self.model, self.device
        key = (m.layer_signatures[layer], on_gpu, n_tokens, m.layer_kv_tokens(layer, n_kv))
        if key in self._cache:
            return self._cache[key]
        flops = m.layer_flops(layer, n_tokens, n_kv)
        nbytes = m.layer_bytes[layer] + m.layer_kv_tokens(layer, n_kv) * m.kv_bytes_per_token_per_layer
        if on_gpu and d.gpu is not None:
            c, mem = roofline(flops, d.gpu_rate, nbytes, d.gpu.memory_bandwidth_bps)
            out = LayerTime(c, mem, d.gpu.kv_copy_s_per_layer * n_tokens)
        else:
            c, mem = roofline(flops, d.cpu_rate, nbytes, d.memory_bandwidth_bps)
            if d.matvec_bps:  # per-type streaming rates (added for prima_sim.emulate; empty = the line above)
                kv = m.layer_kv_tokens(layer, n_kv) * m.kv_bytes_per_token_per_layer
                mem = _typed_stream_s(m.layer_tensors(layer), d) + kv / d.memory_bandwidth_bps
            out = LayerTime(c, mem, d.kv_copy_s_per_layer * n_tokens)
        self._cache[key] = out
        return out

    @cached_property
    def mean_cpu_layer_s(self) -> float:
        """Average decode time of one layer on the CPU (Halda's alpha without disk)."""
        return sum(self.layer_time(i, False).total_s for i in range(self.model.arch.n_layer)) / self.model.arch.n_layer

    @cached_property
    def mean_gpu_layer_s(self) -> float:
        """Average decode time of one layer on the GPU (CPU time if there is no GPU)."""
        if self.device.gpu is None:
            return self.mean_cpu_layer_s
        return sum(self.layer_time(i, True).total_s for i in range(self.model.arch.n_layer)) / self.model.arch.n_layer

    def head_time(self, n_tokens: int = 1, n_logits: int = 1) -> LayerTime:
        """Head work per step: embedding lookup for ``n_tokens`` and the output head for ``n_logits`` rows."""
        m, d = self.model, self.device
        flops = sum_flops([m.output_flops(n_logits)])
        nbytes = m.output_bytes + m.embedding_row_bytes * n_tokens
        c, mem = roofline(flops, d.cpu_rate, nbytes, d.memory_bandwidth_bps)
        if d.matvec_bps:  # per-type streaming rates (added for prima_sim.emulate; empty = the line above)
            mem = _typed_stream_s(output_tensors(m), d) + m.embedding_row_bytes * n_tokens / d.memory_bandwidth_bps
        return LayerTime(c, mem)

    # --- memory ---------------------------------------------------------------------------------------
    @cached_property
    def kv_bytes_per_layer(self) -> float:
        """Mean KV-cache bytes one layer reserves for the workload's context."""
        m = self.model
        return sum(m.layer_kv_bytes(i, self.workload.n_ctx) for i in range(m.arch.n_layer)) / m.arch.n_layer

    @cached_property
    def max_layer_kv_bytes(self) -> float:
        """KV-cache bytes of the layer with the largest cache (full-attention layers)."""
        m = self.model
        return max(m.layer_kv_bytes(i, self.workload.n_ctx) for i in range(m.arch.n_layer))

    @cached_property
    def largest_layer_bytes(self) -> float:
        """Weights plus KV cache of the largest layer: what VRAM rows are sized by (VRAM cannot page)."""
        m = self.model
        return max(m.layer_bytes[i] + m.layer_kv_bytes(i, self.workload.n_ctx) for i in range(m.arch.n_layer))

    def compute_buffer_bytes(self, with_logits: bool = False) -> int:
        """Scratch memory of one llama.cpp context (one window) on this device's CPU backend."""
        n_ubatch = min(self.workload.n_ubatch, self.workload.n_ctx)
        return self.model.compute_buffer_bytes(self.workload.n_ctx, n_ubatch, n_logit_rows=1 if with_logits else 0)

    def buffers(self, n_windows: int, is_head: bool, uses_gpu: bool) -> tuple[float, float]:
        """(CPU bytes, GPU bytes) of compute buffers for a device running ``n_windows`` windows.

        Every window is its own llama.cpp context with its own compute buffer; the head's last window also
        holds one row of logits. A device with GPU layers also keeps the backend's reserve free in VRAM.
        """
        n_ctx_windows = max(n_windows, 1 if is_head else 0)
        cpu = n_ctx_windows * self.compute_buffer_bytes() + (self.model.arch.n_vocab * 4 if is_head else 0)
        gpu = (n_ctx_windows * self.compute_buffer_bytes() + self.gpu_reserve_bytes) if uses_gpu else 0.0
        return float(cpu), float(gpu)

    @property
    def gpu_reserve_bytes(self) -> int:
        """VRAM kept free for the GPU backend (context, scratch)."""
        if self.device.gpu is None:
            return 0
        return METAL_RESERVE_BYTES if self.device.gpu.kind == "metal" else CUDA_RESERVE_BYTES

    @property
    def ram_budget_bytes(self) -> int:
        """Memory the model may use on this device (prima.cpp's mem_budget, §3.3).

        Linux and macOS without Metal: available RAM. macOS with Metal: the GPU's free working set, but (our
        decision, docs/halda.md) no more than the RAM that is really available plus what macOS would swap
        out: on Apple Silicon the working set and RAM are the same memory, and the working-set limit (2/3
        of RAM) can be twice what is free. Android: available RAM plus what the OS would swap out of other
        apps first.
        """
        d = self.device
        if d.is_metal and d.gpu is not None:
            return min(d.gpu.vram_free_bytes, d.ram_available_bytes + d.swappable_bytes)
        if d.os == "android":
            return d.ram_available_bytes + min(d.swappable_bytes, d.swap_available_bytes)
        return d.ram_available_bytes

    @property
    def disk_bps(self) -> float:
        """Read bandwidth of page faults (sequential on Linux/Android, random on macOS/Windows)."""
        return self.device.disk_read_bps


def output_tensors(model: ModelProfile) -> list:
    """The output head's tensors: final norm and ``output.weight`` (the embedding table when tied)."""
    out = [t for t in model.tensors if t.name in ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias")]
    if model.tensor("output.weight") is None and (emb := model.tensor("token_embd.weight")) is not None:
        out.append(emb)
    return out


def _typed_stream_s(tensors: list, device: DeviceProfile) -> float:
    """Seconds to stream ``tensors`` at their types' decode rates (``DeviceProfile.stream_bps``); added for
    prima_sim.emulate, used only when the profile gives ``matvec_bps``."""
    return sum(t.n_bytes / device.stream_bps(t.ggml_type) for t in tensors)


def head_extra_bytes(model: ModelProfile) -> float:
    """Bytes the head keeps in RAM beyond its windows: the output head and one embedding row per token
    (prima.cpp's ``b_i/V + b_o``)."""
    return model.output_bytes + model.embedding_row_bytes


def hop_time(cluster: Cluster, src: str, dst: str, n_embd: int, n_tokens: int = 1) -> float:
    """Seconds to move the hidden state of ``n_tokens`` tokens from ``src`` to ``dst`` (0 on one device)."""
    if src == dst:
        return 0.0
    link = cluster.link(src, dst)
    return link.latency_s + (ACTIVATION_BYTES_PER_ELEMENT * n_embd * n_tokens + HEADER_BYTES) / link.bandwidth_bps


# --- memory of an assignment -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryUse:
    """Bytes one device needs for its part of a plan."""

    weights_cpu: float  # layer weights served from RAM (page cache)
    weights_gpu: float  # layer weights copied into VRAM (CUDA) or resident in the GPU's working set
    kv_cpu: float  # KV cache of CPU layers (pinned)
    kv_gpu: float  # KV cache of GPU layers
    buffers_cpu: float  # compute buffers of the device's contexts (pinned)
    buffers_gpu: float  # GPU compute buffers and backend reserve
    head: float  # output head + embedding row, on the head only

    @property
    def pinned_ram(self) -> float:
        """Anonymous memory that cannot be paged out: KV cache and compute buffers."""
        return self.kv_cpu + self.buffers_cpu

    @property
    def ram_total(self) -> float:
        """Everything that wants to live in RAM (weights in the page cache included)."""
        return self.weights_cpu + self.kv_cpu + self.buffers_cpu + self.head


def memory_use(costs: DeviceCosts, a: DeviceAssignment, is_head: bool) -> MemoryUse:
    """Memory a device needs for assignment ``a`` (exact per layer)."""
    m, n_ctx = costs.model, costs.workload.n_ctx
    w_cpu = w_gpu = kv_cpu = kv_gpu = 0.0
    for start, end in a.layers:
        g = a.gpu_layers_in((start, end))
        for i in range(start, end):
            on_gpu = i >= end - g and costs.device.gpu is not None
            if on_gpu:
                w_gpu += m.layer_bytes[i]
                kv_gpu += m.layer_kv_bytes(i, n_ctx)
            else:
                w_cpu += m.layer_bytes[i]
                kv_cpu += m.layer_kv_bytes(i, n_ctx)
    # llama.cpp initialises a present GPU backend (and its compute buffers) even without offloaded layers
    buffers_cpu, buffers_gpu = costs.buffers(len(a.layers), is_head, costs.device.gpu is not None)
    return MemoryUse(w_cpu, w_gpu, kv_cpu, kv_gpu, buffers_cpu, buffers_gpu, head_extra_bytes(m) if is_head else 0.0)


def disk_bytes_per_step(costs: DeviceCosts, use: MemoryUse) -> float:
    """Bytes re-read from disk every step because they do not fit (prima.cpp's T_disk cases, App. A.3).

    Linux/Android/Windows and macOS without Metal: what exceeds the RAM budget once the pinned KV cache and
    buffers are placed (the overflow), re-read each step. macOS with Metal: if everything does not fit in
    Metal's working set, *all* weights reload every step. CUDA layers never reload.
    """
    d = costs.device
    budget = costs.ram_budget_bytes
    if d.is_metal:
        need = use.weights_cpu + use.weights_gpu + use.kv_cpu + use.kv_gpu + use.buffers_cpu + use.buffers_gpu + use.head
        return use.weights_cpu + use.weights_gpu + use.head if need > budget else 0.0
    return max(0.0, use.ram_total - budget)


# --- prediction of a plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepBreakdown:
    """Per-device seconds of one ring step, and problems that make the plan impossible."""

    per_device: tuple[DeviceTimes, ...]
    head_s: float
    infeasible: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        """The step's latency: the sum over devices (one token passes through them in turn) plus the head."""
        return sum(t.total_s for t in self.per_device) + self.head_s


def check_memory(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> list[str]:
    """Problems that make a plan impossible (memory that cannot be paged), as readable sentences."""
    problems: list[str] = []
    for a in plan.devices:
        d = cluster.device(a.name)
        costs = DeviceCosts(d, model, workload)
        use = memory_use(costs, a, a.name == plan.head)
        pinned_budget = d.ram_available_bytes + d.swap_available_bytes
        if use.pinned_ram > pinned_budget:
            problems.append(
                f"{a.name}: KV cache and compute buffers need {use.pinned_ram / 2**30:.2f} GiB of RAM but "
                f"{pinned_budget / 2**30:.2f} GiB is available (short by {int(use.pinned_ram - pinned_budget)} bytes)"
            )
        if a.gpu_layers and d.gpu is None:
            problems.append(f"{a.name}: the plan puts {a.gpu_layers} layers per window on a GPU it does not have")
        elif a.gpu_layers and d.gpu is not None and not d.is_metal:
            vram_need = use.weights_gpu + use.kv_gpu + use.buffers_gpu
            if vram_need > d.gpu.vram_free_bytes:
                problems.append(
                    f"{a.name}: GPU layers need {vram_need / 2**30:.2f} GiB of VRAM but {d.gpu.vram_free_bytes / 2**30:.2f}"
                    f" GiB is free (short by {int(vram_need - d.gpu.vram_free_bytes)} bytes)"
                )
    return problems


def step_breakdown(
    plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, n_tokens: int = 1, n_kv: int | None = None
) -> StepBreakdown:
    """Per-device time of one step (``n_tokens`` tokens through every window, then the head's output head)."""
    e = model.arch.n_embd
    order = plan.execution_order()
    per: dict[str, dict[str, float]] = {a.name: dict.fromkeys(("compute", "memory", "disk", "comm", "overhead"), 0.0)
                                         for a in plan.devices}  # fmt: skip
    # windows: compute and memory per layer, one decode overhead per window, one hop to the next window
    for idx, (name, (start, end)) in enumerate(order):
        a = plan.device(name)
        d = cluster.device(name)
        costs = DeviceCosts(d, model, workload)
        g = a.gpu_layers_in((start, end))
        for i in range(start, end):
            c, mem = costs.layer_time(i, on_gpu=i >= end - g and d.gpu is not None, n_tokens=n_tokens, n_kv=n_kv).split()
            per[name]["compute"] += c
            per[name]["memory"] += mem
        per[name]["overhead"] += d.decode_overhead_s
        if g and d.gpu is not None and d.gpu.host_link_bps > 0 and not d.unified_memory:
            per[name]["overhead"] += 2 * ACTIVATION_BYTES_PER_ELEMENT * e * n_tokens / d.gpu.host_link_bps
        nxt = order[idx + 1][0] if idx + 1 < len(order) else plan.head
        per[name]["comm"] += hop_time(cluster, name, nxt, e, n_tokens)
    # the head sends the embedded tokens to the first window's device
    if order and order[0][0] != plan.head:
        per[plan.head]["comm"] += hop_time(cluster, plan.head, order[0][0], e, n_tokens)
    # disk: bytes that do not fit are re-read every step; the head also reads one embedding row per token
    infeasible = check_memory(plan, cluster, model, workload)
    for a in plan.devices:
        costs = DeviceCosts(cluster.device(a.name), model, workload)
        use = memory_use(costs, a, a.name == plan.head)
        disk = disk_bytes_per_step(costs, use)
        if a.name == plan.head:
            disk += model.embedding_row_bytes * n_tokens
        per[a.name]["disk"] += disk / costs.disk_bps
    head_costs = DeviceCosts(cluster.device(plan.head), model, workload)
    head_s = head_costs.head_time(n_tokens, n_logits=1).total_s
    times = tuple(
        DeviceTimes(name=a.name, compute_s=per[a.name]["compute"], memory_s=per[a.name]["memory"],
                    disk_s=per[a.name]["disk"], comm_s=per[a.name]["comm"], overhead_s=per[a.name]["overhead"])
        for a in plan.devices
    )  # fmt: skip
    return StepBreakdown(times, head_s, tuple(infeasible))


def predict(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload) -> Prediction:
    """Analytic TPOT and TTFT of any plan, with a per-device breakdown of one decode step.

    TPOT is one decode step at the middle of generation. TTFT is the prompt prefilled in micro-batches of
    ``n_ubatch`` tokens, each passing through the whole ring in turn (one batch in flight, as in
    prima.cpp), plus the output head for the last token. A plan that cannot run (pinned memory or VRAM
    exceeded) gets infinite times.
    """
    decode = step_breakdown(plan, cluster, model, workload, 1)
    if decode.infeasible:
        return Prediction(method="halda-analytic", tpot_s=math.inf, ttft_s=math.inf,
                          prompt_tokens=workload.prompt_tokens, per_device=decode.per_device, head_s=decode.head_s)  # fmt: skip
    ttft = 0.0
    done = 0
    while done < workload.prompt_tokens:
        n = min(workload.n_ubatch, workload.prompt_tokens - done)
        ttft += step_breakdown(plan, cluster, model, workload, n, n_kv=done + n).total_s
        done += n
    return Prediction(
        method="halda-analytic",
        tpot_s=decode.total_s,
        ttft_s=ttft,
        prompt_tokens=workload.prompt_tokens,
        per_device=decode.per_device,
        head_s=decode.head_s,
    )
