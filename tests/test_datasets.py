"""The bundled device and cluster datasets: they load, every figure has a source, and the paper's figures are exact.

The paper's figures are those of prima.cpp's testbeds (arXiv 2504.08791, Table 3 and the other testbeds of its
evaluation; README Table 1), as summarised in docs/datasets.md. Figures the paper does not give come from spec sheets
and published llama.cpp benchmarks; these tests only check that each has a source written next to it.
"""

from __future__ import annotations

import itertools
import math

import pytest

from prima_sim.devices.cluster import bundled_names, datasets_root, load_cluster, load_device
from prima_sim.units import GiB, parse_bandwidth, parse_seconds

DEVICES = bundled_names("devices")
CLUSTERS = bundled_names("clusters")

# Types every bundled profile gives a throughput for (the planner needs them for Q4_K_M/Q6_K/Q8_0 models,
# the f16 KV cache and f32 element-wise work).
CPU_TYPES = {"f32", "f16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k"}
GPU_TYPES = CPU_TYPES

# Every device states where these came from (keys of its [sources] table).
SOURCE_KEYS = {
    "device", "cores", "threads", "cpu_flops", "memory_bandwidth_bps", "ram_total_bytes", "ram_available_bytes",
    "disk_seq_read_bps", "disk_rand_read_bps", "kv_copy_s_per_layer", "decode_overhead_s",
}  # fmt: skip
GPU_SOURCE_KEYS = {
    "gpu.flops", "gpu.memory_bandwidth_bps", "gpu.vram_total_bytes", "gpu.vram_free_bytes", "gpu.host_link_bps",
    "gpu.kv_copy_s_per_layer",
}  # fmt: skip

WIFI_CLUSTERS = ["default", "paper-d1-d4", "paper-d1-d6", "paper-hetero2", "prefetch-4x8g"]
WIFI_BW = (parse_bandwidth("320 Mbps"), parse_bandwidth("610 Mbps"))
WIFI_LAT = (parse_seconds("3 ms"), parse_seconds("7 ms"))

# The paper's figures (GiB for memory, GB/s for disk), exactly. Disk: the figure the device pages with
# (sequential on Linux/Android, random on macOS). None = the paper gives no such figure. RAM available is
# prima.cpp's profiler output: on Linux (Termux included) it is 0.8 x MemAvailable, so a Linux device's
# profile records the paper's figure / 0.8 (LINUX_PROFILER_RAM); macOS and containers use other formulas
# that cannot be inverted, and keep the paper's figure (docs/datasets.md, "What RAM available means").
PAPER = {
    # home testbed, Table 3: (os, cores, RAM available GiB, disk GB/s, VRAM available GiB)
    "D1": ("macos", 8, 2.4, 0.72, None),
    "D2": ("linux", 8, 4.1, 2.98, 8),
    "D3": ("linux", 16, 9.7, 3.17, 11),
    "D4": ("android", 8, 1.9, 1.37, None),
    "D5": ("android", 8, 5.1, 2.00, None),
    "D6": ("macos", 4, 6.8, 0.39, None),
    # second heterogeneous testbed
    "hetero2-pc": (None, None, 5, None, 11),
    "hetero2-macmini": ("macos", None, 10, None, 10),
    "hetero2-laptop": (None, None, 23, None, 6),
    "hetero2-redmi": ("android", None, 7, None, None),
    **{f"container-4090-{i}": ("linux", 8, 4, 2.0, 5) for i in range(4)},
    **{f"prefetch-node-{i}": (None, 8, None, 2.0, None) for i in range(4)},
}
# RAM totals the paper gives (Halda-vs-heuristics study, containers, prefetch study), GiB.
PAPER_RAM_TOTAL = {
    "hetero2-pc": 16, "hetero2-macmini": 16, "hetero2-laptop": 32, "hetero2-redmi": 16,
    **{f"container-4090-{i}": 8 for i in range(4)},
    **{f"prefetch-node-{i}": 8 for i in range(4)},
}  # fmt: skip
LINUX_PROFILER_RAM = {"D2", "D3", "D4", "D5", "hetero2-pc", "hetero2-laptop", "hetero2-redmi"}
GPU_KIND = {"D1": "metal", "D2": "cuda", "D3": "cuda", "hetero2-pc": "cuda", "hetero2-macmini": "metal",
            "hetero2-laptop": "cuda", **{f"container-4090-{i}": "cuda" for i in range(4)}}  # fmt: skip


def test_the_expected_datasets_are_bundled() -> None:
    assert set(PAPER) <= set(DEVICES)
    assert {
        "default",
        "paper-d1-d4",
        "paper-d1-d6",
        "paper-hetero2",
        "paper-containers",
        "prefetch-4x8g",
    } <= set(CLUSTERS)


@pytest.mark.parametrize("name", DEVICES)
def test_device_loads_and_is_named_after_its_file(name: str) -> None:
    d = load_device(name)
    assert d.name == name
    assert d.provenance.kind == "spec"
    assert d.provenance.references and d.provenance.date


@pytest.mark.parametrize("name", DEVICES)
def test_every_figure_has_a_source(name: str) -> None:
    d = load_device(name)
    keys = SOURCE_KEYS | (GPU_SOURCE_KEYS if d.gpu else set())
    if d.is_metal:
        keys = keys | {"gpu.working_set_limit_bytes"}
    missing = sorted(k for k in keys if not d.sources.get(k, "").strip())
    assert not missing, f"{name}: no source for {missing}"
    unknown = sorted(k for k in d.sources if k.startswith("gpu.") and d.gpu is None)
    assert not unknown, f"{name}: GPU sources but no GPU: {unknown}"


@pytest.mark.parametrize("name", DEVICES)
def test_throughputs_cover_the_common_types_and_are_plausible(name: str) -> None:
    d = load_device(name)
    assert set(d.cpu_flops) >= CPU_TYPES
    assert all(1e10 <= v <= 1e13 for v in d.cpu_flops.values()), d.cpu_flops  # 10 GFLOPS .. 10 TFLOPS
    assert 5e9 <= d.memory_bandwidth_bps <= 2e11
    assert 1 <= d.n_threads <= d.cores
    if d.gpu:
        assert set(d.gpu.flops) >= GPU_TYPES
        assert min(d.gpu.flops.values()) > max(d.cpu_flops.values()), (
            "a GPU worth offloading to outruns its host CPU"
        )
        assert d.gpu.memory_bandwidth_bps >= d.memory_bandwidth_bps


@pytest.mark.parametrize("name", sorted(PAPER))
def test_memory_and_disk_figures_equal_the_papers(name: str) -> None:
    d = load_device(name)
    os_, cores, ram_avail, disk, vram = PAPER[name]
    if os_ is not None:
        assert d.os == os_
    if cores is not None:
        assert d.cores == cores
    if ram_avail is not None:
        factor = 1 / 0.8 if name in LINUX_PROFILER_RAM else 1.0
        assert d.ram_available_bytes == round(ram_avail * factor * GiB)
    if disk is not None:
        assert d.disk_read_bps == pytest.approx(disk * 1e9)
    if vram is not None:
        assert d.gpu is not None and d.gpu.vram_free_bytes == round(vram * GiB)
    if name in PAPER_RAM_TOTAL:
        assert d.ram_total_bytes == PAPER_RAM_TOTAL[name] * GiB
    assert (d.gpu.kind if d.gpu else None) == GPU_KIND.get(name)


@pytest.mark.parametrize("name", [n for n in DEVICES if load_device(n).is_metal])
def test_metal_working_set_is_apples_two_thirds_of_ram(name: str) -> None:
    d = load_device(name)
    assert d.unified_memory and d.os == "macos"
    assert d.gpu is not None and d.gpu.host_link_bps == 0
    # recommendedMaxWorkingSetSize: 2/3 of RAM up to 32 GB (3/4 above); ggml reports it as the device total
    assert d.gpu.working_set_limit_bytes == pytest.approx(d.ram_total_bytes * 2 / 3, rel=1e-6)
    assert d.gpu.vram_total_bytes == d.gpu.working_set_limit_bytes


def test_the_intel_mac_has_no_metal_offload() -> None:
    d6 = load_device("D6")
    assert d6.os == "macos" and not d6.unified_memory and d6.gpu is None


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_loads_with_every_device_bundled(name: str) -> None:
    c = load_cluster(name)
    assert c.name == name
    assert c.description
    for dev in c.devices:
        assert dev.name in DEVICES
        assert dev == load_device(dev.name)
    assert c.ring_order[0] == c.head_name


@pytest.mark.parametrize("name", WIFI_CLUSTERS)
def test_wifi_links_are_within_the_papers_range(name: str) -> None:
    c = load_cluster(name)
    assert c.medium("wifi") is not None
    assert (
        c.medium("wifi").capacity_bps >= WIFI_BW[1]
    )  # a lone transfer is not throttled below its pair's rate
    names = [d.name for d in c.devices]
    for a, b in itertools.combinations(names, 2):
        lk = c.link(a, b)
        assert lk.medium == "wifi"
        assert WIFI_BW[0] <= lk.bandwidth_bps <= WIFI_BW[1], (a, b, lk)
        assert WIFI_LAT[0] - 1e-12 <= lk.latency_s <= WIFI_LAT[1] + 1e-12, (a, b, lk)
        assert c.link(b, a) == lk
    assert WIFI_BW[0] <= c.default_link.bandwidth_bps <= WIFI_BW[1]
    assert WIFI_LAT[0] <= c.default_link.latency_s <= WIFI_LAT[1]


def test_home_clusters_span_the_papers_wifi_range() -> None:
    c = load_cluster("paper-d1-d6")
    pairs = [c.link(a, b) for a, b in itertools.combinations([d.name for d in c.devices], 2)]
    assert len(c.links) == len(pairs)  # every pair has its own figure
    assert math.isclose(min(p.bandwidth_bps for p in pairs), WIFI_BW[0])
    assert math.isclose(max(p.bandwidth_bps for p in pairs), WIFI_BW[1])
    assert math.isclose(min(p.latency_s for p in pairs), WIFI_LAT[0])
    assert math.isclose(max(p.latency_s for p in pairs), WIFI_LAT[1])


def test_paper_clusters_have_the_papers_devices_and_heads() -> None:
    assert load_cluster("paper-d1-d4").ring_order == ("D3", "D1", "D2", "D4")
    assert load_cluster("paper-d1-d6").ring_order == ("D3", "D1", "D2", "D4", "D5", "D6")
    assert load_cluster("paper-hetero2").head_name == "hetero2-pc"
    containers = load_cluster("paper-containers")
    assert [d.name for d in containers.devices] == [f"container-4090-{i}" for i in range(4)]
    assert (
        not containers.media and containers.default_link.bandwidth_bps > WIFI_BW[1]
    )  # Docker bridge, not Wi-Fi
    prefetch = load_cluster("prefetch-4x8g")
    assert len({d.model_dump_json(exclude={"name"}) for d in prefetch.devices}) == 1  # identical devices
    assert all(d.gpu is None and d.cores == 8 for d in prefetch.devices)


def test_default_cluster_is_the_papers_home_cluster() -> None:
    assert load_cluster("default").fingerprint() == load_cluster("paper-d1-d4").fingerprint()


def test_identical_testbed_nodes_differ_only_in_name() -> None:
    for prefix in ("container-4090-", "prefetch-node-"):
        files = sorted((datasets_root() / "devices").glob(f"{prefix}*.toml"))
        assert len(files) == 4
        bodies = {f.read_text(encoding="utf-8").replace(f.stem, "NAME").replace(f"Container {f.stem[-1]}", "Container N")
                  .replace(f"Node {f.stem[-1]}", "Node N") for f in files}  # fmt: skip
        assert len(bodies) == 1, prefix


def test_a_profile_field_added_later_leaves_old_plans_matching_their_cluster():
    """Plans record their cluster's fingerprint and are refused against a changed cluster. A device profile field
    added after plans were written (cpu_row_flops) must not change the fingerprint of a profile that lacks it, or
    every saved plan would be refused after an upgrade; a measured value does change it."""
    c = load_cluster("paper-d1-d4")
    assert c.fingerprint() == "7186f3b452951c82"  # as before cpu_row_flops existed (647e5fa)
    measured = c.model_copy(update={"devices": tuple(
        d.model_copy(update={"cpu_row_flops": {"q4_0": 1e11}}) if i == 0 else d for i, d in enumerate(c.devices)
    )})  # fmt: skip
    assert measured.fingerprint() != c.fingerprint()
