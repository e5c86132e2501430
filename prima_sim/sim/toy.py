"""Small inline devices and clusters for examples, tests and benchmarks of the simulator.

Bundled profiles (``datasets/devices``) describe real hardware with sources; these are deliberately simple
(round numbers, one throughput for every weight type) so a test can reason about the outcome: e.g. give a
device room for exactly 3.5 layers of weights and watch what prefetch does.
"""

from __future__ import annotations

from prima_sim.devices.cluster import Cluster, LinkSpec, Medium
from prima_sim.devices.ggml_types import TYPE_BY_NAME
from prima_sim.devices.profile import DeviceProfile, GpuProfile, Provenance
from prima_sim.units import GiB

_TYPES = tuple(TYPE_BY_NAME)


def toy_device(
    name: str,
    *,
    os: str = "linux",
    flops: float = 200e9,
    memory_bandwidth_bps: float = 20e9,
    ram_total_bytes: int = 16 * GiB,
    ram_available_bytes: int | None = None,
    disk_seq_read_bps: float = 2e9,
    disk_rand_read_bps: float | None = None,
    decode_overhead_s: float = 0.0005,
    swappable_bytes: int = 0,
    swap_bytes: int = 0,
    gpu: GpuProfile | None = None,
    unified_memory: bool = False,
) -> DeviceProfile:
    """A device with one CPU throughput for every weight type (everything else as given).

    ``ram_available_bytes`` defaults to 80% of the total; random reads default to a quarter of sequential.
    """
    rates = dict.fromkeys(_TYPES, flops)
    return DeviceProfile(
        name=name, os=os, cores=8, cpu_flops=rates, memory_bandwidth_bps=memory_bandwidth_bps,
        ram_total_bytes=ram_total_bytes,
        ram_available_bytes=int(ram_total_bytes * 0.8) if ram_available_bytes is None else ram_available_bytes,
        swap_total_bytes=swap_bytes, swap_available_bytes=swap_bytes, swappable_bytes=swappable_bytes,
        disk_seq_read_bps=disk_seq_read_bps,
        disk_rand_read_bps=disk_rand_read_bps if disk_rand_read_bps is not None else disk_seq_read_bps / 4,
        decode_overhead_s=decode_overhead_s, gpu=gpu, unified_memory=unified_memory,
        provenance=Provenance(kind="derived", notes="toy device for tests (prima_sim.sim.toy)"),
    )  # fmt: skip


def toy_gpu(kind: str = "cuda", *, flops: float = 5e12, vram_bytes: int = 8 * GiB, bandwidth_bps: float = 300e9,
            host_link_bps: float = 16e9) -> GpuProfile:  # fmt: skip
    """A GPU with one throughput for every weight type (Metal: working set = ``vram_bytes``, unified)."""
    metal = kind == "metal"
    return GpuProfile(
        kind=kind, flops=dict.fromkeys(_TYPES, flops), vram_total_bytes=vram_bytes, vram_free_bytes=vram_bytes,
        memory_bandwidth_bps=bandwidth_bps, working_set_limit_bytes=vram_bytes if metal else None,
        host_link_bps=0.0 if metal else host_link_bps,
    )  # fmt: skip


def toy_cluster(devices: list[DeviceProfile], *, name: str = "toy", bandwidth_bps: float = 50e6,
                latency_s: float = 0.005, medium_bps: float | None = None) -> Cluster:  # fmt: skip
    """Devices in ring order (the first is the head) on uniform links, optionally one shared medium."""
    media = (Medium(name="wifi", capacity_bps=medium_bps),) if medium_bps else ()
    link = LinkSpec(bandwidth_bps=bandwidth_bps, latency_s=latency_s, medium="wifi" if medium_bps else None)
    return Cluster(name=name, devices=tuple(devices), default_link=link, media=media)
