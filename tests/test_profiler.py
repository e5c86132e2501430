"""The device profiler: OS/cgroup rules on fake /proc and /sys trees, the disk test, the ggml measurements,
and quick end-to-end runs of ``profile_device`` and ``prima-sim profile``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from prima_sim.devices.profile import DeviceProfile
from prima_sim.devices.profiler import (
    DEFAULT_TYPES,
    ProfileOptions,
    ProfileRun,
    host_profile_name,
    layer_shape_for,
    profile_device,
    system,
    weight_types_for,
)
from prima_sim.devices.profiler import disk as diskmod
from prima_sim.errors import InputError
from prima_sim.schema import load_model

GiB = 1 << 30
MiB = 1 << 20
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
real = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python (the real extra) is not installed")


# --- fake /proc and /sys -----------------------------------------------------------------------------------
def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _meminfo(total: int, avail: int, swap_total: int = 0, swap_free: int = 0, extra: str = "") -> str:
    kb = 1024
    return (
        f"MemTotal: {total // kb} kB\nMemFree: {avail // kb} kB\nMemAvailable: {avail // kb} kB\n"
        f"SwapTotal: {swap_total // kb} kB\nSwapFree: {swap_free // kb} kB\n{extra}"
    )


def fake_v1(tmp: Path, *, limit: int | None, usage: int, active_file: int, inactive_file: int,
            memsw: int | None = None, memsw_usage: int = 0, parent_limit: int | None = None,
            quota: tuple[int, int] | None = None) -> Path:  # fmt: skip
    """A host with cgroup v1 controllers (and an empty v2 mount, as on the development machine)."""
    root = tmp / "root"
    _write(root, "proc/meminfo", _meminfo(24 * GiB, 20 * GiB, 4 * GiB, 3 * GiB))
    _write(root, "proc/self/cgroup", "4:memory:/box/inner\n1:cpu:/box\n0::/\n")
    _write(
        root,
        "proc/self/mountinfo",
        "31 27 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    )
    unl = str((1 << 63) - 4096)
    mem = "sys/fs/cgroup/memory"
    _write(root, f"{mem}/memory.limit_in_bytes", unl)
    _write(root, f"{mem}/box/memory.limit_in_bytes", str(parent_limit) if parent_limit else unl)
    _write(root, f"{mem}/box/memory.usage_in_bytes", str(usage))
    _write(
        root,
        f"{mem}/box/memory.stat",
        f"total_active_file {active_file}\ntotal_inactive_file {inactive_file}\n",
    )
    inner = f"{mem}/box/inner"
    _write(root, f"{inner}/memory.limit_in_bytes", str(limit) if limit else unl)
    _write(root, f"{inner}/memory.usage_in_bytes", str(usage))
    _write(
        root,
        f"{inner}/memory.stat",
        f"active_file 0\ninactive_file 0\ntotal_active_file {active_file}\ntotal_inactive_file {inactive_file}\n",
    )
    _write(root, f"{inner}/memory.memsw.limit_in_bytes", str(memsw) if memsw else unl)
    _write(root, f"{inner}/memory.memsw.usage_in_bytes", str(usage + memsw_usage))
    _write(root, "sys/fs/cgroup/cpu/box/cpu.cfs_quota_us", str(quota[0]) if quota else "-1")
    _write(root, "sys/fs/cgroup/cpu/box/cpu.cfs_period_us", str(quota[1]) if quota else "100000")
    return root


def fake_v2(tmp: Path, *, limit: str, usage: int, active_file: int, inactive_file: int, swap_max: str = "max",
            swap_current: int = 0, parent_limit: str = "max", cpu_max: str = "max 100000") -> Path:  # fmt: skip
    """A host with only the unified (v2) hierarchy."""
    root = tmp / "root"
    _write(root, "proc/meminfo", _meminfo(16 * GiB, 12 * GiB, 8 * GiB, 8 * GiB))
    _write(root, "proc/self/cgroup", "0::/user.slice/job\n")
    _write(
        root, "proc/self/mountinfo", "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    cg = "sys/fs/cgroup"
    _write(root, f"{cg}/cgroup.controllers", "cpu memory io\n")
    _write(root, f"{cg}/user.slice/memory.max", parent_limit)
    _write(root, f"{cg}/user.slice/memory.current", str(usage))
    _write(
        root, f"{cg}/user.slice/memory.stat", f"active_file {active_file}\ninactive_file {inactive_file}\n"
    )
    job = f"{cg}/user.slice/job"
    _write(root, f"{job}/cgroup.controllers", "cpu memory\n")
    _write(root, f"{job}/memory.max", limit)
    _write(root, f"{job}/memory.current", str(usage))
    _write(
        root,
        f"{job}/memory.stat",
        f"anon 123\nfile 999\nactive_file {active_file}\ninactive_file {inactive_file}\n",
    )
    _write(root, f"{job}/memory.swap.max", swap_max)
    _write(root, f"{job}/memory.swap.current", str(swap_current))
    _write(root, f"{job}/cpu.max", cpu_max)
    return root


# --- memory rule -------------------------------------------------------------------------------------------
def test_v1_limit_caps_total_and_available(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=2 * GiB, usage=1500 * MiB, active_file=300 * MiB, inactive_file=200 * MiB)
    m = system.read_memory(root, os_family="linux")
    assert m.total_bytes == 2 * GiB
    # available = limit - (usage - reclaimable page cache) = 2048 - (1500 - 500) MiB
    assert m.available_bytes == 2 * GiB - (1500 - 500) * MiB
    assert m.host_total_bytes == 24 * GiB and m.host_available_bytes == 20 * GiB
    assert "v1" in m.cgroup and m.cgroup.endswith("box/inner")


def test_v1_parent_limit_counts(tmp_path: Path) -> None:
    root = fake_v1(
        tmp_path, limit=None, usage=100 * MiB, active_file=0, inactive_file=0, parent_limit=1 * GiB
    )
    m = system.read_memory(root, os_family="linux")
    assert m.total_bytes == 1 * GiB
    assert m.available_bytes == 1 * GiB - 100 * MiB


def test_v1_unlimited_leaves_the_host_figures(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=None, usage=5 * GiB, active_file=0, inactive_file=0)
    m = system.read_memory(root, os_family="linux")
    assert (m.total_bytes, m.available_bytes) == (24 * GiB, 20 * GiB)
    assert (m.swap_total_bytes, m.swap_available_bytes) == (4 * GiB, 3 * GiB)
    assert m.cgroup == ""


def test_available_never_exceeds_the_host(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=23 * GiB, usage=1 * GiB, active_file=0, inactive_file=0)
    m = system.read_memory(root, os_family="linux")
    assert m.total_bytes == 23 * GiB
    assert m.available_bytes == 20 * GiB  # MemAvailable is tighter than the cgroup's 22 GiB headroom


def test_v1_memsw_limits_swap(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=2 * GiB, usage=1 * GiB, active_file=0, inactive_file=0,
                   memsw=3 * GiB, memsw_usage=256 * MiB)  # fmt: skip
    m = system.read_memory(root, os_family="linux")
    assert m.swap_total_bytes == 1 * GiB
    assert m.swap_available_bytes == 1 * GiB - 256 * MiB


def test_v2_limit_swap_and_reclaimable_cache(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, limit=str(4 * GiB), usage=3 * GiB, active_file=1 * GiB, inactive_file=512 * MiB,
                   swap_max=str(1 * GiB), swap_current=256 * MiB)  # fmt: skip
    m = system.read_memory(root, os_family="linux")
    assert m.total_bytes == 4 * GiB
    assert m.available_bytes == 4 * GiB - (3 * GiB - 1536 * MiB)
    assert m.swap_total_bytes == 1 * GiB
    assert m.swap_available_bytes == 768 * MiB
    assert m.cgroup.startswith("v2")


def test_v2_max_means_no_limit_but_a_parent_may_have_one(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, limit="max", usage=1 * GiB, active_file=0, inactive_file=0)
    m = system.read_memory(root, os_family="linux")
    assert (m.total_bytes, m.available_bytes) == (16 * GiB, 12 * GiB)
    assert (m.swap_total_bytes, m.swap_available_bytes) == (8 * GiB, 8 * GiB)
    root2 = fake_v2(
        tmp_path / "b", limit="max", usage=1 * GiB, active_file=0, inactive_file=0, parent_limit=str(3 * GiB)
    )
    m2 = system.read_memory(root2, os_family="linux")
    assert (m2.total_bytes, m2.available_bytes) == (3 * GiB, 2 * GiB)


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write(root, "proc/meminfo", _meminfo(8 * GiB, 6 * GiB))
    m = system.read_memory(root, os_family="linux")
    assert (m.total_bytes, m.available_bytes, m.swap_total_bytes) == (8 * GiB, 6 * GiB, 0)
    assert system.find_cgroup("memory", root) is None


def test_android_swappable_is_anon_minus_mlocked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    extra = "Active(anon): 1048576 kB\nInactive(anon): 524288 kB\nMlocked: 1024 kB\n"
    _write(root, "proc/meminfo", _meminfo(8 * GiB, 3 * GiB, 2 * GiB, 2 * GiB, extra))
    (root / "data/data/com.termux/files/usr/bin").mkdir(parents=True)
    assert system.detect_os(root, "linux") == "android"
    m = system.read_memory(root)
    assert m.swappable_bytes == 1536 * MiB - 1 * MiB
    assert system.read_memory(root, os_family="linux").swappable_bytes == 0


@pytest.mark.parametrize(
    ("platform_name", "marker", "expected"),
    [("linux", None, "linux"), ("linux", "system/build.prop", "android"), ("darwin", None, "macos"),
     ("win32", None, "windows"), ("darwin", "system/build.prop", "macos")],
)  # fmt: skip
def test_detect_os(tmp_path: Path, platform_name: str, marker: str | None, expected: str) -> None:
    if marker:
        _write(tmp_path, marker, "ro.product.model=x\n")
    assert system.detect_os(tmp_path, platform_name) == expected


# --- cores -------------------------------------------------------------------------------------------------
def test_v1_cpu_quota_rounds_down(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=None, usage=0, active_file=0, inactive_file=0, quota=(150000, 100000))
    c = system.read_cores(root, affinity=8)
    assert c.quota == pytest.approx(1.5)
    assert c.cores == 1 and c.affinity == 8


def test_v2_cpu_max_and_affinity(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, limit="max", usage=0, active_file=0, inactive_file=0, cpu_max="300000 100000")
    assert system.read_cores(root, affinity=8).cores == 3
    assert system.read_cores(root, affinity=2).cores == 2  # the affinity mask is tighter


def test_tiny_quota_still_gives_one_core(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, limit="max", usage=0, active_file=0, inactive_file=0, cpu_max="20000 100000")
    assert system.read_cores(root, affinity=4).cores == 1


def test_no_quota(tmp_path: Path) -> None:
    root = fake_v1(tmp_path, limit=None, usage=0, active_file=0, inactive_file=0)
    c = system.read_cores(root, affinity=6)
    assert c.quota is None and c.cores == 6


def test_this_host_reads_sensibly() -> None:
    c = system.read_cores()
    assert 1 <= c.cores <= (os.cpu_count() or 1)
    m = system.read_memory()
    assert 0 < m.available_bytes <= m.total_bytes
    assert 0 <= m.swap_available_bytes <= m.swap_total_bytes


def test_last_level_cache(tmp_path: Path) -> None:
    base = "sys/devices/system/cpu/cpu0/cache"
    for i, (typ, size) in enumerate(
        [("Data", "32K"), ("Instruction", "64K"), ("Unified", "1024K"), ("Unified", "32768K")]
    ):
        _write(tmp_path, f"{base}/index{i}/type", typ + "\n")
        _write(tmp_path, f"{base}/index{i}/size", size + "\n")
    assert system.last_level_cache_bytes(tmp_path) == 32 * MiB
    assert system.last_level_cache_bytes(tmp_path / "nowhere", default=7) == 7


def test_load_monitor_reports_non_negative_cpus() -> None:
    mon = system.CpuLoadMonitor().start()
    sum(i * i for i in range(200_000))
    out = mon.stop()
    if Path("/proc/stat").exists():
        assert out is not None
        others, stolen = out
        assert others >= 0 and stolen >= 0
    assert system.CpuLoadMonitor("/nonexistent").start().stop() is None


# --- disk --------------------------------------------------------------------------------------------------
def test_disk_measures_and_cleans_up(tmp_path: Path) -> None:
    r = diskmod.measure_disk(tmp_path, 32 * MiB, seconds=0.15, threads=2)
    assert r.seq_bps > 0 and r.rand_bps > 0
    assert r.seq_bytes >= r.seq_block and r.rand_bytes >= r.rand_block
    assert r.rand_block == diskmod.PAGE and r.seq_block % diskmod.PAGE == 0
    assert r.file_bytes >= 8 * MiB
    assert not list(tmp_path.glob(".prima-sim-disk-*"))  # the test file is gone
    assert "page cache" in r.method
    assert str(tmp_path) in r.describe_seq()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="the fallback is what this platform uses anyway")
def test_disk_falls_back_to_fadvise_without_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT")  # as on a file system that refuses it
    r = diskmod.measure_disk(tmp_path, 16 * MiB, seconds=0.1, threads=1)
    assert not r.direct and "posix_fadvise(DONTNEED)" in r.method
    assert any("buffered I/O" in n for n in r.notes)
    assert r.seq_bps > 0 and r.rand_bps > 0
    assert not list(tmp_path.glob(".prima-sim-disk-*"))


def test_disk_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a directory"):
        diskmod.measure_disk(tmp_path / "nope", 16 * MiB, 0.1)


def test_disk_rejects_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits (CI runs as root): a read-only mount stops it
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
        ).returncode:
            pytest.skip("root without permission to mount a read-only tmpfs")
    else:
        ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            diskmod.measure_disk(ro, 16 * MiB, 0.1)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


def test_readahead_from_a_fake_sysfs(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    maj, mnr = os.major(st.st_dev), os.minor(st.st_dev)
    sysroot = tmp_path / "sys"
    dev = sysroot / "devices/virtual/block/vdz"
    (dev / "vdz1").mkdir(parents=True)
    (dev / "vdz1/partition").write_text("1\n")
    (dev / "queue").mkdir()
    (dev / "queue/read_ahead_kb").write_text("4096\n")
    (sysroot / "dev/block").mkdir(parents=True)
    (sysroot / "dev/block" / f"{maj}:{mnr}").symlink_to(dev / "vdz1")
    assert diskmod.readahead_bytes(tmp_path, sysroot) == (4096 * 1024, "vdz")
    assert diskmod.readahead_bytes(tmp_path, tmp_path / "empty") == (diskmod.DEFAULT_READAHEAD, "")


def test_mount_of_finds_the_longest_prefix(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "proc/self/mountinfo",
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw\n",
    )
    assert diskmod.mount_of("/dev/shm/x", tmp_path)[:2] == ("/dev/shm", "tmpfs")
    assert diskmod.mount_of("/work", tmp_path)[:2] == ("/", "ext4")


# --- options -----------------------------------------------------------------------------------------------
def test_weight_types(smollm2: Path) -> None:
    from prima_sim.devices.model import model_profile_from_gguf

    assert weight_types_for(ProfileOptions()) == DEFAULT_TYPES
    assert weight_types_for(ProfileOptions(types=("Q4_K", "q6_k"))) == ("f32", "q4_k", "q6_k")
    with pytest.raises(InputError, match="unknown ggml type"):
        weight_types_for(ProfileOptions(types=("q9_z",)))
    m = model_profile_from_gguf(smollm2)
    types = weight_types_for(ProfileOptions(model=m))
    assert types[0] == "f32" and set(types) == {"f32", "f16", "q4_1", "q8_0"}
    layer, label = layer_shape_for(m)
    # SmolLM2's layer: q/k/v/o and the three FFN matrices, Q4_1 (n_embd 576, n_ff 1536, 3 KV heads of 64)
    assert sorted(layer) == sorted([("q4_1", 576, 576), ("q4_1", 576, 192), ("q4_1", 576, 192), ("q4_1", 576, 576),
                                    ("q4_1", 576, 1536), ("q4_1", 576, 1536), ("q4_1", 1536, 576)])  # fmt: skip
    assert "SmolLM2" in label
    from prima_sim.devices.profiler.compute import LLAMA3_8B_Q4_0_LAYER

    assert layer_shape_for(None)[0] == LLAMA3_8B_Q4_0_LAYER


def test_host_profile_name() -> None:
    assert host_profile_name("my host.local") == "my-host.local"
    assert host_profile_name("__") == "host"
    assert DeviceProfile.model_fields["name"]  # the name pattern is enforced by the model


# --- measurements through ggml -----------------------------------------------------------------------------
@real
def test_compute_measurements_are_positive_and_consistent() -> None:
    from prima_sim import ggml
    from prima_sim.devices.profiler import compute

    lib = ggml.load()
    with ggml.Backend(lib, lib.cpu_device(), 2) as cpu:
        mm = compute.matmul_flops(lib, cpu, "q4_k", k=1024, n=512, b=32, budget_s=0.05)
        assert mm.flops == pytest.approx(2 * 1024 * 512 * 32 / mm.timing.median_s)
        assert mm.timing.runs >= 7 and mm.timing.min_s <= mm.timing.median_s <= mm.timing.max_s
        layer = (("q4_0", 1024, 1024), ("q6_k", 1024, 256), ("q8_0", 512, 1024))
        per_layer = sum(lib.row_size(t, k) * n for t, k, n in layer)
        mv = compute.matvec_bandwidth(lib, cpu, layer, target_bytes=16 * MiB, budget_s=0.05)
        assert mv.layers == -(-16 * MiB // per_layer)  # repeated until the target is reached
        assert mv.weight_bytes == mv.layers * per_layer >= 16 * MiB
        assert mv.bytes_by_type["q6_k"] == mv.layers * lib.row_size("q6_k", 1024) * 256
        assert mv.bandwidth_bps == pytest.approx(mv.weight_bytes / mv.timing.median_s)
        assert "q8_0 [512x1024]" in mv.describe()
        big = compute.matvec_bandwidth(lib, cpu, (("q4_0", 4096, 8192),), target_bytes=4 * MiB, budget_s=0.02)
        # 8192 rows of 2304 B = 18 MiB > 4 MiB: rows cut to a multiple of 64 under 4 MiB, the row length kept
        assert big.layer == (("q4_0", 4096, 1792),) and big.layers == 2
        assert big.weight_bytes == 2 * 1792 * lib.row_size("q4_0", 4096)
        bf = compute.batch_flops(lib, cpu, layer, 8, target_bytes=4 * MiB, budget_s=0.05)
        flop = 2 * bf.layers * 8 * sum(k * n for _, k, n in layer)
        assert bf.flops == pytest.approx(flop / bf.timing.median_s) and bf.timing.runs >= 3
        assert "[K x 8]" in bf.describe()
        with pytest.raises(ggml.GgmlError, match="at least 2 tokens"):
            compute.batch_flops(lib, cpu, layer, 1)
        rf = compute.row_flops(lib, cpu, (("q4_0", 1024, 1024),), target_bytes=4 * MiB, budget_s=0.1)
        flop = 2 * rf.layers * 7 * 1024 * 1024  # 7 further rows: 1 -> 8
        assert rf.flops == pytest.approx(flop / (rf.timings[1].median_s - rf.timings[0].median_s))
        assert rf.rows == (1, 8) and "by 8 rows" in rf.describe()
        with pytest.raises(ggml.GgmlError, match="rows"):
            compute.row_flops(lib, cpu, (("q4_0", 1024, 1024),), rows=(4, 4))
        kv = compute.kv_copy_time(lib, cpu, 512, 512, layers=(4, 20), budget_s=0.05)
        assert 0 < kv.seconds < 0.01
    npb = compute.numpy_read_bandwidth(16 * MiB, threads=2, budget_s=0.05)
    assert npb.bandwidth_bps > 1e8 and npb.threads == 2


def test_row_matrices_by_type(smollm2: Path) -> None:
    from prima_sim.devices.model import model_profile_from_gguf
    from prima_sim.devices.profiler import row_matrices

    groups = row_matrices(model_profile_from_gguf(smollm2), ("f32", "q4_1", "q8_0"))
    assert set(groups) == {"q4_1", "q8_0"}  # f32 norms are not matrices of a row's arithmetic
    assert ("q4_1", 576, 1536) in groups["q4_1"] and len(groups["q4_1"]) == 7
    assert groups["q8_0"] == (("q8_0", 576, 49152),)  # the tied output head
    assert row_matrices(None, ("f32", "f16", "q4_k")) == {"q4_k": (("q4_k", 2048, 2048),)}


def test_profiles_without_row_rates_fall_back_to_cpu_flops() -> None:
    from prima_sim.devices.profile import DeviceProfile

    base = {"name": "a", "os": "linux", "cores": 2, "cpu_flops": {"f32": 1e11, "q4_0": 5e10},
            "memory_bandwidth_bps": 1e10, "ram_total_bytes": 1 << 30, "ram_available_bytes": 1 << 29,
            "disk_seq_read_bps": 1e9, "disk_rand_read_bps": 1e8}  # fmt: skip
    old = DeviceProfile.model_validate(base)  # written before the field
    assert old.cpu_row_flops == {} and old.row_rate("q4_0") == 5e10 and old.row_rate("q4_k") == 5e10
    new = DeviceProfile.model_validate(base | {"cpu_row_flops": {"Q4_0": "30 GFLOPS"}})
    assert new.row_rate("q4_0") == 3e10 and new.row_rate("f32") == 1e11
    with pytest.raises(ValueError, match="unknown ggml type"):
        DeviceProfile.model_validate(base | {"cpu_row_flops": {"q9_9": 1e9}})


def test_time_runs_counts_warmups_apart() -> None:
    from prima_sim.devices.profiler.compute import time_runs

    calls = []
    t = time_runs(lambda: calls.append(1), warmup=3, min_runs=4, max_runs=4, budget_s=10)
    assert len(calls) == 7 and t.runs == 4


@real
def test_decode_probe_runs_llama_cpp(tmp_path: Path) -> None:
    from prima_sim.devices.model import model_profile_from_gguf
    from prima_sim.exec.decode_probe import measure_decode_overhead, write_tiny_model

    m = model_profile_from_gguf(write_tiny_model(tmp_path / "tiny.gguf"))
    assert (m.arch.arch, m.arch.n_layer, m.arch.n_embd, m.arch.n_vocab) == ("llama", 1, 64, 1)
    s, note = measure_decode_overhead(1, runs=5, warmup=2)
    assert 0 < s < 1.0
    assert "median" in note and "use_extra_bufts=False" in note


# --- end to end --------------------------------------------------------------------------------------------
@real
def test_profile_device_quick_with_a_model(tmp_path: Path, smollm2: Path) -> None:
    from prima_sim.devices.model import model_profile_from_gguf

    model = model_profile_from_gguf(smollm2)
    calls: list[int] = []

    def probe(n_threads: int) -> tuple[float, str]:
        calls.append(n_threads)
        return 4e-5, "fake probe"

    run = profile_device(
        ProfileOptions(
            name="box1",
            threads=1,
            model=model,
            quick=True,
            disk_dir=tmp_path,
            disk_file_bytes=32 * MiB,
            disk_seconds=0.15,
            decode_probe=probe,
            progress=False,
        )
    )
    p = run.profile
    assert calls == [1]
    assert p.name == "box1" and p.threads == 1 and p.n_threads == 1
    assert set(p.cpu_flops) == {"f32", "f16", "q4_1", "q8_0"}
    assert all(v > 1e8 for v in p.cpu_flops.values())  # any CPU of this decade does 0.1 GFLOPS
    assert p.memory_bandwidth_bps > 1e8
    assert "layer 0 of SmolLM2" in run.bandwidth_layer
    assert "q4_1 [576x1536]" in p.sources["memory_bandwidth_bps"]
    assert p.decode_overhead_s == 4e-5
    assert set(p.cpu_batch_efficiency) == {16}  # --quick: the short prompt's micro-batch only
    assert 0.05 < p.cpu_batch_efficiency[16] < 5  # the layer's products at 16 tokens vs the 128-column matmul
    assert "16 tokens" in p.sources["cpu_batch_efficiency"]
    # a further row of a small batch: the layer's q4_1 matrices, and the tied output head's q8_0 embedding table
    assert set(p.cpu_row_flops) <= {"q4_1", "q8_0"} and all(v > 1e8 for v in p.cpu_row_flops.values())
    assert "[576x49152]" in p.sources["cpu_row_flops"]
    assert p.kv_copy_s_per_layer > 0
    assert "192+192" in p.sources["kv_copy_s_per_layer"]  # SmolLM2: 3 KV heads x 64
    assert p.disk_seq_read_bps > 0 and p.disk_rand_read_bps > 0
    assert p.provenance.kind == "measured" and p.provenance.tool.endswith("profile")
    for key in (
        "cores",
        "ram_available_bytes",
        "memory_bandwidth_numpy",
        "disk_seq_read_bps",
        "gpu",
        "cpu_flops.q4_1",
    ):
        assert key in p.sources
    assert set(run.step_s) >= {"system", "flops q4_1", "bandwidth (decode matvecs)", "disk: random reads"}
    out = tmp_path / "p.json"
    from prima_sim.schema import dump_model

    dump_model(p, out)
    assert load_model(DeviceProfile, out) == p


@real
def test_cli_profile_writes_a_loadable_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prima_sim.cli.main import main

    out = tmp_path / "me.toml"
    rc = main(["profile", "--quick", "--name", "me", "--types", "q8_0", "--out", str(out), "--disk-dir", str(tmp_path),
               "--disk-file-size", "32MiB", "--no-progress"])  # fmt: skip
    assert rc == 0
    cap = capsys.readouterr()
    assert "device profile me" in cap.out and f"wrote {out}" in cap.out
    assert "profiled in" in cap.err
    p = load_model(DeviceProfile, out)
    assert set(p.cpu_flops) == {"f32", "q8_0"}
    assert p.decode_overhead_s > 0  # the real llama.cpp probe ran
    assert "llama_decode" in p.sources["decode_overhead_s"]


@real
def test_cli_profile_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prima_sim.cli.main import main

    rc = main(["profile", "--quick", "--json", "--no-write", "--types", "f32", "--disk-dir", str(tmp_path),
               "--disk-file-size", "16MiB", "--no-progress"])  # fmt: skip
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert DeviceProfile.model_validate(data).cpu_flops.keys() == {"f32"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--types", "q9_z"], "unknown ggml type"),
        (["--disk-file-size", "12 parsecs"], "--disk-file-size"),
        (["--disk-file-size", "1MiB"], "at least 8 MiB"),
        (["--threads", "0"], "--threads"),
        (["--name", "bad name!"], "--name"),
        (["--disk-dir", "/nonexistent/dir"], "not a directory"),
        (["--model", "/nonexistent/model.gguf"], "not found"),
    ],
)
def test_cli_profile_bad_arguments_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from prima_sim.cli.main import main

    rc = main(["profile", "--quick", "--no-write", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and err.startswith("prima-sim profile: error:")


@real
def test_a_type_ggml_cannot_run_is_recorded_not_fatal(tmp_path: Path) -> None:
    run = profile_device(
        ProfileOptions(
            types=("q4_0", "i32"), quick=True, disk_dir=tmp_path, disk_file_bytes=16 * MiB, disk_seconds=0.1,
            progress=False,
        )
    )  # fmt: skip
    p = run.profile
    assert set(p.cpu_flops) == {"f32", "q4_0"}
    assert p.sources["cpu_flops.i32"].startswith("not measured")
    assert p.decode_overhead_s == 0 and "not measured" in p.sources["decode_overhead_s"]


def _fake_runs(monkeypatch: pytest.MonkeyPatch, background: list[float]) -> list[int]:
    """``profile_device`` returning a bundled profile with the given background loads, one per call."""
    import prima_sim.cli.profile as cli_profile
    import prima_sim.devices.profiler as profiler_mod

    prof = load_model(DeviceProfile, Path(__file__).resolve().parents[1] / "datasets" / "devices" / "D1.toml")
    calls: list[int] = []

    def fake(opt: ProfileOptions | None = None) -> ProfileRun:
        calls.append(1)
        bg = background[min(len(calls), len(background)) - 1]
        return ProfileRun(profile=prof.model_copy(update={"name": f"run{len(calls)}"}), elapsed_s=0.1,
                          background_cpus=bg)  # fmt: skip

    monkeypatch.setattr(profiler_mod, "profile_device", fake)
    monkeypatch.setattr(cli_profile, "BUSY_RETRY_WAIT_S", 0.0)
    return calls


def test_cli_profile_measures_a_busy_host_again_and_keeps_the_quietest_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prima_sim.cli.main import main

    calls = _fake_runs(monkeypatch, [1.5, 0.9, 1.2])
    out = tmp_path / "p.toml"
    assert main(["profile", "--out", str(out), "--no-progress", "--types", "f32"]) == 0
    err = capsys.readouterr().err
    assert len(calls) == 3 and err.count("measuring again") == 2
    assert load_model(DeviceProfile, out).name == "run2"  # the quietest of the three
    assert "warning: other processes kept 0.90 CPUs busy" in err


def test_cli_profile_stops_retrying_once_the_host_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prima_sim.cli.main import main

    calls = _fake_runs(monkeypatch, [1.5, 0.05, 1.0])
    out = tmp_path / "p.toml"
    assert main(["profile", "--out", str(out), "--no-progress", "--types", "f32"]) == 0
    err = capsys.readouterr().err
    assert len(calls) == 2 and load_model(DeviceProfile, out).name == "run2" and "warning" not in err


def test_cli_profile_refuses_a_host_busy_throughout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prima_sim.cli.main import main

    calls = _fake_runs(monkeypatch, [1.5])
    out = tmp_path / "p.toml"
    out.write_text("kept")
    rc = main(
        [
            "profile",
            "--out",
            str(out),
            "--no-progress",
            "--types",
            "f32",
            "--refuse-busy",
            "--busy-retries",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and len(calls) == 2
    assert out.read_text() == "kept"  # nothing already written is lost
    assert (
        err.count("\n") == 2 and "nothing written" in err.splitlines()[-1]
    )  # the retry notice, then one error
