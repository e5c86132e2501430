"""One interface over cgroup v1 and v2: the resource limits of an emulated device.

An emulated device is a set of processes confined by a control group: its memory limit (page cache included:
the kernel charges a file page to the cgroup of the process that first touched it), its CPU share (a CFS
quota or a cpuset) and its disk read rate (a throttle on the block device that holds the model).

Where each controller lives is read from the mount table, controller by controller, because a host can mix
the two versions (this project's machines mount every controller on v1 and leave an empty v2 hierarchy; a
user's systemd machine has v2 only):

==========  ==================================  ===========================================
controller  cgroup v1 (one hierarchy each)      cgroup v2 (unified, enabled by subtree_control)
==========  ==================================  ===========================================
memory      memory.limit_in_bytes (+ memsw)     memory.max, memory.swap.max
cpu         cpu.cfs_quota_us / cpu.cfs_period_us  cpu.max = "quota period"
cpuset      cpuset.cpus, cpuset.mems            cpuset.cpus, cpuset.mems
io          blkio.throttle.read_bps_device      io.max = "MAJ:MIN rbps=N"
==========  ==================================  ===========================================

Every group of one run sits under ``<mount>/prima-<runid>/`` (v2 needs the intermediate group to enable the
controllers for its children; v1 uses the same layout so that ``--cleanup`` finds everything the same way).
Problems that a user can fix (not root, a controller not mounted or not enabled, a read-only hierarchy)
raise :class:`~prima_sim.errors.EmulationError` naming the controller and what to do.

Why one module of this size: one interface over two kernel ABIs (cgroup v1 and v2) for four controllers; each
operation is written for both versions next to each other so that they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prima_sim.errors import EmulationError

CONTROLLERS = ("memory", "cpu", "cpuset", "io")
"""Logical controller names (v1 calls ``io`` ``blkio``)."""
_V1_NAME = {"memory": "memory", "cpu": "cpu", "cpuset": "cpuset", "io": "blkio"}
CFS_PERIOD_US = 100_000
DEFAULT_SWAPPINESS = 60
"""Swappiness of an emulated device that has swap: the kernel's default (``vm.swappiness``)."""
RMDIR_ATTEMPTS = 50


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller lives: a v1 hierarchy (its own mount) or the v2 unified one."""

    controller: str
    version: int
    mount: Path
    read_only: bool = False


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def read_mounts(root: str | Path = "/") -> list[tuple[str, Path, str, set[str]]]:
    """(fstype, mount point, source, options) of every cgroup mount (``root`` prefixes paths, for tests)."""
    r = Path(root)
    out: list[tuple[str, Path, str, set[str]]] = []
    try:
        text = (r / "proc/self/mounts").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] not in ("cgroup", "cgroup2"):
            continue
        mnt = r / _unescape(parts[1]).lstrip("/")
        out.append((parts[2], mnt, parts[0], set(parts[3].split(","))))
    return out


def detect(root: str | Path = "/") -> dict[str, Hierarchy]:
    """Where each controller of :data:`CONTROLLERS` is usable: v1 when a v1 hierarchy carries it, else v2 when
    the unified hierarchy's root lists it in ``cgroup.controllers``. Controllers found nowhere are absent."""
    found: dict[str, Hierarchy] = {}
    v2: list[tuple[Path, bool]] = []
    for fstype, mnt, _src, opts in read_mounts(root):
        ro = "ro" in opts
        if fstype == "cgroup":
            for c in CONTROLLERS:
                if _V1_NAME[c] in opts and c not in found:
                    found[c] = Hierarchy(c, 1, mnt, ro)
        else:
            v2.append((mnt, ro))
    for mnt, ro in v2:
        try:
            available = set((mnt / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        for c in CONTROLLERS:
            if c not in found and c in available:
                found[c] = Hierarchy(c, 2, mnt, ro)
    return found


def _what_to_do(controller: str) -> str:
    v1 = _V1_NAME[controller]
    return (
        f"mount it (cgroup v1: 'mkdir -p /sys/fs/cgroup/{v1} && mount -t cgroup -o {v1} cgroup /sys/fs/cgroup/{v1}'; "
        f"cgroup v2: 'echo +{controller} > /sys/fs/cgroup/cgroup.subtree_control'), or run in a VM or a privileged "
        f"container where it is available"
    )


def check_root() -> None:
    """Raise unless this process is root (cgroups, namespaces and traffic control all need it).

    Raises:
        EmulationError: naming what needs root.
    """
    if os.geteuid() != 0:
        raise EmulationError(
            "the emulation needs root: it creates cgroups (memory, CPU, disk limits), network namespaces and "
            "traffic-control qdiscs; run it as root (e.g. 'sudo prima-sim emulate ...') or in a root container "
            "with CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise EmulationError(f"cannot write {value.strip()!r} to {path}: {exc.strerror or exc}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def blkio_read_bytes(stat_file: Path, device: str | None = None) -> int:
    """Bytes read as a cgroup v1 ``blkio.throttle.io_service_bytes`` file counts them, from block device ``device``
    ("MAJ:MIN"; None: every device); 0 when the file cannot be read."""
    total = 0
    for line in _read(stat_file).splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read" and (device is None or parts[0] == device):
            total += _int(parts[2])
    return total


def _parse_kv(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                out[parts[0]] = int(parts[1])
    return out


@dataclass
class Group:
    """One control group (one emulated device): a directory per controller hierarchy.

    Create groups with :meth:`Cgroups.create`; methods that a controller does not back raise
    :class:`EmulationError`.
    """

    name: str
    dirs: dict[str, Path]
    versions: dict[str, int]
    _removed: bool = field(default=False, repr=False)

    # --- limits ---------------------------------------------------------------------------------------------
    def _dir(self, controller: str) -> Path:
        if controller not in self.dirs:
            raise EmulationError(
                f"cgroup {self.name}: the {controller} controller is not available ({_what_to_do(controller)})"
            )
        return self.dirs[controller]

    def set_memory_limit(self, nbytes: int, swap_bytes: int = 0) -> None:
        """Limit memory (anonymous and page cache) to ``nbytes`` and swap to ``swap_bytes`` (0: none).

        Without swap the group may not swap at all (v1: memory+swap limit = memory limit, swappiness 0; v2:
        ``memory.swap.max`` = 0). With swap, v1 gets memory+swap = ``nbytes + swap_bytes`` and swappiness 60 (the
        kernel's default), v2 ``memory.swap.max`` = ``swap_bytes`` (v2 has no per-group swappiness: the host's
        ``vm.swappiness`` applies).

        Raises:
            EmulationError: a limit cannot be written, or swap is asked for where the kernel does not account it.
        """
        d = self._dir("memory")
        if self.versions["memory"] == 1:
            _write(d / "memory.limit_in_bytes", str(int(nbytes)))
            memsw = d / "memory.memsw.limit_in_bytes"
            if swap_bytes and not memsw.exists():
                raise EmulationError(
                    f"cgroup {self.name}: swap was asked for but this kernel does not account swap per cgroup "
                    f"(no {memsw.name}): boot with 'swapaccount=1' (cgroup v1) or use cgroup v2"
                )
            if memsw.exists():  # only with swap accounting
                _write(memsw, str(int(nbytes + swap_bytes)))
            if (d / "memory.swappiness").exists():
                if swap_bytes:
                    _write(d / "memory.swappiness", str(DEFAULT_SWAPPINESS))
                else:
                    with contextlib.suppress(EmulationError):  # refused on some kernels for non-root groups
                        _write(d / "memory.swappiness", "0")
        else:
            _write(d / "memory.max", str(int(nbytes)))
            if swap_bytes and not (d / "memory.swap.max").exists():
                raise EmulationError(
                    f"cgroup {self.name}: swap was asked for but this kernel has no memory.swap.max "
                    f"(CONFIG_SWAP or swap accounting is off)"
                )
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", str(int(swap_bytes)))

    def swap_usage(self) -> int:
        """Bytes of the group's memory that are swapped out now (v1: memory+swap usage less memory usage; v2
        ``memory.swap.current``); 0 without swap accounting. Reads no ``memory.stat`` (no statistics flush)."""
        d = self._dir("memory")
        if self.versions["memory"] == 1:
            memsw = _read(d / "memory.memsw.usage_in_bytes")
            if not memsw:
                return 0
            # a group that may not swap reports 0: the two usages are read one after the other and their per-CPU
            # charge batches differ by a few hundred KiB, which read as "swapped out" on every device
            if _int(_read(d / "memory.memsw.limit_in_bytes")) <= _int(_read(d / "memory.limit_in_bytes")):
                return 0
            return max(0, _int(memsw) - _int(_read(d / "memory.usage_in_bytes")))
        return _int(_read(d / "memory.swap.current"))

    def set_cpu_quota(self, cpus: float, period_us: int = CFS_PERIOD_US) -> None:
        """At most ``cpus`` CPUs of time (CFS bandwidth control)."""
        d = self._dir("cpu")
        quota = max(1000, round(cpus * period_us))
        if self.versions["cpu"] == 1:
            _write(d / "cpu.cfs_period_us", str(period_us))
            _write(d / "cpu.cfs_quota_us", str(quota))
        else:
            _write(d / "cpu.max", f"{quota} {period_us}")

    def set_cpuset(self, cpus: str, mems: str | None = None) -> None:
        """Run only on the CPUs ``cpus`` (a list such as ``"0"`` or ``"0-1"``)."""
        d = self._dir("cpuset")
        if mems is None:
            mems = _effective(d.parent, "mems") or "0"
        _write(d / "cpuset.mems", mems)
        _write(d / "cpuset.cpus", cpus)

    def set_read_bps(self, device: str, bps: float) -> None:
        """Throttle reads from block device ``device`` ("MAJ:MIN") to ``bps`` bytes per second."""
        d = self._dir("io")
        if self.versions["io"] == 1:
            _write(d / "blkio.throttle.read_bps_device", f"{device} {int(bps)}")
        else:
            _write(d / "io.max", f"{device} rbps={int(bps)}")

    # --- membership -------------------------------------------------------------------------------------------
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to, to join the group (one per hierarchy)."""
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (and its threads) into every hierarchy of the group."""
        for f in self.procs_files():
            _write(f, str(pid))

    def pids(self) -> set[int]:
        """Processes in the group (any hierarchy)."""
        out: set[int] = set()
        for f in self.procs_files():
            for line in _read(f).split():
                with contextlib.suppress(ValueError):
                    out.add(int(line))
        return out

    # --- measurements -------------------------------------------------------------------------------------
    def memory_stat(self) -> dict[str, int]:
        """Memory of the group, normalized: ``anon`` (anonymous), ``file`` (page cache), ``usage`` (charged
        now), ``peak`` (highest charge since creation or :meth:`reset_peak`; 0 where the kernel lacks it),
        ``limit``, and the raw ``memory.stat`` fields."""
        d = self._dir("memory")
        raw = _parse_kv(_read(d / "memory.stat"))
        out = dict(raw)
        if self.versions["memory"] == 1:
            out["anon"] = raw.get("total_rss", raw.get("rss", 0))  # includes transparent huge pages
            out["file"] = raw.get("total_cache", raw.get("cache", 0))
            out["usage"] = _int(_read(d / "memory.usage_in_bytes"))
            out["peak"] = _int(_read(d / "memory.max_usage_in_bytes"))
            out["limit"] = _int(_read(d / "memory.limit_in_bytes"))
        else:
            out["anon"] = raw.get("anon", 0)
            out["file"] = raw.get("file", 0)
            out["usage"] = _int(_read(d / "memory.current"))
            out["peak"] = _int(_read(d / "memory.peak"))
            lim = _read(d / "memory.max").strip()
            out["limit"] = _int(lim) if lim and lim != "max" else 0
        return out

    def memory_light(self) -> dict[str, int]:
        """``anon``, ``file``, ``usage``, ``limit`` of the group without reading ``memory.stat``.

        Reading ``memory.stat`` flushes the cgroup's statistics, and the kernel's reclaim decides on those
        statistics (whether the inactive list is low, whether a refault is recent: docs/pagecache.md); reading it
        every 50 ms made the emulated devices keep part of a cyclically read model resident where a real device,
        whose statistics are flushed every 2 s, re-reads it all. So the sampler reads what does not flush: the
        charge (``memory.usage_in_bytes`` / ``memory.current``), and the processes' anonymous memory from
        ``/proc/<pid>/status`` (``RssAnon``); ``file`` is the charge less that (page cache and kernel memory).
        """
        d = self._dir("memory")
        if self.versions["memory"] == 1:
            usage = _int(_read(d / "memory.usage_in_bytes"))
            limit = _int(_read(d / "memory.limit_in_bytes"))
        else:
            usage = _int(_read(d / "memory.current"))
            lim = _read(d / "memory.max").strip()
            limit = _int(lim) if lim and lim != "max" else 0
        anon = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                        break
        return {"anon": anon, "file": max(0, usage - anon), "usage": usage, "limit": limit}

    def cpu_throttled_s(self) -> float:
        """Seconds the group's CPU quota has held its threads back so far (0 without the cpu controller)."""
        d = self.dirs.get("cpu")
        if d is None:
            return 0.0
        st = _parse_kv(_read(d / "cpu.stat"))
        if self.versions["cpu"] == 1:
            return st.get("throttled_time", 0) / 1e9
        return st.get("throttled_usec", 0) / 1e6

    def oom_kills(self) -> int:
        """Processes of the group the kernel's OOM killer has killed so far (0 where not reported)."""
        d = self.dirs.get("memory")
        if d is None:
            return 0
        f = d / ("memory.oom_control" if self.versions["memory"] == 1 else "memory.events")
        return _parse_kv(_read(f)).get("oom_kill", 0)

    def reset_peak(self) -> None:
        """Start a new peak measurement (v1 ``max_usage_in_bytes``; v2 ``memory.peak`` on kernels >= 6.12)."""
        d = self._dir("memory")
        f = d / ("memory.max_usage_in_bytes" if self.versions["memory"] == 1 else "memory.peak")
        if f.exists():
            with contextlib.suppress(OSError):
                f.write_text("0")

    def io_read_bytes(self, device: str | None = None) -> int:
        """Bytes read by the group so far from block device ``device`` ("MAJ:MIN"; None: every device), 0
        without the io controller. Name the device: I/O a loop device passes on to its backing disk is charged
        to the same group again, so the sum over devices counts it twice."""
        d = self.dirs.get("io")
        if d is None:
            return 0
        if self.versions["io"] == 1:
            return blkio_read_bytes(d / "blkio.throttle.io_service_bytes", device)
        total = 0
        for line in _read(d / "io.stat").splitlines():
            parts = line.split()
            if not parts or (device is not None and parts[0] != device):
                continue
            for tok in parts[1:]:
                if tok.startswith("rbytes="):
                    total += _int(tok[7:])
        return total

    def drop_page_cache(self) -> None:
        """Ask the kernel to reclaim the group's page cache (v1 ``memory.force_empty``; v2: shrink
        ``memory.reclaim``). Best effort: a global drop_caches is the reliable way (see :func:`drop_caches`)."""
        d = self.dirs.get("memory")
        if d is None:
            return
        with contextlib.suppress(OSError):
            if self.versions["memory"] == 1:
                (d / "memory.force_empty").write_text("0")
            elif (d / "memory.reclaim").exists():
                (d / "memory.reclaim").write_text(str(1 << 40))

    # --- teardown ---------------------------------------------------------------------------------------------
    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process of the group until none is left (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    def remove(self) -> None:
        """Kill every process of the group and remove its directories (retrying while the kernel is busy).

        Raises:
            EmulationError: a directory could not be removed (its path and the reason).
        """
        if self._removed:
            return
        self.kill_all()
        problems = []
        for d in sorted(set(self.dirs.values()), key=lambda p: -len(p.parts)):
            err = remove_dir(d)
            if err:
                problems.append(err)
        self._removed = True
        if problems:
            raise EmulationError("; ".join(problems))


def _int(s: str) -> int:
    try:
        return int(s.strip())
    except ValueError:
        return 0


def _effective(d: Path, what: str) -> str:
    """cpuset ``cpus``/``mems`` of a v1 or v2 group (the effective set, else the configured one)."""
    for name in (f"cpuset.effective_{what}", f"cpuset.{what}.effective", f"cpuset.{what}"):
        v = _read(d / name).strip()
        if v:
            return v
    return ""


def remove_dir(d: Path) -> str:
    """rmdir a cgroup directory (children first), killing what is left in it; '' on success, else why not."""
    if not d.exists():
        return ""
    for child in sorted((p for p in d.iterdir() if p.is_dir()), key=lambda p: -len(p.parts)):
        err = remove_dir(child)
        if err:
            return err
    last = ""
    for _ in range(RMDIR_ATTEMPTS):
        for pid in _read(d / "cgroup.procs").split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            d.rmdir()
            return ""
        except FileNotFoundError:
            return ""
        except OSError as exc:
            last = exc.strerror or str(exc)
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EAGAIN):
                break
            time.sleep(0.05)
    return f"cannot remove cgroup {d}: {last}"


class Cgroups:
    """The cgroups of one emulation run: ``<mount>/<parent>/<device>`` in every hierarchy that is needed.

    Args:
        parent: name of the run's group (``prima-<runid>``).
        need: controllers that must be available (``memory`` always; ``cpu``, ``cpuset``, ``io`` when the
            scenario sets such limits).
        root: file-system root (tests point it at a fake tree).
        require_root: check that this process is root.

    Raises:
        EmulationError: not root, a controller is missing or its hierarchy is read-only.
    """

    def __init__(self, parent: str, need: Iterable[str] = ("memory",), root: str | Path = "/",
                 require_root: bool = True) -> None:  # fmt: skip
        if require_root:
            check_root()
        self.parent = parent
        self.root = Path(root)
        self.hier = detect(root)
        need = list(dict.fromkeys(need))
        for c in need:
            if c not in CONTROLLERS:
                raise ValueError(f"unknown controller {c!r}")
            h = self.hier.get(c)
            if h is None:
                raise EmulationError(
                    f"the cgroup controller '{c}' is not available on this host: {_what_to_do(c)}"
                )
            if h.read_only or not os.access(h.mount, os.W_OK):
                raise EmulationError(
                    f"the cgroup {c} hierarchy at {h.mount} is read-only (cgroup v{h.version}): remount it "
                    f"read-write ('mount -o remount,rw {h.mount}') or run in a privileged container"
                )
        self.need = need
        self.groups: list[Group] = []
        self._parents: dict[Path, bool] = {}

    def _parent_dir(self, c: str) -> Path:
        h = self.hier[c]
        d = h.mount / self.parent
        if d in self._parents:
            return d
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise EmulationError(f"cannot create cgroup {d}: {exc.strerror or exc}") from None
        self._parents[d] = True
        if h.version == 2:
            self._enable_v2(h.mount, d, c)
        elif c == "cpuset":
            for what in ("cpus", "mems"):
                f = d / f"cpuset.{what}"
                if not _read(f).strip():
                    _write(f, _effective(h.mount, what))
        return d

    def _enable_v2(self, mount: Path, parent: Path, c: str) -> None:
        for d in (mount, parent):
            have = set(_read(d / "cgroup.subtree_control").split())
            if c not in have:
                try:
                    (d / "cgroup.subtree_control").write_text(f"+{c}")
                except OSError as exc:
                    hint = (
                        " (the root group may hold processes of a v2 'threaded' or domain-invalid tree, or the "
                        "controller is bound to a v1 hierarchy)"
                        if d == mount
                        else ""
                    )
                    raise EmulationError(
                        f"cannot enable the {c} controller in {d}/cgroup.subtree_control: {exc.strerror or exc}{hint}; "
                        f"{_what_to_do(c)}"
                    ) from None

    def dirs_for(self, name: str) -> dict[str, Path]:
        """Where group ``name`` lives (or would live) in each needed hierarchy."""
        return {c: self.hier[c].mount / self.parent / name for c in self.need}

    def create(self, name: str) -> Group:
        """Create the group ``name`` in every needed hierarchy (no limits yet).

        Raises:
            EmulationError: a directory cannot be created.
        """
        dirs: dict[str, Path] = {}
        versions: dict[str, int] = {}
        made: list[Path] = []
        try:
            for c in self.need:
                d = self._parent_dir(c) / name
                versions[c] = self.hier[c].version
                dirs[c] = d
                if not d.exists():
                    d.mkdir()
                    made.append(d)
            g = Group(name, dirs, versions)
            if (
                "cpuset" in dirs and versions["cpuset"] == 1
            ):  # a v1 cpuset group starts with no CPUs or memory
                par = dirs["cpuset"].parent
                g.set_cpuset(_effective(par, "cpus"), _effective(par, "mems"))
        except OSError as exc:
            for d in reversed(made):
                remove_dir(d)
            raise EmulationError(f"cannot create cgroup {name} in {d}: {exc.strerror or exc}") from None
        except EmulationError:
            for d in reversed(made):
                remove_dir(d)
            raise
        self.groups.append(g)
        return g

    def remove_all(self) -> list[str]:
        """Remove every group of this run and the run's parent groups; returns the problems (empty if none)."""
        problems: list[str] = []
        for g in reversed(self.groups):
            try:
                g.remove()
            except EmulationError as exc:
                problems.append(str(exc))
        self.groups.clear()
        for d in sorted(self._parents, key=lambda p: -len(p.parts)):
            err = remove_dir(d)
            if err:
                problems.append(err)
        self._parents.clear()
        return problems

    def remove_all_or_raise(self) -> None:
        """:meth:`remove_all`, raising :class:`EmulationError` with its problems (a resource registry's undo reports
        a failure by raising; the registry's teardown logs it)."""
        problems = self.remove_all()
        if problems:
            raise EmulationError("; ".join(problems))


def leftover_dirs(prefix: str = "prima-", root: str | Path = "/") -> list[Path]:
    """Run groups (``<mount>/prima-*``) left in any cgroup hierarchy, e.g. by a run that was killed."""
    out: list[Path] = []
    seen: set[Path] = set()
    for _fstype, mnt, _src, _opts in read_mounts(root):
        if mnt in seen or not mnt.is_dir():
            continue
        seen.add(mnt)
        with contextlib.suppress(OSError):
            out += sorted(p for p in mnt.iterdir() if p.is_dir() and p.name.startswith(prefix))
    return out


# --- the block device behind a file --------------------------------------------------------------------------
def _sys_block(root: Path, dev: str) -> Path:
    return root / "sys/dev/block" / dev


def block_device_of(path: str | Path, root: str | Path = "/") -> str:
    """``MAJ:MIN`` of the whole disk that holds ``path``, the device a read throttle must name.

    The file system's device number (``stat``) is followed to a disk: a partition's parent disk (throttles
    apply to whole disks), and for file systems without a block device of their own (overlayfs, btrfs
    subvolumes, device number major 0) the source of the mount that holds the path. Device-mapper and MD
    devices are throttled as themselves (they are bio-based and the throttle sees their I/O).

    Raises:
        EmulationError: no block device could be found (e.g. a tmpfs or network file system).
    """
    r = Path(root)
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        src = _mount_source_of(Path(path), r)
        if src is None or not src.startswith("/dev/"):
            raise EmulationError(
                f"{path} is on a file system without a block device ({src or 'unknown source'}): a disk read limit "
                f"needs the model on a disk-backed file system; put the model elsewhere or drop disk_read"
            )
        try:
            sst = os.stat(r / src.lstrip("/"))
        except OSError as exc:
            raise EmulationError(f"cannot stat {src}, the device behind {path}: {exc.strerror}") from None
        major, minor = os.major(sst.st_rdev), os.minor(sst.st_rdev)
    dev = f"{major}:{minor}"
    sysd = _sys_block(r, dev)
    if (sysd / "partition").exists():  # a partition: the throttle applies to its disk
        with contextlib.suppress(OSError):
            parent = sysd.resolve().parent
            d = _read(parent / "dev").strip()
            if d:
                dev = d
    return dev


def _mount_source_of(path: Path, root: Path) -> str | None:
    try:
        text = (root / "proc/self/mountinfo").read_text()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    p = str(Path(os.path.realpath(path)))
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        mnt = _unescape(f[4])
        inside = p == mnt or p.startswith(mnt.rstrip("/") + "/") or mnt == "/"
        if inside and (best is None or len(mnt) > best[0]):
            best = (len(mnt), r[1])
    return best[1] if best else None


def drop_caches() -> None:
    """Write dirty pages back and drop the clean page cache of the whole host (``sync; echo 1 >
    /proc/sys/vm/drop_caches``), so that the next reads come from disk and each page is charged to the cgroup
    of the process that reads it first.

    Raises:
        EmulationError: not permitted.
    """
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError as exc:
        raise EmulationError(
            f"cannot drop the page cache (/proc/sys/vm/drop_caches): {exc.strerror or exc}"
        ) from None
