"""The analytic cost model: per-layer, per-hop and per-device times, memory and paging, a plan's TPOT/TTFT.

This module is the single description of what one step of the piped ring costs. Halda's exact search and
its integer program take their numbers from it, :func:`predict` scores any plan with it (so every scheduler
is judged by the same function), and the simulator takes its per-layer compute times and per-hop costs from
it, adding the dynamic mechanisms (page cache contents, queueing, contention) that a formula cannot express.

Per layer, on a device's CPU or GPU, for a batch of ``n`` tokens attending to ``n_kv`` cached tokens::

    t_layer = max(sum_q F_q / S_q, (layer bytes + KV bytes read) / BW) + t_kvcopy

a roofline: matmul work at the profiled throughput for each weight type, or streaming the weights and the
cache through memory, whichever is slower (prima.cpp's paper sums the two; its code drops the memory term;
see docs/halda.md for why we take the maximum). Per window (one ``llama_decode`` call) a fixed overhead; per
window boundary one hop: ``latency + (4 * n_embd * n + header) / bandwidth``. The head adds the embedding
lookup and the output head.

Memory and paging come from the device's :class:`~prima_sim.devices.behaviour.MemoryBehaviour`: what is
pinned (KV cache, buffers), what is mapped in the page cache (weights), how much room the cache has, and
how many bytes are re-read per token when the mapped weights do not fit. How those reads cost time depends
on prefetch (docs/halda.md, "Paging"):

* a device that runs one window per token (k = 1) cannot prefetch (the next window it needs is the one it
  just ran): its page faults stall its own compute, which overlaps the disk through readahead, so its
  window takes ``max(compute, read)``;
* a device with several windows (k >= 2) advises the kernel to load its next window right after sending
  its activations, so the read overlaps the other devices' work. In steady state the ring cannot turn
  faster than any such device's disk can read its share, so a token takes
  ``max(compute chain, max over prefetching devices of their reads per token / disk bandwidth)``;
* a window that does not fit in the room left for it cannot be prefetched (the advice evicts its own
  start: prima.cpp's prefetch-release conflict): it is charged as faults.

All times in seconds, sizes in bytes.

Why one module of this size: it is the one description of a ring step's cost. Halda's search
(:mod:`prima_sim.halda.search`) mirrors these functions array by array and the tests check that the two agree, so
every term lives here, side by side, where a change cannot miss one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from prima_sim.devices.behaviour import (
    STREAM_IN_FLIGHT,
    MemoryBehaviour,
    behaviour_of,
    fit_limit,
    streamed_count,
)
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile, TensorEntry, sum_flops
from prima_sim.devices.profile import DeviceProfile
from prima_sim.plan import DeviceAssignment, DeviceTimes, Plan, Prediction
from prima_sim.units import fmt_bytes
from prima_sim.workload import DEFAULT_UBATCH, Workload

__all__ = ["DEFAULT_UBATCH", "Workload"]  # re-exported while callers move to prima_sim.workload

HEADER_BYTES = 96
"""Per-hop message overhead beyond the activations (header frame with positions, shape, fingerprint)."""
ACTIVATION_BYTES_PER_ELEMENT = 4
"""Hidden states travel as float32, as in prima.cpp (``n_embd * n_tokens * 4`` bytes per hop)."""

CONTEXT_ANON_BYTES = 6 << 20
"""Anonymous memory of one llama.cpp context beyond its KV cache and the compute-buffer pages its graphs touch
(context and graph structures, output buffers, scheduler copies). Measured in the emulation's memory cgroups with
the 1B-shape model: a worker's peak anonymous memory grew by 4.5 MiB per extra window context (one window: 16 MiB
above the idle runtime, four one-layer windows: 30 MiB, KV cache 2.5 MiB), rounded up to cover the per-process part
that loading a model adds."""


def roofline(flops: dict[str, float], rate: Callable[[str], float], nbytes: float, bandwidth: float
             ) -> tuple[float, float]:  # fmt: skip
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


@dataclass(frozen=True)
class LayerSums:
    """Per-layer times of one device for one batch shape, as prefix sums (so any range costs O(1)).

    ``cpu[i]`` is the sum of layers ``[0, i)`` run on the CPU; ``cpu_compute[i]`` the part of it that is
    compute-bound (the rest is memory-bound); likewise on the GPU (equal to the CPU's without a GPU).
    """

    cpu: np.ndarray
    cpu_compute: np.ndarray
    gpu: np.ndarray
    gpu_compute: np.ndarray

    def window(self, start: int, end: int, gpu_layers: int) -> tuple[float, float]:
        """(compute-bound, memory-bound) seconds of layers ``[start, end)`` whose last ``gpu_layers`` run on
        the GPU."""
        split = end - gpu_layers
        total = self.cpu[split] - self.cpu[start] + self.gpu[end] - self.gpu[split]
        comp = (
            self.cpu_compute[split]
            - self.cpu_compute[start]
            + self.gpu_compute[end]
            - self.gpu_compute[split]
        )
        return float(comp), float(total - comp)


def _prefix(values: Sequence[float] | np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1)
    np.cumsum(values, out=out[1:])
    return out


@dataclass
class DeviceCosts:
    """Everything the cost model knows about one device for one model and workload."""

    device: DeviceProfile
    model: ModelProfile
    workload: Workload
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def memory(self) -> MemoryBehaviour:
        """The device's memory rules (budgets, paging, GPU memory)."""
        return behaviour_of(self.device)

    # --- per layer ------------------------------------------------------------------------------------
    def layer_time(self, layer: int, on_gpu: bool, n_tokens: int = 1, n_kv: int | None = None) -> LayerTime:
        """Time of ``layer`` for ``n_tokens`` tokens attending to ``n_kv`` cached tokens, on CPU or GPU."""
        n_kv = self.workload.decode_kv_tokens if n_kv is None else max(1, n_kv)
        m, d = self.model, self.device
        key = (m.layer_signatures[layer], on_gpu, n_tokens, m.layer_kv_tokens(layer, n_kv))
        hit: LayerTime | None = self._cache.get(key)
        if hit is not None:
            return hit
        flops = m.layer_flops(layer, n_tokens, n_kv)
        nbytes = m.layer_bytes[layer] + m.layer_kv_tokens(layer, n_kv) * m.kv_bytes_per_token_per_layer
        if on_gpu and d.gpu is not None:
            c, mem = roofline(flops, d.gpu_rate, nbytes, d.gpu.memory_bandwidth_bps)
            out = LayerTime(c, mem, d.gpu.kv_copy_s_per_layer * n_tokens)
        else:
            c, mem = roofline(flops, d.cpu_rate, nbytes, d.memory_bandwidth_bps)
            c /= d.batch_efficiency(n_tokens)  # a short prompt's micro-batch runs below the large-batch rate
            if d.matvec_bps:  # per-type streaming rates (added for prima_sim.emulate; empty = the line above)
                kv = m.layer_kv_tokens(layer, n_kv) * m.kv_bytes_per_token_per_layer
                mem = _typed_stream_s(m.layer_tensors(layer), d) + kv / d.memory_bandwidth_bps
            out = LayerTime(c, mem, d.kv_copy_s_per_layer * n_tokens)
        self._cache[key] = out
        return out

    def layer_sums(self, n_tokens: int = 1, n_kv: int | None = None) -> LayerSums:
        """Prefix sums of every layer's time on the CPU and on the GPU for this batch shape (cached)."""
        n_kv = self.workload.decode_kv_tokens if n_kv is None else max(1, n_kv)
        key = ("sums", n_tokens, n_kv)
        hit: LayerSums | None = self._cache.get(key)
        if hit is not None:
            return hit
        group, reps = self.model.layer_groups(n_kv)
        on_gpu = self.device.gpu is not None
        vals = np.array([[t.total_s, t.split()[0]] for i in reps
                         for t in (self.layer_time(i, False, n_tokens, n_kv), self.layer_time(i, on_gpu, n_tokens, n_kv))
                         ]).reshape(len(reps), 2, 2)  # fmt: skip
        per = vals[np.asarray(group)]  # (L, cpu/gpu, total/compute)
        out = LayerSums(
            _prefix(per[:, 0, 0]), _prefix(per[:, 0, 1]), _prefix(per[:, 1, 0]), _prefix(per[:, 1, 1])
        )
        self._cache[key] = out
        return out

    @cached_property
    def gpu_never_slower(self) -> bool:
        """No layer decodes slower on the GPU than on the CPU (False without a GPU)."""
        if self.device.gpu is None:
            return False
        sums = self.layer_sums()
        return bool(np.all(np.diff(sums.gpu) <= np.diff(sums.cpu) + 1e-15))

    @cached_property
    def gpu_never_faster(self) -> bool:
        """No layer decodes faster on the GPU than on the CPU (True without a GPU)."""
        sums = self.layer_sums()
        return bool(np.all(np.diff(sums.gpu) >= np.diff(sums.cpu) - 1e-15))

    @cached_property
    def layer_bytes_prefix(self) -> np.ndarray:
        """Prefix sums of the layers' weight bytes (``[i]`` = bytes of layers ``[0, i)``)."""
        return _prefix(self.model.layer_bytes)

    @cached_property
    def layer_kv_prefix(self) -> np.ndarray:
        """Prefix sums of the layers' KV-cache bytes for the workload's context."""
        return _prefix(self.layer_kv_bytes)

    @cached_property
    def mean_cpu_layer_s(self) -> float:
        """Average decode time of one layer on the CPU."""
        return float(self.layer_sums().cpu[-1]) / self.model.arch.n_layer

    @cached_property
    def mean_gpu_layer_s(self) -> float:
        """Average decode time of one layer on the GPU (CPU time if there is no GPU)."""
        return float(self.layer_sums().gpu[-1]) / self.model.arch.n_layer

    def head_time(self, n_tokens: int = 1, n_logits: int = 1) -> LayerTime:
        """Head work per step: embedding lookup for ``n_tokens`` and the output head for ``n_logits`` rows."""
        key = ("head", n_tokens, n_logits)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._head_time(n_tokens, n_logits)
        return hit

    def _head_time(self, n_tokens: int, n_logits: int) -> LayerTime:
        m, d = self.model, self.device
        flops = sum_flops([m.output_flops(n_logits)])
        nbytes = m.output_bytes + m.embedding_row_bytes * n_tokens
        c, mem = roofline(flops, d.cpu_rate, nbytes, d.memory_bandwidth_bps)
        if d.matvec_bps:  # per-type streaming rates (added for prima_sim.emulate; empty = the line above)
            mem = (
                _typed_stream_s(output_tensors(m), d)
                + m.embedding_row_bytes * n_tokens / d.memory_bandwidth_bps
            )
        return LayerTime(c, mem)

    def row_s(self, layer: int, on_gpu: bool, n_kv: int) -> float:
        """Seconds one more row adds to ``layer`` in a small batch (serving several sequences, verifying drafts):
        its matrix products and its attention over ``n_kv`` cached tokens at the device's rate for a further row
        of each type (``cpu_row_flops``, else ``cpu_flops``; on a GPU its ``flops``), plus its KV copy. The
        weights are read once per pass, by the first row, which :meth:`layer_time` costs; a further row finds
        them in cache and costs its arithmetic (docs/serve.md, "Predictions")."""
        m, d = self.model, self.device
        key = ("row", m.layer_signatures[layer], on_gpu, m.layer_kv_tokens(layer, max(1, n_kv)))
        hit: float | None = self._cache.get(key)
        if hit is None:
            gpu = on_gpu and d.gpu is not None
            rate = d.gpu_rate if gpu else d.row_rate
            copy = d.gpu.kv_copy_s_per_layer if gpu and d.gpu is not None else d.kv_copy_s_per_layer
            flops = m.layer_flops(layer, 1, max(1, n_kv))
            hit = self._cache[key] = sum(f / rate(t) for t, f in flops.items()) + copy
        return hit

    def window_rows_s(self, start: int, end: int, gpu_layers: int, n_kv: int) -> float:
        """:meth:`row_s` summed over layers ``[start, end)`` whose last ``gpu_layers`` run on the GPU."""
        split = end - gpu_layers
        return sum(self.row_s(i, i >= split, n_kv) for i in range(start, end))

    def logits_row_s(self) -> float:
        """Seconds one more row of logits adds to the output head (its matrix product at the rate of a further
        row, :meth:`DeviceProfile.row_rate`)."""
        return sum(f / self.device.row_rate(t) for t, f in sum_flops([self.model.output_flops(1)]).items())

    def window_overhead_s(self, n_tokens: int, gpu_layers: int) -> float:
        """Fixed cost of running one window: the ``llama_decode`` call, and the hidden state's copies to a
        discrete GPU and back when the window has GPU layers."""
        t = self.device.decode_overhead_s
        if gpu_layers and self.memory.host_copy_bps > 0:
            t += (
                2
                * ACTIVATION_BYTES_PER_ELEMENT
                * self.model.arch.n_embd
                * n_tokens
                / self.memory.host_copy_bps
            )
        return t

    # --- memory ---------------------------------------------------------------------------------------
    @cached_property
    def layer_kv_bytes(self) -> tuple[int, ...]:
        """KV-cache bytes every layer reserves for the workload's context."""
        n_seq = self.workload.n_seq  # serve --parallel: one n_ctx-token cache per sequence
        return tuple(b * n_seq for b in _layer_kv_bytes(self.model, self.workload.n_ctx))

    @cached_property
    def kv_bytes_per_layer(self) -> float:
        """Mean KV-cache bytes one layer reserves for the workload's context."""
        return sum(self.layer_kv_bytes) / self.model.arch.n_layer

    @cached_property
    def max_layer_kv_bytes(self) -> float:
        """KV-cache bytes of the layer with the largest cache (full-attention layers)."""
        return max(self.layer_kv_bytes)

    @cached_property
    def largest_layer_bytes(self) -> float:
        """Weights plus KV cache of the largest layer: what VRAM rows are sized by (VRAM cannot page)."""
        m = self.model
        return max(b + kv for b, kv in zip(m.layer_bytes, self.layer_kv_bytes, strict=True))

    def compute_buffer_bytes(self, with_logits: bool = False, touched: bool = False) -> int:
        """Scratch memory of one llama.cpp context (one window): what llama.cpp reserves for a micro-batch of
        ``n_ubatch`` tokens (prima.cpp's estimate; a GPU allocates all of it), or with ``touched`` what a CPU
        context really holds in RAM: the buffer is ``malloc``-ed and only the pages the graphs use are ever
        touched, so its resident size follows the largest batch run through it, the prompt's micro-batch
        (measured: a device running four one-layer windows of a 1B-shape model in 224 MiB, whose four reserves
        alone are 168 MB, decoded without paging; docs/sim.md, "Memory")."""
        n_ubatch = min(self.workload.n_ubatch, self.workload.n_ctx)
        if touched:
            n_ubatch = min(n_ubatch, self.workload.prompt_tokens)
        return self.model.compute_buffer_bytes(
            self.workload.n_ctx, n_ubatch, n_logit_rows=1 if with_logits else 0
        )

    def buffers(self, n_windows: int, is_head: bool) -> tuple[float, float]:
        """(CPU bytes, GPU bytes) of compute buffers for a device running ``n_windows`` windows.

        Every window is its own llama.cpp context with its own compute buffer (in RAM: the pages the prompt's
        micro-batch touches; on a GPU: the whole reserve); the head's last window also holds one row of logits. A device with a GPU backend also has GPU compute buffers and the backend's
        reserve, even without offloaded layers (llama.cpp initializes a present backend).
        """
        n_ctx_windows = n_windows + (1 if is_head else 0)  # the head also has its embedding context
        per_ctx = self.compute_buffer_bytes(touched=True) + CONTEXT_ANON_BYTES
        cpu = n_ctx_windows * per_ctx + (self.model.arch.n_vocab * 4 if is_head else 0)
        mem = self.memory
        gpu = (n_ctx_windows * self.compute_buffer_bytes() + mem.gpu_reserve_bytes) if mem.has_gpu else 0.0
        return float(cpu), float(gpu)

    @property
    def ram_budget_bytes(self) -> int:
        """Memory the model may use on this device (:attr:`MemoryBehaviour.ram_budget_bytes`)."""
        return self.memory.ram_budget_bytes

    @property
    def disk_bps(self) -> float:
        """Read bandwidth of page faults and prefetch (:attr:`MemoryBehaviour.fault_bps`)."""
        return self.memory.fault_bps


def _layer_kv_bytes(model: ModelProfile, n_ctx: int) -> tuple[int, ...]:
    group, reps = model.layer_groups(n_ctx)
    per = [model.layer_kv_bytes(i, n_ctx) for i in reps]
    return tuple(per[g] for g in group)


def output_tensors(model: ModelProfile) -> list[TensorEntry]:
    """The output head's tensors: final norm and ``output.weight`` (the embedding table when tied)."""
    out = [
        t
        for t in model.tensors
        if t.name in ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias")
    ]
    if model.tensor("output.weight") is None and (emb := model.tensor("token_embd.weight")) is not None:
        out.append(emb)
    return out


def _typed_stream_s(tensors: list[TensorEntry], device: DeviceProfile) -> float:
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
    return (
        link.latency_s
        + (ACTIVATION_BYTES_PER_ELEMENT * n_embd * n_tokens + HEADER_BYTES) / link.bandwidth_bps
    )


# --- memory of an assignment -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryUse:
    """Bytes one device needs for its part of a plan, and what its memory rules make of them.

    The first seven fields are what the plan asks for; the rest are derived by the device's
    :class:`~prima_sim.devices.behaviour.MemoryBehaviour`.
    """

    weights_cpu: float  # layer weights run by the CPU (page cache)
    weights_gpu: float  # layer weights run by the GPU (VRAM copy on a discrete GPU; mapped pages on Metal)
    kv_cpu: float  # KV cache of CPU layers (pinned)
    kv_gpu: float  # KV cache of GPU layers
    buffers_cpu: float  # compute buffers of the device's contexts (pinned)
    buffers_gpu: float  # GPU compute buffers and backend reserve
    head: float  # output head + embedding row, on the head only
    pinned_ram: float = 0.0  # anonymous RAM the run pins
    mapped_ram: float = 0.0  # weight bytes in the page cache
    vram_need: float = 0.0  # bytes a discrete GPU must hold
    room: float = 0.0  # page cache the weights can have (Android: swap-out included)

    @property
    def ram_total(self) -> float:
        """Everything that wants to live in RAM (weights in the page cache included)."""
        return self.mapped_ram + self.pinned_ram


def cpu_split(costs: DeviceCosts, a: DeviceAssignment, rng: tuple[int, int]) -> int:
    """Where window ``rng`` of ``a`` moves from CPU to GPU layers (its last ``gpu_layers`` run on the GPU when the
    device has one; otherwise every layer is a CPU layer and this is the window's end)."""
    return rng[1] - (a.gpu_layers_in(rng) if costs.device.gpu is not None else 0)


def memory_use(costs: DeviceCosts, a: DeviceAssignment, is_head: bool) -> MemoryUse:
    """Memory a device needs for assignment ``a`` (exact per layer), and its paging."""
    m = costs.model
    kv = costs.layer_kv_bytes
    w_cpu = w_gpu = kv_cpu = kv_gpu = 0.0
    for start, end in a.layers:
        split = cpu_split(costs, a, (start, end))
        w_cpu += sum(m.layer_bytes[start:split])
        kv_cpu += sum(kv[start:split])
        w_gpu += sum(m.layer_bytes[split:end])
        kv_gpu += sum(kv[split:end])
    buffers_cpu, buffers_gpu = costs.buffers(len(a.layers), is_head)
    head = head_extra_bytes(m) if is_head else 0.0
    return derive_memory(costs.memory, w_cpu, w_gpu, kv_cpu, kv_gpu, buffers_cpu, buffers_gpu, head)


def derive_memory(mem: MemoryBehaviour, w_cpu: float, w_gpu: float, kv_cpu: float, kv_gpu: float,
                  buffers_cpu: float, buffers_gpu: float, head: float) -> MemoryUse:  # fmt: skip
    """A :class:`MemoryUse` from raw needs, with pinned, mapped, VRAM, room and re-reads per the device's
    memory rules."""
    pinned = mem.pinned_ram_bytes(kv_cpu, buffers_cpu, w_gpu, kv_gpu, buffers_gpu)
    mapped = mem.mapped_ram_bytes(w_cpu, w_gpu, head)
    room = mem.weights_room(pinned)
    return MemoryUse(
        w_cpu,
        w_gpu,
        kv_cpu,
        kv_gpu,
        buffers_cpu,
        buffers_gpu,
        head,
        pinned_ram=pinned,
        mapped_ram=mapped,
        vram_need=mem.vram_need_bytes(w_gpu, kv_gpu, buffers_gpu),
        room=room,
    )


@dataclass(frozen=True)
class Paging:
    """What one device reads from disk per token, and how much of it the ring can hide.

    Attributes:
        reread: weight bytes read again per token (:meth:`MemoryBehaviour.reread_fraction` x mapped).
        hidden: the part read by prefetch while the other devices work (up to one read of each byte).
        fault: the part read by page faults in the device's own windows (the rest: when a prefetched window
            does not fit its room, the advice evicts its own reads and the faults read them again), which
            readahead overlaps with the device's whole work; streamed layers' reads are not in it.
        prefetching: the device advises its next window after each send.
        streamed: bytes of streamed layers read while the device computes (drop-behind: each advised only when
            the layer before it is released, so its read overlaps nothing but its own layers' compute).
        overlap: the layers ``[start, end)`` whose compute those reads overlap (empty without streaming).
    """

    reread: float
    hidden: float
    fault: float
    prefetching: bool
    streamed: float = 0.0
    overlap: tuple[int, int] = (0, 0)


def device_paging(
    costs: DeviceCosts,
    a: DeviceAssignment,
    use: MemoryUse,
    n_devices: int,
    prefetch: bool,
    is_head: bool = False,
) -> Paging:
    """The disk reads of device assignment ``a`` per token (docs/halda.md, "Paging").

    A device prefetches when prefetch is on, it runs several windows per token and it hands its activations to
    another device (the advice follows each send).
    """
    if a.streamed_layers:
        # drop-behind streaming (exec/stream.py): the streamed layers are read every token, each read ahead while
        # the layers before it compute; the first one while the device waits for its input (a worker: the head's
        # idle time is not counted), so like a prefetching device its token lasts at least all its reads; the
        # rest stays resident unless even it overflows the room
        lb = costs.model.layer_bytes
        start, end = streamed_range(costs, a)
        tail = float(sum(lb[start:end]))
        rest = costs.memory.reread_bytes(
            use.mapped_ram - tail + stream_in_flight_bytes(costs.model), use.room
        )
        hides_first = n_devices >= 2 and not is_head
        idle = float(lb[start]) if hides_first else 0.0
        return Paging(tail + rest, idle, rest, idle > 0, tail - idle, (start + int(hides_first), end))
    prefetching = prefetch and len(a.layers) >= 2 and n_devices >= 2
    windows = [window_paged_bytes(costs, a, r) for r in a.layers] if prefetching else []
    reread = costs.memory.reread_bytes(use.mapped_ram, use.room, prefetching, windows)
    hidden = min(reread, use.mapped_ram) if prefetching else 0.0
    return Paging(reread, hidden, reread - hidden, prefetching)


def stream_in_flight_bytes(model: ModelProfile) -> float:
    """Room a streaming device keeps for its streamed layers in flight (:data:`STREAM_IN_FLIGHT` of the model's
    largest layer)."""
    return STREAM_IN_FLIGHT * float(max(model.layer_bytes, default=0.0))


def streamed_range(costs: DeviceCosts, a: DeviceAssignment) -> tuple[int, int]:
    """The model layers ``[start, end)`` device ``a`` streams (``a.streamed_layers`` of its one window's last CPU
    layers; empty when it streams none)."""
    if not a.streamed_layers:
        return (0, 0)
    cpu_end = cpu_split(costs, a, a.layers[0])
    return (cpu_end - a.streamed_layers, cpu_end)


def choose_streaming(costs: DeviceCosts, a: DeviceAssignment, is_head: bool) -> int | None:
    """How many layers device ``a`` should stream (drop-behind, :func:`~prima_sim.devices.behaviour.streamed_count`):
    with one window (k = 1) on an OS whose page cache the executor can manage, when its weights exceed its room
    and streaming reads less per token than leaving the window to the page cache; None otherwise."""
    mem = costs.memory
    if len(a.layers) != 1 or not mem.can_stream:
        return None
    use = memory_use(costs, a, is_head)  # what it maps, streamed or not
    lb = [float(x) for x in costs.model.layer_bytes[a.layers[0][0] : cpu_split(costs, a, a.layers[0])]]
    t = streamed_count(
        use.mapped_ram, float(fit_limit(use.room, mem.kernel_lru)), lb, stream_in_flight_bytes(costs.model)
    )
    if t == 0 or sum(lb[len(lb) - t :]) >= mem.reread_bytes(use.mapped_ram, use.room):
        return None
    return t


def with_streaming(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload,
                   costs: dict[str, DeviceCosts] | None = None, stream: bool = True) -> Plan:  # fmt: skip
    """``plan`` with every device's ``streamed_layers`` chosen by :func:`choose_streaming` (k = 1 plans; others
    are returned unchanged, as is a plan whose choice does not change, or any plan when ``stream`` is False)."""
    if plan.k != 1 or not stream:
        return plan
    costs = _costs_for(plan, cluster, model, workload, costs)
    devices = tuple(
        a.model_copy(update={"streamed_layers": choose_streaming(costs[a.name], a, a.name == plan.head)})
        for a in plan.devices
    )
    if all(x.streamed_layers == a.streamed_layers for x, a in zip(devices, plan.devices, strict=True)):
        return plan
    return plan.model_copy(update={"devices": devices})


# --- prediction of a plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepBreakdown:
    """Per-device seconds of one ring step, the ring's wait for prefetching disks, and problems that make
    the plan impossible."""

    per_device: tuple[DeviceTimes, ...]
    head_s: float
    disk_wait_s: float = 0.0
    bound: str = "ring"
    infeasible: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        """The step's latency: the ring's chain (devices in turn, plus the head) or, when a prefetching
        disk is slower, that disk's reads."""
        return sum(t.total_s for t in self.per_device) + self.head_s + self.disk_wait_s


def check_memory(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload,
                 costs: dict[str, DeviceCosts] | None = None) -> list[str]:  # fmt: skip
    """Problems that make a plan impossible (memory that cannot be paged), as readable sentences."""
    costs = _costs_for(plan, cluster, model, workload, costs)
    problems: list[str] = []
    for a in plan.devices:
        c = costs[a.name]
        problems += memory_problems(c, a.name, memory_use(c, a, a.name == plan.head), a.gpu_layers)
    return problems


def memory_problems(costs: DeviceCosts, name: str, use: MemoryUse, gpu_layers: int) -> list[str]:
    """Why one device's share cannot run: pinned memory over RAM + swap, VRAM over the free VRAM, GPU layers
    on a device without a GPU."""
    out = []
    mem = costs.memory
    if use.pinned_ram > mem.pinned_budget_bytes:
        out.append(f"{name}: KV cache and compute buffers need {fmt_bytes(use.pinned_ram)} of RAM but "
                   f"{fmt_bytes(mem.pinned_budget_bytes)} is available (short by "
                   f"{fmt_bytes(use.pinned_ram - mem.pinned_budget_bytes)})")  # fmt: skip
    if gpu_layers and not mem.has_gpu:
        out.append(f"{name}: the plan puts {gpu_layers} layers per window on a GPU it does not have")
    elif use.vram_need > 0 and gpu_layers and use.vram_need > mem.vram_bytes:
        out.append(f"{name}: GPU layers need {fmt_bytes(use.vram_need)} of VRAM but {fmt_bytes(mem.vram_bytes)} "
                   f"is free (short by {fmt_bytes(use.vram_need - mem.vram_bytes)})")  # fmt: skip
    return out


def step_breakdown(
    plan: Plan,
    cluster: Cluster,
    model: ModelProfile,
    workload: Workload,
    n_tokens: int = 1,
    n_kv: int | None = None,
    prefetch: bool = True,
    costs: dict[str, DeviceCosts] | None = None,
    n_logits: int = 1,
) -> StepBreakdown:
    """Per-device time of one step (``n_tokens`` tokens through every window, then the head's output head for
    ``n_logits`` rows).

    ``costs`` may carry :class:`DeviceCosts` already built for these devices, model and workload (reused).
    """
    e = model.arch.n_embd
    order = plan.execution_order()
    costs = _costs_for(plan, cluster, model, workload, costs)
    per: dict[str, dict[str, float]] = {a.name: dict.fromkeys(("compute", "memory", "disk", "comm", "overhead"), 0.0)
                                         for a in plan.devices}  # fmt: skip
    work: dict[str, float] = dict.fromkeys(per, 0.0)  # compute + memory + overhead of each device's windows
    for idx, (name, (start, end)) in enumerate(order):
        a, c = plan.device(name), costs[name]
        g = a.gpu_layers_in((start, end)) if c.device.gpu is not None else 0
        comp, mem_s = c.layer_sums(n_tokens, n_kv).window(start, end, g)
        ovh = c.window_overhead_s(n_tokens, g)
        per[name]["compute"] += comp
        per[name]["memory"] += mem_s
        per[name]["overhead"] += ovh
        work[name] += comp + mem_s + ovh
        nxt = order[idx + 1][0] if idx + 1 < len(order) else plan.head
        per[name]["comm"] += hop_time(cluster, name, nxt, e, n_tokens)
    if order and order[0][0] != plan.head:  # the head sends the embedded tokens to the first window's device
        per[plan.head]["comm"] += hop_time(cluster, plan.head, order[0][0], e, n_tokens)
    head_costs = costs[plan.head]
    head_s = head_costs.head_time(n_tokens, n_logits=n_logits).total_s
    work[plan.head] += head_s
    infeasible: list[str] = []
    reads: dict[str, tuple[float, float, bool]] = {}
    load_bound, bound = 0.0, "ring"
    for a in plan.devices:
        c = costs[a.name]
        use = memory_use(c, a, a.name == plan.head)
        infeasible += memory_problems(c, a.name, use, a.gpu_layers)
        pg = device_paging(c, a, use, len(plan.devices), prefetch, a.name == plan.head)
        emb = model.embedding_row_bytes * n_tokens if a.name == plan.head else 0.0
        read_b = pg.reread + emb
        reads[a.name] = (read_b, c.memory.read_seconds(read_b), pg.prefetching and pg.hidden > 0)
        # one disk serves the advice and the faults: a prefetching device's token lasts at least all its reads
        load = c.memory.read_seconds(read_b) if pg.hidden > 0 else 0.0
        if load > load_bound:
            load_bound, bound = load, f"disk of {a.name}"
        # faults stall the device's own compute, which overlaps the disk through readahead; a streamed layer's
        # read only its own layers' compute (it is advised when the layer before it is released)
        per[a.name]["disk"] += max(0.0, c.memory.read_seconds(pg.fault + emb) - work[a.name])
        if pg.streamed > 0:
            sums = c.layer_sums(n_tokens, n_kv)
            overlap = float(sums.cpu[pg.overlap[1]] - sums.cpu[pg.overlap[0]])
            per[a.name]["disk"] += max(0.0, c.memory.read_seconds(pg.streamed) - overlap)
    chain = sum(sum(v.values()) for v in per.values()) + head_s
    times = tuple(
        DeviceTimes(name=a.name, compute_s=per[a.name]["compute"], memory_s=per[a.name]["memory"],
                    disk_s=per[a.name]["disk"], comm_s=per[a.name]["comm"], overhead_s=per[a.name]["overhead"],
                    read_bytes=reads[a.name][0], read_s=reads[a.name][1], prefetch=reads[a.name][2])
        for a in plan.devices
    )  # fmt: skip
    wait = max(0.0, load_bound - chain)
    return StepBreakdown(times, head_s, wait, bound if wait > 0 else "ring", tuple(infeasible))


def window_paged_bytes(c: DeviceCosts, a: DeviceAssignment, rng: tuple[int, int]) -> float:
    """Mapped bytes one prefetch must hold at once: a window's paged layers, and for the head's last window
    also the output head, which is advised with it (the logits window of docs/emulation.md finding 9)."""
    start, end = rng
    split = cpu_split(c, a, rng)
    lb = c.model.layer_bytes
    nbytes = float(sum(lb[start:split]) + (sum(lb[split:end]) if c.memory.gpu_layers_page else 0))
    if end == c.model.arch.n_layer:
        nbytes += head_extra_bytes(c.model)
    return nbytes


def _costs_for(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload,
               costs: dict[str, DeviceCosts] | None) -> dict[str, DeviceCosts]:  # fmt: skip
    costs = {} if costs is None else costs
    for a in plan.devices:
        if a.name not in costs:
            costs[a.name] = DeviceCosts(cluster.device(a.name), model, workload)
    return costs


def predict(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, prefetch: bool = True,
            costs: dict[str, DeviceCosts] | None = None) -> Prediction:  # fmt: skip
    """Analytic TPOT and TTFT of any plan, with a per-device breakdown of one decode step.

    TPOT is one decode step at the middle of generation. TTFT is the prompt prefilled in micro-batches of
    ``n_ubatch`` tokens, each passing through the whole ring in turn (one batch in flight, as in
    prima.cpp), plus the output head for the last token. ``prefetch`` says whether devices advise the kernel
    to load their next window (the executor's default). A plan that cannot run (pinned memory or VRAM
    exceeded) gets infinite times. ``costs`` may carry :class:`DeviceCosts` already built (reused).
    """
    costs = _costs_for(plan, cluster, model, workload, costs)
    decode = step_breakdown(plan, cluster, model, workload, 1, prefetch=prefetch, costs=costs)
    if decode.infeasible:
        return Prediction(method="halda-analytic", tpot_s=math.inf, ttft_s=math.inf,
                          prompt_tokens=workload.prompt_tokens, per_device=decode.per_device, head_s=decode.head_s,
                          prefetch=prefetch)  # fmt: skip
    ttft = 0.0
    done = 0
    while done < workload.prompt_tokens:
        n = min(workload.n_ubatch, workload.prompt_tokens - done)
        ttft += step_breakdown(
            plan, cluster, model, workload, n, n_kv=done + n, prefetch=prefetch, costs=costs
        ).total_s
        done += n
    return Prediction(
        method="halda-analytic",
        tpot_s=decode.total_s,
        ttft_s=ttft,
        prompt_tokens=workload.prompt_tokens,
        per_device=decode.per_device,
        head_s=decode.head_s,
        disk_wait_s=decode.disk_wait_s,
        bound=decode.bound,
        prefetch=prefetch,
    )


# --- serving: several sequences per pass, speculative decoding ---------------------------------------------
def pass_breakdown(
    plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, n_rows: int, n_logits: int = 1,
    n_kv: int | None = None, prefetch: bool = True, costs: dict[str, DeviceCosts] | None = None,
) -> StepBreakdown:  # fmt: skip
    """One pass of a small batch through the ring: ``n_rows`` rows (of one or several sequences) through every
    window, ``n_logits`` of them with logits from the output head, each attending to ``n_kv`` cached tokens.

    The first row costs what one decoded token costs (:func:`step_breakdown`: the roofline, the weights
    streamed from memory, paging, the decode calls, the hops); every further row adds its arithmetic at the
    device's rate for a further row (:meth:`DeviceCosts.row_s`; the weights are in cache by then) and its share of the
    hops' bytes, each further row of logits the output head's arithmetic. On a CPU that streams weights about
    as fast as it multiplies them this is what a pass costs (``max(memory, n x compute)`` is too kind: the
    matmul kernels overlap one row's dot products with the weights' stream, not eight); a pass of many rows
    (a long prompt's micro-batch) is :func:`step_breakdown`'s.
    """
    if n_rows < 1 or not 1 <= n_logits <= n_rows:
        raise ValueError(f"a pass needs 1 <= n_logits <= n_rows, got {n_logits} of {n_rows}")
    costs = _costs_for(plan, cluster, model, workload, costs)
    base = step_breakdown(plan, cluster, model, workload, 1, n_kv=n_kv, prefetch=prefetch, costs=costs)
    if n_rows == 1 and n_logits == 1:
        return base
    kv = workload.decode_kv_tokens if n_kv is None else max(1, n_kv)
    e, more = model.arch.n_embd, n_rows - 1
    extra = {a.name: [0.0, 0.0, 0.0] for a in plan.devices}  # compute, comm, overhead
    order = plan.execution_order()
    for idx, (name, (start, end)) in enumerate(order):
        a, c = plan.device(name), costs[name]
        g = a.gpu_layers_in((start, end)) if c.device.gpu is not None else 0
        extra[name][0] += more * c.window_rows_s(start, end, g, kv)
        extra[name][2] += c.window_overhead_s(n_rows, g) - c.window_overhead_s(1, g)
        nxt = order[idx + 1][0] if idx + 1 < len(order) else plan.head
        extra[name][1] += hop_time(cluster, name, nxt, e, n_rows) - hop_time(cluster, name, nxt, e, 1)
    if order and order[0][0] != plan.head:
        extra[plan.head][1] += hop_time(cluster, plan.head, order[0][0], e, n_rows) - hop_time(
            cluster, plan.head, order[0][0], e, 1
        )
    head_s = base.head_s + (n_logits - 1) * costs[plan.head].logits_row_s()
    per = tuple(
        t.model_copy(update={"compute_s": t.compute_s + extra[t.name][0], "comm_s": t.comm_s + extra[t.name][1],
                             "overhead_s": t.overhead_s + extra[t.name][2]})
        for t in base.per_device
    )  # fmt: skip
    added = sum(x for v in extra.values() for x in v) + head_s - base.head_s
    wait = max(0.0, base.disk_wait_s - added)  # a longer chain hides more of a prefetching disk's reads
    return StepBreakdown(per, head_s, wait, base.bound if wait > 0 else "ring", base.infeasible)


@dataclass(frozen=True)
class ServingPoint:
    """Decoding ``concurrency`` sequences together, one row each per pass through the ring (continuous
    batching, ``prima-sim serve --parallel``)."""

    concurrency: int
    pass_s: float  # one pass: every window runs ``concurrency`` rows, the head samples as many tokens
    tpot_s: float  # each request's time per output token (= pass_s)
    throughput_tps: float  # tokens per second of all requests together, their prompts' prefill included
    prefill_s: float = 0.0  # the passes that prefill ``concurrency`` prompts together (first tokens included)


def serving_curve(
    plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, levels: Sequence[int],
    prefetch: bool = True,
) -> list[ServingPoint]:  # fmt: skip
    """Per-request TPOT and aggregate throughput against the number of sequences decoded together.

    ``concurrency`` clients each send requests of the workload's shape (``prompt_tokens``, then
    ``decode_tokens + 1`` generated tokens) back to back. A decode pass carries one row per sequence
    (:func:`pass_breakdown`: the weights read once, each row's arithmetic added), every row attending to the
    cached tokens of all the sequences (``serve`` keeps them in one unified KV cache, whose cells every row's
    attention reads, masked). Per round of ``concurrency`` requests their prompts are prefilled together in
    passes of up to ``n_ubatch`` rows, the last one giving each its first token, and ``decode_tokens`` decode
    passes follow: aggregate tokens/s = concurrency x (decode_tokens + 1) / (prefill + decode_tokens x pass).
    TPOT is one decode pass. A plan that cannot run gives infinities.
    """
    costs: dict[str, DeviceCosts] = {}
    out = []
    for n in levels:
        if n < 1:
            raise ValueError(f"concurrency must be at least 1, got {n}")
        b = pass_breakdown(
            plan, cluster, model, workload, n, n, n * workload.decode_kv_tokens, prefetch, costs
        )
        t = math.inf if b.infeasible else b.total_s
        rows, done, prefill = n * workload.prompt_tokens, 0, 0.0
        while done < rows:
            k = min(workload.n_ubatch, rows - done)
            last = done + k == rows
            prefill += pass_breakdown(plan, cluster, model, workload, k, min(n, k) if last else 1, done + k,
                                      prefetch, costs).total_s  # fmt: skip
            done += k
        d = workload.decode_tokens
        round_s = prefill + d * t
        out.append(ServingPoint(n, t, t, n * (d + 1) / round_s if round_s > 0 else math.inf, prefill))
    return out


def draft_memory_bytes(device: DeviceProfile, draft: ModelProfile, workload: Workload) -> float:
    """RAM a draft model takes on the head (``serve``/``run --draft``): its whole GGUF mapped, and kept resident
    (it runs every layer for every drafted token: paged out it would be read from disk each time), its KV cache
    (one ``n_ctx`` sequence per ``serve`` slot, the workload's ``n_seq``), its context's touched compute buffer
    and logits row."""
    c = DeviceCosts(device, draft, workload)
    buffers = (
        c.compute_buffer_bytes(with_logits=True, touched=True) + CONTEXT_ANON_BYTES + draft.arch.n_vocab * 4
    )
    return float(draft.total_bytes + sum(c.layer_kv_bytes) + buffers)


def charge_draft(cluster: Cluster, draft: ModelProfile, workload: Workload) -> Cluster:
    """``cluster`` with the head's available RAM less :func:`draft_memory_bytes`: what is left for the target's
    share when a draft model runs beside it (the planner plans on it; devices other than the head are unchanged).
    """
    head = cluster.device(cluster.head_name)
    left = max(0, int(head.ram_available_bytes - draft_memory_bytes(head, draft, workload)))
    devices = tuple(
        d.model_copy(update={"ram_available_bytes": left}) if d.name == head.name else d
        for d in cluster.devices
    )
    return cluster.model_copy(update={"devices": devices})


@dataclass(frozen=True)
class SpeculationPrediction:
    """TPOT with a draft model on the head proposing up to ``draft_max`` tokens, each accepted with
    probability ``accept``, verified by the ring in one pass of ``draft_max + 1`` rows."""

    draft_id: str
    draft_max: int
    accept: float
    expected_tokens: float  # tokens produced per verification pass (accepted drafts plus the ring's own)
    draft_s: float  # the draft model's time per token on the head's CPU
    verify_s: float  # one pass of the ring with draft_max + 1 rows
    tpot_s: float
    plain_tpot_s: float

    @property
    def speedup(self) -> float:
        """Plain TPOT over speculative TPOT."""
        return self.plain_tpot_s / self.tpot_s if self.tpot_s > 0 else math.inf


def draft_token_s(head: DeviceProfile, draft: ModelProfile, workload: Workload) -> float:
    """Seconds one drafted token costs on the head: every layer of the draft model on its CPU, one token, weights
    in memory, and its output head."""
    dc = DeviceCosts(head, draft, workload)
    comp, mem = dc.layer_sums(1).window(0, draft.arch.n_layer, 0)
    return comp + mem + dc.head_time(1, 1).total_s


def expected_tokens(accept: float, draft_max: int) -> float:
    """Tokens per verification pass when each of ``draft_max`` drafted tokens is accepted with probability
    ``accept`` until the first rejection (the ring's own token always counts): (1 - a^(d+1)) / (1 - a)."""
    if not 0.0 <= accept <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {accept}")
    if accept == 1.0:
        return float(draft_max + 1)
    return float((1.0 - accept ** (draft_max + 1)) / (1.0 - accept))


def speculation(
    plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload, draft: ModelProfile, accept: float,
    draft_max: int = 4, prefetch: bool = True,
) -> SpeculationPrediction:  # fmt: skip
    """TPOT of speculative decoding (prima.cpp's ``-md draft.gguf --draft-max N``) for a given acceptance rate.

    Per verification pass the head runs the draft model ``draft_max`` times (every layer on its CPU, one
    token each, weights in memory) and the ring verifies the ``draft_max + 1`` rows in one pass
    (:func:`pass_breakdown`); on average
    :func:`expected_tokens` tokens come out of it.
    """
    if draft_max < 1:
        raise ValueError(f"draft_max must be at least 1, got {draft_max}")
    plain = step_breakdown(plan, cluster, model, workload, 1, prefetch=prefetch)
    verify = pass_breakdown(plan, cluster, model, workload, draft_max + 1, draft_max + 1, prefetch=prefetch)
    draft_s = draft_token_s(cluster.device(plan.head), draft, workload)
    e = expected_tokens(accept, draft_max)
    inf = bool(plain.infeasible or verify.infeasible)
    tpot = math.inf if inf else (verify.total_s + draft_max * draft_s) / e
    return SpeculationPrediction(draft.id, draft_max, accept, e, draft_s, verify.total_s, tpot,
                                 math.inf if inf else plain.total_s)  # fmt: skip
