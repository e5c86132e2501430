"""What a device can do: the typed, versioned device profile.

A :class:`DeviceProfile` holds prima.cpp's ``device_info`` in SI units: CPU and GPU throughput per weight
quantization type, memory read bandwidth, RAM/VRAM/swap, the operating system's memory behaviour, disk read
bandwidth (sequential and random) and where every figure came from. Profiles are written by
``prima-sim profile`` (measured on a host) or by hand from spec sheets (``datasets/devices/*.toml``, each
figure with its source).

Files may write quantities with units ("8 GiB", "2.98 GB/s", "350 GFLOPS", "0.05 ms"); see
:mod:`prima_sim.units`.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, PositiveFloat, field_validator, model_validator

from prima_sim.devices.ggml_types import TYPE_BY_NAME
from prima_sim.schema import FrozenModel
from prima_sim.units import Bandwidth, Bytes, FlopRate, PositiveBandwidth, Seconds, fmt_bytes


def lower_name(v: object) -> object:
    """A name from a closed set as written in a file, lower-cased (``"Linux"``, ``"CUDA"``, ``"Q4_K"`` are
    accepted as their lower-case forms; anything that is not a string is left for the type check)."""
    return v.lower() if isinstance(v, str) else v


OSFamily = Annotated[Literal["linux", "macos", "android", "windows"], BeforeValidator(lower_name)]
"""Operating system family (case-insensitive in files)."""
GpuKind = Annotated[Literal["cuda", "metal", "vulkan", "rocm", "sycl"], BeforeValidator(lower_name)]
"""GPU backend of llama.cpp (case-insensitive in files)."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_name(v: str) -> str:
    """``v`` if it is a valid device or scenario name (:data:`NAME_PATTERN`), else ValueError saying what is."""
    if not NAME_PATTERN.match(v):
        raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return v


def lower_keys(v: object) -> object:
    """A table keyed by ggml type names, with the names lower-cased (``Q4_K`` = ``q4_k``).

    Raises:
        ValueError: two keys differ only in case.
    """
    if not isinstance(v, dict):
        return v
    out = {lower_name(k): x for k, x in v.items()}
    if len(out) != len(v):
        raise ValueError(f"type names repeat when case is ignored: {sorted(v)}")
    return out


def _check_types(rates: dict[str, float]) -> dict[str, float]:
    bad = [k for k in rates if k not in TYPE_BY_NAME]
    if bad:
        raise ValueError(f"unknown ggml type(s) {bad}; use names like f32, f16, q4_k, q6_k, q8_0")
    if "f32" not in rates:
        raise ValueError("must include 'f32' (element-wise work runs in f32)")
    return rates


class Provenance(FrozenModel):
    """Where a profile's figures came from."""

    kind: Annotated[Literal["measured", "spec", "derived", "manual"], BeforeValidator(lower_name)] = Field(
        description="measured by prima-sim profile, taken from spec sheets/benchmarks, derived from others, or "
        "written by hand without stated sources (the default of a file without [provenance])"
    )
    host: str = Field(default="", description="host the profile was measured on")
    date: str = Field(default="", description="ISO date of the measurement or of the sources")
    tool: str = Field(default="", description="tool and version that measured it")
    references: tuple[str, ...] = Field(default=(), description="URLs or citations for spec figures")
    notes: str = Field(default="", description="anything else worth knowing")


class GpuProfile(FrozenModel):
    """A GPU (or Apple's Metal device) as llama.cpp's backend sees it."""

    kind: GpuKind = Field(
        description="llama.cpp backend: cuda (NVIDIA), metal (Apple), vulkan, rocm (AMD), sycl (Intel)"
    )
    name: str = Field(default="", description="the GPU's name (for people)")
    flops: Annotated[dict[str, FlopRate], BeforeValidator(lower_keys)] = Field(
        description="matmul throughput per weight ggml type, FLOP/s (must include f32)"
    )
    vram_total_bytes: Bytes = Field(description="GPU memory (Metal: the working-set limit)")
    vram_free_bytes: Bytes = Field(description="GPU memory free for the model (at most vram_total_bytes)")
    memory_bandwidth_bps: PositiveBandwidth = Field(description="VRAM read bandwidth")
    kv_copy_s_per_layer: Seconds = Field(
        default=0.0, description="time to append one token's K and V, per layer"
    )
    working_set_limit_bytes: Bytes | None = Field(
        default=None, description="Metal: recommendedMaxWorkingSetSize; over it, weights reload every token"
    )
    host_link_bps: Bandwidth = Field(default=0.0, description="RAM<->VRAM copy bandwidth (PCIe); 0 = unified")

    @field_validator("flops")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_types(v)

    @model_validator(mode="after")
    def _free_le_total(self) -> GpuProfile:
        if self.vram_free_bytes > self.vram_total_bytes:
            raise ValueError(f"vram_free_bytes ({fmt_bytes(self.vram_free_bytes)}) exceeds vram_total_bytes "
                             f"({fmt_bytes(self.vram_total_bytes)})")  # fmt: skip
        return self


class DeviceProfile(FrozenModel):
    """One device of a home cluster, in SI units."""

    schema_version: Literal[1] = Field(default=1, description="device format version")
    name: str = Field(
        description="identifier used in cluster files and plans (letters, digits, '_', '.', '-')"
    )
    os: OSFamily = Field(
        description="operating system: decides how memory is budgeted and how pages are read"
    )
    unified_memory: bool = Field(default=False, description="CPU and GPU share RAM (Apple Silicon)")
    cores: int = Field(gt=0, description="CPU cores llama.cpp may use")
    threads: int | None = Field(default=None, gt=0, description="threads llama.cpp uses; default = cores")
    cpu_flops: Annotated[dict[str, FlopRate], BeforeValidator(lower_keys)] = Field(
        description="CPU matmul throughput per weight ggml type, FLOP/s (must include f32; a type not listed "
        "falls back to a similar one)"
    )
    memory_bandwidth_bps: PositiveBandwidth = Field(description="CPU read bandwidth from RAM")
    ram_total_bytes: Bytes = Field(description="installed RAM")
    ram_available_bytes: Bytes = Field(
        description="memory the model may use (page cache included; 'available' of free -h)"
    )
    swap_total_bytes: Bytes = Field(default=0, description="swap space")
    swap_available_bytes: Bytes = Field(default=0, description="free swap space")
    swappable_bytes: Bytes = Field(
        default=0,
        description="anonymous memory the OS would swap out first (Android, macOS: other apps'; Linux with swap: "
        "the run's own cold memory)",
    )
    kv_copy_s_per_layer: Seconds = Field(
        default=0.0, description="CPU time to append one token's K and V, per layer"
    )
    decode_overhead_s: Seconds = Field(
        default=0.0, description="fixed time of one llama_decode call on this device (graph build, threads)"
    )
    disk_seq_read_bps: PositiveBandwidth = Field(
        description="sequential read bandwidth of the disk holding the model"
    )
    disk_rand_read_bps: PositiveBandwidth = Field(
        description="4 KiB random read bandwidth (macOS pages in with these)"
    )
    disk_throttle_slice_s: Seconds | None = Field(
        default=None,
        description="the disk is a Linux cgroup read limit (blk-throttle) at disk_seq_read_bps over a faster disk, "
        "as prima-sim emulate makes each device's: the limit grants its budget in slices of this length (100 ms "
        "on Linux 6.x), so a read after a pause gets up to a slice's bytes at once; the simulator serves such a "
        "disk's reads as the kernel lets them through (prima_sim.sim.disk.BlkThrottle). Unset = a real disk",
    )
    # Added for prima_sim.emulate (owner: emulation): optional, empty = memory_bandwidth_bps for every type.
    matvec_bps: Annotated[dict[str, PositiveBandwidth], BeforeValidator(lower_keys)] = Field(
        default_factory=dict,
        description="decode (matrix-vector) streaming rate of weights of a given ggml type, where it differs from "
        "memory_bandwidth_bps: on a CPU with few threads dequantization makes some types compute-bound "
        "(one thread here: q4_0 ~10 GB/s, q6_k ~20 GB/s); measured by prima-sim emulate",
    )
    cpu_batch_efficiency: dict[int, PositiveFloat] = Field(
        default_factory=dict,
        description="prefill micro-batch of n tokens: the rate a layer's matrix products run at, as a fraction of "
        "cpu_flops (keys: tokens per batch, e.g. {16: 0.91, 128: 1.05}; interpolated in log(n) between keys, the "
        "nearest key outside them; empty = 1). Short prompts run below the large-batch matmul rate; measured by "
        "prima-sim profile --model",
    )
    cpu_row_flops: Annotated[dict[str, FlopRate], BeforeValidator(lower_keys)] = Field(
        default_factory=dict,
        description="CPU matmul throughput of each further row of a small batch (serving several sequences, "
        "verifying a draft's tokens) per weight type, FLOP/s: the first row streams the weights, the next ones find "
        "them in cache and cost their dot products, at a rate that can differ from cpu_flops (short rows, no tiled "
        "GEMM). Measured by prima-sim profile on the model's own matrices, one and eight rows; a type not listed "
        "uses cpu_flops",
    )
    gpu: GpuProfile | None = Field(default=None, description="its GPU, if llama.cpp can use one")
    provenance: Provenance = Field(
        default=Provenance(kind="manual"),
        description="where the figures came from (default: written by hand)",
    )
    sources: dict[str, str] = Field(default_factory=dict, description="per-field source notes")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v)

    @field_validator("cpu_flops")
    @classmethod
    def _known_types(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_types(v)

    @field_validator("matvec_bps", "cpu_row_flops")
    @classmethod
    def _known_type_names(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in TYPE_BY_NAME]
        if bad:
            raise ValueError(f"unknown ggml type(s) {bad}; use names like q4_0, q6_k, q8_0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.ram_available_bytes > self.ram_total_bytes:
            raise ValueError(f"ram_available_bytes ({fmt_bytes(self.ram_available_bytes)}) exceeds ram_total_bytes "
                             f"({fmt_bytes(self.ram_total_bytes)})")  # fmt: skip
        if self.swap_available_bytes > self.swap_total_bytes:
            raise ValueError(f"swap_available_bytes ({fmt_bytes(self.swap_available_bytes)}) exceeds swap_total_bytes "
                             f"({fmt_bytes(self.swap_total_bytes)})")  # fmt: skip
        if self.disk_throttle_slice_s is not None and self.disk_throttle_slice_s <= 0:
            raise ValueError(
                "disk_throttle_slice_s must be > 0 (leave it out for a disk without a read limit)"
            )
        if self.gpu is not None and self.gpu.kind == "metal" and self.os != "macos":
            raise ValueError("a Metal GPU needs os = 'macos'")
        return self

    # --- conveniences used by the planner and the simulator -------------------------------------------
    @property
    def n_threads(self) -> int:
        """Threads llama.cpp runs with on this device."""
        return self.threads or self.cores

    @property
    def has_gpu(self) -> bool:
        """Whether the device can offload layers to a GPU (CUDA, Metal, ...)."""
        return self.gpu is not None

    @property
    def is_metal(self) -> bool:
        """Whether the GPU is Apple's Metal (unified memory, working-set limit)."""
        return self.gpu is not None and self.gpu.kind == "metal"

    @property
    def disk_read_bps(self) -> float:
        """The disk bandwidth that page faults see: sequential on Linux and Android (llama.cpp advises
        ``POSIX_FADV_SEQUENTIAL`` and the kernel reads ahead), random on macOS and Windows."""
        return self.disk_seq_read_bps if self.os in ("linux", "android") else self.disk_rand_read_bps

    def stream_bps(self, ggml_type: str) -> float:
        """Rate at which decode streams weights of ``ggml_type`` on the CPU (``matvec_bps``, else the memory
        bandwidth)."""
        return self.matvec_bps.get(ggml_type, self.memory_bandwidth_bps)

    def cpu_rate(self, ggml_type: str) -> float:
        """CPU throughput for a weight type; a missing type falls back to the closest profiled one."""
        return _rate(self.cpu_flops, ggml_type)

    def row_rate(self, ggml_type: str) -> float:
        """CPU throughput of a further row of a small batch for a weight type (``cpu_row_flops``, else
        :meth:`cpu_rate`)."""
        return self.cpu_row_flops.get(ggml_type) or self.cpu_rate(ggml_type)

    def batch_efficiency(self, n_tokens: int) -> float:
        """``cpu_batch_efficiency`` at ``n_tokens`` (log-linear between measured batch sizes; 1 when unmeasured
        or for one token, whose decode is bound by memory, not by this rate)."""
        eff = self.cpu_batch_efficiency
        if not eff or n_tokens < 2:
            return 1.0
        keys = sorted(eff)
        if n_tokens <= keys[0]:
            return eff[keys[0]]
        if n_tokens >= keys[-1]:
            return eff[keys[-1]]
        for lo, hi in itertools.pairwise(keys):
            if lo <= n_tokens <= hi:
                f = (math.log(n_tokens) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return eff[lo] + f * (eff[hi] - eff[lo])
        return 1.0  # unreachable: keys cover n_tokens

    def gpu_rate(self, ggml_type: str) -> float:
        """GPU throughput for a weight type (0 without a GPU)."""
        return _rate(self.gpu.flops, ggml_type) if self.gpu else 0.0


# Fallbacks when a profile lacks a type: types with the same kernel family and similar cost.
_FALLBACK = {
    "q4_k": ("q4_0", "q5_k", "q6_k"), "q5_k": ("q4_k", "q6_k"), "q6_k": ("q5_k", "q4_k", "q8_0"),
    "q4_0": ("q4_1", "q4_k", "q8_0"), "q4_1": ("q4_0", "q4_k"), "q5_0": ("q5_1", "q4_0", "q5_k"),
    "q5_1": ("q5_0", "q4_1"), "q8_0": ("q6_k", "q4_0"), "q2_k": ("q3_k", "q4_k"), "q3_k": ("q4_k", "q2_k"),
    "bf16": ("f16",), "f16": ("bf16", "f32"), "iq4_nl": ("q4_0",), "iq4_xs": ("q4_k",),
}  # fmt: skip


def _rate(rates: dict[str, float], t: str) -> float:
    if t in rates:
        return rates[t]
    for alt in _FALLBACK.get(t, ()):
        if alt in rates:
            return rates[alt]
    return rates["f32"]
