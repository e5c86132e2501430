"""How a device's operating system and GPU treat memory: the one memory model of prima-sim.

Every question about a device's memory is answered here, and only here: how much RAM the model may use
without pushing other applications out, what is pinned and what pages, where GPU layers live and whether
they page, at which bandwidth and in which pattern a page fault reads the disk, what a Metal working set
does when it overflows, what Android swaps out first, how much VRAM a GPU backend keeps for itself, and how
many bytes a device re-reads per token when its weights do not fit. The planner (the integer program's
coefficients, the exact search, :func:`prima_sim.halda.costmodel.predict`), the baselines and the simulator
all read :class:`MemoryBehaviour`; no other module tests an OS or GPU name. A new OS or device kind is one
entry in :func:`behaviour_of` and one test.

The rules, by device kind:

========================  ==========================================================================
Linux (CPU, CUDA, ...)    budget = available RAM; weights are clean file pages in the page cache;
                          faults read at the *sequential* bandwidth with readahead (llama.cpp advises
                          ``POSIX_FADV_SEQUENTIAL``); CUDA/Vulkan/ROCm/SYCL layers are copied into VRAM
                          and never page; the backend keeps a reserve of VRAM free.
Android (Termux)          as Linux, but before evicting weights the OS swaps other apps out, up to
                          ``min(swappable, swap available)``: that memory is part of the budget.
macOS without Metal       budget = available RAM; faults read at the *random* bandwidth (no readahead
                          on APFS mappings, prima.cpp's measurement).
macOS with Metal          GPU memory *is* RAM: GPU layers' weights, KV cache and buffers count against
                          the same budget, which is the smaller of Metal's free working set and the
                          RAM really available (plus what macOS would swap out). A window is one Metal
                          buffer, resident as a whole or reloaded whole; over the budget every window
                          reloads every token (prima.cpp's Case 2).
Windows                   as Linux without readahead (random bandwidth), for completeness.
========================  ==========================================================================

Paging (:meth:`MemoryBehaviour.reread_bytes`): a device maps ``mapped`` bytes of weights and has ``room``
bytes of page cache for them. When everything fits nothing is read; otherwise the ring touches the mapped
weights cyclically once per token, and an LRU cache under a cyclic scan larger than itself hits nothing:
every mapped byte is re-read every token (what the simulator's page cache does, and what the emulation
measured when a window is a little larger than its cache; docs/emulation.md finding 8). A Metal working
set reloads whole for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from prima_sim.devices.profile import DeviceProfile
from prima_sim.units import MiB

CUDA_RESERVE_BYTES = 700 * MiB
"""VRAM prima.cpp keeps free for a discrete GPU backend's context and scratch (common.cpp, after several
OOM fixes); applies to every discrete GPU kind."""
METAL_RESERVE_BYTES = 300 * MiB
"""The same reserve on Metal."""
MIN_PAGING_DISK_BPS = 0.1e9
"""A disk slower than this is never planned to page weights (prima.cpp's ``min_disk_read_speed``)."""


@dataclass(frozen=True)
class MemoryBehaviour:
    """The memory rules of one device (see the module docstring). All sizes in bytes, rates in bytes/s.

    Attributes:
        name: the device's name (for messages).
        ram_budget_bytes: memory the run may use (weights in the page cache, KV cache, buffers; on unified
            memory the GPU's too) without pushing other applications out.
        swap_out_first_bytes: part of the budget that the OS makes by swapping other apps out first
            (Android), before it evicts any weight.
        pinned_budget_bytes: anonymous memory the run can pin at all (available RAM plus swap).
        vram_bytes: free memory of a discrete GPU (0 without one, and on unified memory).
        gpu_reserve_bytes: VRAM (or working set) the GPU backend keeps for itself.
        has_gpu: the device has a GPU backend (its buffers exist even without offloaded layers).
        gpu_memory_is_ram: GPU layers, GPU KV cache and GPU buffers live in RAM (Metal, unified memory).
        gpu_layers_page: GPU layers' weights are file pages that can be evicted and re-read (Metal maps the
            model's pages; a discrete GPU, or another unified-memory GPU backend, holds a copy).
        whole_window_residency: a window is resident or reloaded as a whole (one Metal buffer).
        fault_bps: bandwidth of the reads page faults and prefetch cause.
        readahead: faults also read ahead sequentially (Linux, Android).
        host_copy_bps: RAM<->VRAM copy bandwidth for a window's activations (0: no copies, unified).
        pages_weights: the disk is fast enough to plan weights that page (:data:`MIN_PAGING_DISK_BPS`).
    """

    name: str
    ram_budget_bytes: int
    swap_out_first_bytes: int
    pinned_budget_bytes: int
    vram_bytes: int
    gpu_reserve_bytes: int
    has_gpu: bool
    gpu_memory_is_ram: bool
    gpu_layers_page: bool
    whole_window_residency: bool
    fault_bps: float
    readahead: bool
    host_copy_bps: float
    pages_weights: bool

    # --- what a run pins, maps and needs --------------------------------------------------------------------
    def pinned_ram_bytes(self, kv_cpu: float, buffers_cpu: float, weights_gpu: float, kv_gpu: float,
                         buffers_gpu: float) -> float:
        """Anonymous RAM a run pins: KV cache and compute buffers, plus the GPU's when its memory is RAM (and
        its layers' weights too when they are copies rather than mapped file pages)."""
        pinned = kv_cpu + buffers_cpu
        if self.gpu_memory_is_ram:
            pinned += kv_gpu + buffers_gpu + (0.0 if self.gpu_layers_page else weights_gpu)
        return pinned

    def mapped_ram_bytes(self, weights_cpu: float, weights_gpu: float, head: float) -> float:
        """Weight bytes that live in the page cache (and may page): CPU layers and the head's output head,
        plus GPU layers when the GPU's memory is RAM."""
        mapped = weights_cpu + head
        if self.gpu_layers_page:
            mapped += weights_gpu
        return mapped

    def vram_need_bytes(self, weights_gpu: float, kv_gpu: float, buffers_gpu: float) -> float:
        """Memory a discrete GPU needs for its layers (0 when the GPU's memory is RAM)."""
        return 0.0 if self.gpu_memory_is_ram else weights_gpu + kv_gpu + buffers_gpu

    def cache_room(self, pinned_ram: float) -> tuple[float, float]:
        """(page-cache room for weights, extra room made by swapping other apps out) once ``pinned_ram`` is
        placed. Android's swap-out room is used only when needed; pinned memory beyond the available RAM
        already takes from it."""
        if self.swap_out_first_bytes <= 0:
            return max(0.0, self.ram_budget_bytes - pinned_ram), 0.0
        base = self.ram_budget_bytes - self.swap_out_first_bytes - pinned_ram
        growth = float(self.swap_out_first_bytes)
        if base < 0:
            growth = max(0.0, growth + base)
            base = 0.0
        return float(base), growth

    def weights_room(self, pinned_ram: float) -> float:
        """All the page cache weights can have once ``pinned_ram`` is placed (swap-out included)."""
        base, growth = self.cache_room(pinned_ram)
        return base + growth

    # --- paging ---------------------------------------------------------------------------------------------
    def reread_bytes(self, mapped: float, room: float) -> float:
        """Bytes re-read from disk per token when ``mapped`` bytes of weights are touched once per token in
        a cyclic order through ``room`` bytes of page cache: none when they fit, all of them when they do
        not (LRU under a cyclic scan; a Metal working set reloads whole)."""
        return float(mapped) if mapped > room + 0.5 else 0.0

    def read_seconds(self, nbytes: float) -> float:
        """Seconds the device's disk needs to read ``nbytes`` through page faults or prefetch."""
        return nbytes / self.fault_bps if nbytes > 0 else 0.0


def behaviour_of(d: DeviceProfile) -> MemoryBehaviour:
    """The memory rules of a device profile (the one place that looks at OS and GPU kinds)."""
    gpu = d.gpu
    metal = gpu is not None and gpu.kind == "metal"
    unified = metal or (gpu is not None and d.unified_memory)
    swap_first = min(d.swappable_bytes, d.swap_available_bytes) if d.os == "android" else 0
    if metal:
        assert gpu is not None
        budget = min(gpu.vram_free_bytes, d.ram_available_bytes + d.swappable_bytes)
    else:
        budget = d.ram_available_bytes + swap_first
    sequential = d.os in ("linux", "android")
    fault_bps = d.disk_seq_read_bps if sequential else d.disk_rand_read_bps
    reserve = 0 if gpu is None else (METAL_RESERVE_BYTES if metal else CUDA_RESERVE_BYTES)
    return MemoryBehaviour(
        name=d.name,
        ram_budget_bytes=int(budget),
        swap_out_first_bytes=int(swap_first),
        pinned_budget_bytes=int(d.ram_available_bytes + d.swap_available_bytes),
        vram_bytes=int(gpu.vram_free_bytes) if gpu is not None and not unified else 0,
        gpu_reserve_bytes=reserve,
        has_gpu=gpu is not None,
        gpu_memory_is_ram=unified,
        gpu_layers_page=metal,
        whole_window_residency=metal,
        fault_bps=float(fault_bps),
        readahead=sequential and not metal,
        host_copy_bps=float(gpu.host_link_bps) if gpu is not None and not unified else 0.0,
        pages_weights=fault_bps >= MIN_PAGING_DISK_BPS,
    )
