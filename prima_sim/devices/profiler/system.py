"""What the operating system says about this host: OS family, usable cores, RAM, swap, cgroup limits.

Every reader takes a ``root`` (``"/"`` on a real host) so that tests can point it at a fake ``/proc`` and
``/sys`` tree. Nothing here needs ggml.

Memory rule (Linux and Android):

* host: ``total`` = MemTotal, ``available`` = MemAvailable (``/proc/meminfo``); swap = SwapTotal / SwapFree.
* memory cgroup: the process's cgroup is found from ``/proc/self/cgroup`` and the cgroup mounts in
  ``/proc/self/mountinfo`` (v1: the hierarchy with the ``memory`` controller; v2: the unified hierarchy when it
  has the memory controller). Every level from that cgroup up to the root of its mount that has a limit
  counts (limits are hierarchical). At each limited level ``headroom = limit - (usage - reclaimable)``, where
  ``usage`` is ``memory.usage_in_bytes`` (v1) / ``memory.current`` (v2) and ``reclaimable`` is the file-backed
  page cache on the LRU lists (``active_file + inactive_file``; v1 reads the hierarchical ``total_`` figures
  of ``memory.stat``), which the kernel drops before it would kill anything.
  ``total = min(MemTotal, limits)``, ``available = min(MemAvailable, headrooms)``.
* swap in a cgroup: v2 ``memory.swap.max`` (minus ``memory.swap.current``); v1 ``memory.memsw.limit_in_bytes -
  memory.limit_in_bytes`` (minus ``memsw.usage - usage``). Each caps the host's figures.
* ``swappable_bytes``: Android (as prima.cpp on Termux): anonymous pages ``Active(anon) + Inactive(anon)``
  minus ``Mlocked``, the memory of other apps the OS would push to swap/zram first; macOS: anonymous
  (internal) pages from ``vm_stat``; elsewhere 0.

Cores: the CPUs this process may run on (``sched_getaffinity``), capped by a CPU cgroup quota
(v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, v2 ``cpu.max``) rounded down, at least 1.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as 2^63 - page size


# --- OS ---------------------------------------------------------------------------------------------------
def detect_os(root: str | Path = "/", platform_name: str | None = None) -> str:
    """The OS family: ``android`` (Termux or an Android system image), ``macos``, ``windows`` or ``linux``."""
    plat = platform_name or sys.platform
    if plat == "darwin":
        return "macos"
    if plat.startswith(("win", "cygwin", "msys")):
        return "windows"
    r = Path(root)
    if plat.startswith("linux") and (
        (r / "data/data/com.termux/files/usr/bin").is_dir() or (r / "system/build.prop").exists()
    ):
        return "android"
    return "linux"


def cpu_model(root: str | Path = "/") -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in (Path(root) / "proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and val.strip():
                return val.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(root: str | Path = "/", default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (the last level) from sysfs; ``default`` when unknown."""
    best = 0
    for d in sorted((Path(root) / "sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            best = max(best, _parse_cache_size((d / "size").read_text()))
        except (OSError, ValueError):
            continue
    return best or default


def _parse_cache_size(text: str) -> int:
    m = re.match(r"^\s*(\d+)\s*([KMG]?)", text)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]


# --- cgroups -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CgroupDir:
    """The directory of this process's cgroup in one hierarchy, and that hierarchy's mount point."""

    version: int  # 1 or 2
    path: Path  # directory of the process's cgroup
    mount: Path  # mount point of the hierarchy (the walk upwards stops there)

    def levels(self) -> list[Path]:
        """The cgroup's directory and its ancestors up to the mount point, innermost first."""
        out = [self.path]
        p = self.path
        while p != self.mount and self.mount in p.parents:
            p = p.parent
            out.append(p)
        return out


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def find_cgroup(controller: str, root: str | Path = "/") -> CgroupDir | None:
    """This process's cgroup directory for ``controller`` ("memory", "cpu"): the v1 hierarchy that carries
    the controller, else the v2 hierarchy when it enables the controller; None outside any."""
    r = Path(root)
    try:
        membership = (r / "proc/self/cgroup").read_text().splitlines()
        mounts = (r / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in membership:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "" and parts[0] == "0":
            v2_path = path
        elif controller in ctrls.split(","):
            v1_path = path
    v1_mount = v2_mount = None
    for line in mounts:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        rf = right.split()
        if len(f) < 5 or len(rf) < 3:
            continue
        mount_root, mount_point = _unescape_mount(f[3]), _unescape_mount(f[4])
        fstype, super_opts = rf[0], rf[2].split(",")
        if fstype == "cgroup" and controller in super_opts and v1_mount is None:
            v1_mount = (mount_root, mount_point)
        elif fstype == "cgroup2" and v2_mount is None:
            v2_mount = (mount_root, mount_point)

    def resolve(version: int, cg_path: str, mnt: tuple[str, str]) -> CgroupDir:
        mount_root, mount_point = mnt
        base = r / mount_point.lstrip("/")
        rel = os.path.relpath(cg_path, mount_root) if cg_path.startswith(mount_root) else "."
        d = base if rel in (".", "") or rel.startswith("..") else base / rel
        if not d.is_dir():
            d = base
        return CgroupDir(version, d, base)

    if v1_path is not None and v1_mount is not None:
        return resolve(1, v1_path, v1_mount)
    if v2_path is not None and v2_mount is not None:
        cg = resolve(2, v2_path, v2_mount)
        # the controller is usable in v2 only if enabled (its interface files exist in the cgroup)
        probe = {"memory": "memory.max", "cpu": "cpu.max"}.get(controller, f"{controller}.max")
        if any((lvl / probe).exists() for lvl in cg.levels()):
            return cg
        try:  # a leaf cgroup: the parent lists the controller in cgroup.subtree_control
            if controller in (cg.path / "cgroup.controllers").read_text().split():
                return cg
        except OSError:
            pass
    return None


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text in ("max", ""):
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return None if v >= _UNLIMITED else v


def _read_stat(p: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in p.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


# --- memory ------------------------------------------------------------------------------------------------
def read_meminfo(root: str | Path = "/") -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    out: dict[str, int] = {}
    for line in (Path(root) / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


@dataclass
class MemoryInfo:
    """RAM and swap as the profile records them, with how they were obtained."""

    total_bytes: int
    available_bytes: int
    swap_total_bytes: int
    swap_available_bytes: int
    swappable_bytes: int
    host_total_bytes: int
    host_available_bytes: int
    cgroup: str = ""  # "" when no limit applies, else e.g. "v1 /sys/fs/cgroup/memory/x: limit 2.00 GiB"
    notes: list[str] = field(default_factory=list)


def cgroup_memory_limits(cg: CgroupDir) -> tuple[int | None, int | None, int | None, int | None, list[str]]:
    """(limit, headroom, swap limit, swap headroom, notes) of a memory cgroup and its ancestors; None = unlimited."""
    limit = headroom = swap_limit = swap_headroom = None
    notes: list[str] = []

    def tighter(cur: int | None, new: int | None) -> int | None:
        return new if cur is None or (new is not None and new < cur) else cur

    for lvl in cg.levels():
        stat = _read_stat(lvl / "memory.stat")
        if cg.version == 1:
            lim = _read_int(lvl / "memory.limit_in_bytes")
            usage = _read_int(lvl / "memory.usage_in_bytes")
            file_cache = stat.get("total_active_file", stat.get("active_file", 0)) + stat.get(
                "total_inactive_file", stat.get("inactive_file", 0)
            )
            memsw = _read_int(lvl / "memory.memsw.limit_in_bytes")
            memsw_usage = _read_int(lvl / "memory.memsw.usage_in_bytes")
            sw_lim = memsw - lim if memsw is not None and lim is not None else None
            if memsw is not None and lim is None:
                sw_lim = memsw  # memory unlimited, memory+swap limited: swap can be at most that
            sw_used = max(0, (memsw_usage or 0) - (usage or 0))
        else:
            lim = _read_int(lvl / "memory.max")
            usage = _read_int(lvl / "memory.current")
            file_cache = stat.get("active_file", 0) + stat.get("inactive_file", 0)
            sw_lim = _read_int(lvl / "memory.swap.max") if (lvl / "memory.swap.max").exists() else None
            sw_used = _read_int(lvl / "memory.swap.current") or 0
        if lim is not None:
            room = max(0, lim - max(0, (usage or 0) - file_cache))
            limit, headroom = tighter(limit, lim), tighter(headroom, room)
            notes.append(
                f"cgroup v{cg.version} {lvl}: limit {lim} B, usage {usage or 0} B, reclaimable page cache {file_cache} B"
            )
        if sw_lim is not None:
            swap_limit = tighter(swap_limit, max(0, sw_lim))
            swap_headroom = tighter(swap_headroom, max(0, sw_lim - sw_used))
    return limit, headroom, swap_limit, swap_headroom, notes


def _android_swappable(mi: dict[str, int]) -> int:
    anon = mi.get("Active(anon)", 0) + mi.get("Inactive(anon)", 0)
    return max(0, anon - mi.get("Mlocked", 0))


def _macos_vm_stat() -> dict[str, int]:
    out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=False).stdout
    page = 4096
    m = re.search(r"page size of (\d+) bytes", out)
    if m:
        page = int(m.group(1))
    pages: dict[str, int] = {}
    for line in out.splitlines()[1:]:
        k, _, v = line.partition(":")
        v = v.strip().rstrip(".")
        if v.isdigit():
            pages[k.strip()] = int(v) * page
    return pages


def read_memory(root: str | Path = "/", os_family: str | None = None) -> MemoryInfo:
    """RAM and swap of this host as seen by this process (cgroup limits honoured; see the module doc)."""
    fam = os_family or detect_os(root)
    if fam in ("linux", "android"):
        mi = read_meminfo(root)
        host_total = mi.get("MemTotal", 0)
        host_avail = mi.get("MemAvailable", mi.get("MemFree", 0) + mi.get("Cached", 0))
        swap_total, swap_free = mi.get("SwapTotal", 0), mi.get("SwapFree", 0)
        swappable = _android_swappable(mi) if fam == "android" else 0
        info = MemoryInfo(
            total_bytes=host_total,
            available_bytes=min(host_avail, host_total),
            swap_total_bytes=swap_total,
            swap_available_bytes=min(swap_free, swap_total),
            swappable_bytes=swappable,
            host_total_bytes=host_total,
            host_available_bytes=host_avail,
        )
        cg = find_cgroup("memory", root)
        if cg is not None:
            limit, headroom, swap_limit, swap_headroom, notes = cgroup_memory_limits(cg)
            info.notes.extend(notes)
            if limit is not None:
                info.total_bytes = min(info.total_bytes, limit)
                info.cgroup = f"v{cg.version} {cg.path}"
            if headroom is not None:
                info.available_bytes = min(info.available_bytes, headroom)
            if swap_limit is not None:
                info.swap_total_bytes = min(info.swap_total_bytes, swap_limit)
            if swap_headroom is not None:
                info.swap_available_bytes = min(info.swap_available_bytes, swap_headroom)
        info.available_bytes = min(info.available_bytes, info.total_bytes)
        info.swap_available_bytes = min(info.swap_available_bytes, info.swap_total_bytes)
        return info
    import psutil  # macOS and Windows

    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    swappable = 0
    notes = ["psutil.virtual_memory(): available = free + inactive (macOS) / available (Windows)"]
    if fam == "macos":
        try:
            swappable = _macos_vm_stat().get("Anonymous pages", 0)
            notes.append("swappable = vm_stat 'Anonymous pages' (internal pages)")
        except (OSError, subprocess.SubprocessError):
            notes.append("vm_stat failed: swappable = 0")
    return MemoryInfo(
        total_bytes=int(vm.total),
        available_bytes=min(int(vm.available), int(vm.total)),
        swap_total_bytes=int(sw.total),
        swap_available_bytes=min(int(sw.free), int(sw.total)),
        swappable_bytes=swappable,
        host_total_bytes=int(vm.total),
        host_available_bytes=int(vm.available),
        notes=notes,
    )


# --- background load ---------------------------------------------------------------------------------------
class CpuLoadMonitor:
    """How many CPUs *other* processes kept busy while this one measured (Linux: ``/proc/stat`` minus this
    process's own CPU time). A busy host lowers every compute figure; the profile records the load so that a
    reader knows. Elsewhere :meth:`stop` returns None."""

    def __init__(self, root: str | Path = "/") -> None:
        self.path = Path(root) / "proc/stat"
        self._start: tuple[float, float, float, float] | None = None

    def _sample(self) -> tuple[float, float, float, float] | None:
        import time

        try:
            f = self.path.read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        if not f or f[0] != "cpu":
            return None
        v = [int(x) for x in f[1:9]] + [0] * max(0, 8 - len(f[1:9]))
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        steal = v[7] / hz
        return time.perf_counter(), busy, steal, time.process_time()

    def start(self) -> CpuLoadMonitor:
        """Begin (or restart) the interval."""
        self._start = self._sample()
        return self

    def stop(self) -> tuple[float, float] | None:
        """(CPUs used by other processes, CPUs stolen by the hypervisor), averaged since :meth:`start`."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        if wall <= 0:
            return None
        others = (end[1] - self._start[1]) - (end[3] - self._start[3])
        return max(0.0, others / wall), max(0.0, (end[2] - self._start[2]) / wall)


# --- cores -------------------------------------------------------------------------------------------------
@dataclass
class CoresInfo:
    """Usable cores and where the figure came from."""

    cores: int
    affinity: int  # CPUs in this process's affinity mask (or online CPUs)
    quota: float | None  # CPU cgroup quota in CPUs, None = unlimited
    physical: int | None  # physical cores of the host (psutil), None = unknown
    online: int


def cgroup_cpu_quota(cg: CgroupDir) -> float | None:
    """The tightest CPU quota (in CPUs) of a CPU cgroup and its ancestors; None = unlimited."""
    best: float | None = None
    for lvl in cg.levels():
        q: float | None = None
        if cg.version == 1:
            quota, period = _read_int(lvl / "cpu.cfs_quota_us"), _read_int(lvl / "cpu.cfs_period_us")
            if quota is not None and quota > 0 and period:
                q = quota / period
        else:
            try:
                parts = (lvl / "cpu.max").read_text().split()
            except OSError:
                parts = []
            if (
                len(parts) == 2
                and parts[0] != "max"
                and parts[0].isdigit()
                and parts[1].isdigit()
                and int(parts[1])
            ):
                q = int(parts[0]) / int(parts[1])
        if q is not None and (best is None or q < best):
            best = q
    return best


def read_cores(root: str | Path = "/", affinity: int | None = None) -> CoresInfo:
    """Cores this process can use: the affinity mask capped by a CPU cgroup quota (rounded down, >= 1)."""
    online = os.cpu_count() or 1
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = online
    quota = None
    cg = find_cgroup("cpu", root)
    if cg is not None:
        quota = cgroup_cpu_quota(cg)
    cores = affinity
    if quota is not None:
        cores = min(cores, math.floor(quota + 1e-9))
    physical = None
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    return CoresInfo(cores=max(1, cores), affinity=affinity, quota=quota, physical=physical, online=online)
