"""The emulated devices of one scenario, and the processes started in them.

:class:`Testbed` is a context manager. Entering it installs the run's :class:`~prima_sim.emulate.resources.Registry`
(pid file, signal handlers), puts the work directory on an emulated disk (a loop device with the scenario's
readahead) or on the host's file system, turns on a swap file on that disk when a device has swap
(:mod:`prima_sim.emulate.swap`), and creates per device a cgroup (memory limit with page cache and the device's
swap, CPU quota or cpuset, disk read limit) and a network namespace on a shared bridge, HTB classes shaping every pair's
bandwidth; the user-space latency table for the head and workers (``--link-latency``) is :attr:`latency_env`.
Leaving it (by any way out, a failure half-way through entering included) removes every kernel object and
stops every process it registered, newest first.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from prima_sim.emulate import cgroups as cg
from prima_sim.emulate.disk import EmulatedDisk
from prima_sim.emulate.netns import Network, latency_table
from prima_sim.emulate.resources import Registry
from prima_sim.emulate.scenario import Scenario
from prima_sim.emulate.spawn import python_env, spawn, stop
from prima_sim.emulate.swap import SwapFile, zswap_enabled
from prima_sim.errors import EmulationError

log = logging.getLogger(__name__)

CPU_PERIOD_US = 10_000
"""CFS period of CPU quotas. 10 ms rather than the kernel's 100 ms default: with 100 ms a 30 ms token can run
unthrottled and the next one wait 70 ms, so per-token times would be bimodal instead of uniformly slower."""


class Testbed:
    """The devices of ``scenario`` on this host (see the module doc).

    Args:
        scenario: the devices, their limits and links.
        work_base: the run's work directory goes under it (``<work_base>/<run id>``, or on the emulated disk,
            whose image and mount point are in ``work_base``). Shards and the profiler's disk test file go there.
        model_bytes: size of the model file (the emulated disk holds a copy of the shards per plan).
        n_plans: how many plans' shards the disk must hold at once.
        keep_work: leave the work directory (the shards) on the host's file system when done.
        say: called with one line per step.
    """

    def __init__(self, scenario: Scenario, work_base: Path, *, model_bytes: int, n_plans: int,
                 keep_work: bool = False, say: Callable[[str], None] = log.info) -> None:  # fmt: skip
        self.sc = scenario
        self.ring = scenario.ring
        self.reg = Registry()
        self.run_id = self.reg.run_id
        self.work_base = work_base
        self.work = work_base / self.reg.run_id
        self.model_bytes = model_bytes
        self.n_plans = n_plans
        self.keep_work = keep_work
        self.say = say
        self.disk: EmulatedDisk | None = None
        self.swap: SwapFile | None = None
        self.disk_dev = ""  # MAJ:MIN of the disk the shards are on (whose reads the sampler counts)
        self.cgs: cg.Cgroups | None = None
        self.groups: dict[str, cg.Group] = {}
        self.calib_groups: dict[str, cg.Group] = {}
        self.net: Network | None = None
        self.latency_env = ""
        self.notes: list[str] = []

    # --- context ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self.reg.__enter__()
        try:
            self.setup_disk()
            self.setup_swap()
            self.setup_devices()
        except BaseException:
            self.reg.__exit__()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.reg.__exit__(exc_type, exc, tb)

    # --- set-up ----------------------------------------------------------------------------------------------
    def setup_disk(self) -> None:
        """The work directory: on an emulated disk (a loop device of this run) or on the host's file system."""
        sc = self.sc
        if sc.disk.emulated:
            size = int(self.model_bytes * (self.n_plans + 0.5)) + (3 << 30) + sc.swap_bytes
            self.disk = EmulatedDisk(self.reg, self.work_base, size, sc.disk.readahead)
            self.work = self.disk.create() / "work"
            self.work.mkdir()
            self.say(f"disk: {self.disk.device} ({size / 2**30:.1f} GiB sparse image, ext4, readahead "
                     f"{sc.disk.readahead // 1024} KiB) mounted at {self.disk.mountpoint}")  # fmt: skip
        else:
            self.work.mkdir(parents=True, exist_ok=True)
            work = self.work
            self.reg.add(
                "dir",
                str(work),
                lambda: shutil.rmtree(work, ignore_errors=True) if not self.keep_work else None,
            )

    def setup_swap(self) -> None:
        """One swap file of the devices' total swap on the emulated disk, turned on (nothing without swap)."""
        total = self.sc.swap_bytes
        if not total:
            return
        assert self.disk is not None, "swap needs the emulated disk (the scenario's validation says so)"
        self.swap = SwapFile(self.reg, self.disk.mountpoint, total)
        path = self.swap.create()
        swapping = ", ".join(f"{d.name} {d.swap / 2**20:.0f} MiB" for d in self.ring if d.swap)
        self.say(f"swap: {path} ({total / 2**20:.0f} MiB) on {self.disk.device}; {swapping}")
        self.notes.append(
            "the host has swap during this run: on cgroup v1 every device's page cache is then judged as on a host "
            "with swap (the refault test counts its anonymous memory), also on devices that cannot swap"
        )
        if zswap_enabled():
            self.notes.append(
                "zswap is on: swapped pages are compressed in RAM before they reach the swap file"
            )

    def setup_devices(self) -> None:
        """A cgroup and a network namespace per device, the links shaped."""
        sc = self.sc
        cgs = cg.Cgroups(self.reg.prefix, need=sc.controllers())
        self.cgs = cgs
        self.reg.add("cgroups", self.reg.prefix, cgs.remove_all_or_raise)
        if self.disk is not None:
            self.disk_dev = self.disk.majmin
        else:
            with contextlib.suppress(EmulationError, OSError):
                self.disk_dev = cg.block_device_of(self.work)
        dev_id = self.disk_dev if any(d.disk_read for d in self.ring) else ""
        if dev_id == "" and any(d.disk_read for d in self.ring):
            dev_id = cg.block_device_of(self.work)
        for d in self.ring:
            g = cgs.create(d.name)
            g.set_memory_limit(d.memory, d.swap)
            if d.cpus is not None:
                g.set_cpu_quota(d.cpus, CPU_PERIOD_US)
            if d.cpuset is not None:
                g.set_cpuset(d.cpuset)
            if d.disk_read:
                g.set_read_bps(dev_id, d.disk_read)
            self.groups[d.name] = g
        limits = [d.disk_read for d in self.ring if d.disk_read]
        if limits and len(limits) < len(self.ring):
            self.notes.append(
                "some devices have no disk read limit: they share the physical disk unthrottled"
            )
        net = Network(self.reg)
        self.net = net
        net.create([d.name for d in self.ring])
        lat: dict[tuple[str, str], float] = {}
        for a in self.ring:
            peers = {}
            for b in self.ring:
                if a.name == b.name:
                    continue
                bw, latency = sc.pair(a.name, b.name)
                peers[b.name] = bw
                lat[(a.name, b.name)] = latency
            net.shape(a.name, peers)
        self.latency_env = latency_table(lat)
        self.say(f"devices: {len(self.ring)} cgroups under {self.reg.prefix} ({', '.join(sc.controllers())}), "
                 f"namespaces {', '.join(n.ns for n in net.nodes.values())}"
                 + (f", disk {dev_id} read-limited" if dev_id else ""))  # fmt: skip

    def calibration_group(self, name: str) -> cg.Group:
        """A cgroup with device ``name``'s CPU limits and no memory or disk limit (created on first use)."""
        if name not in self.calib_groups:
            assert self.cgs is not None, "the testbed is not set up"
            d = self.sc.device(name)
            g = self.cgs.create(f"calibrate-{name}")
            if d.cpus is not None:
                g.set_cpu_quota(d.cpus, CPU_PERIOD_US)
            if d.cpuset is not None:
                g.set_cpuset(d.cpuset)
            self.calib_groups[name] = g
        return self.calib_groups[name]

    def ip(self, device: str) -> str:
        """The address of ``device`` on the bridge."""
        assert self.net is not None, "the testbed is not set up"
        return self.net.nodes[device].ip

    # --- processes -------------------------------------------------------------------------------------------
    def spawn(
        self, owner: str, cmd: Sequence[str], group: cg.Group, *, netns: str | None = None,
        env: Mapping[str, str] | None = None, stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None, stdin: IO[Any] | int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``cmd`` (a Python program: :func:`~prima_sim.emulate.spawn.python_env` with ``env`` on top) in
        cgroup ``group`` and namespace ``netns`` (None: the host's), in the work directory, registered (as
        ``owner``'s) to be stopped on the way out."""
        p = spawn(cmd, procs_files=group.procs_files(), netns=netns, env=python_env(env), stdout=stdout,
                  stderr=stderr, cwd=self.work, stdin=stdin)  # fmt: skip
        self.reg.add("process", f"{owner} pid {p.pid}", lambda: stop(p, 1.0))
        return p

    def spawn_in(
        self, device: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside ``device`` (its cgroup and namespace), stdout and stderr to ``log_path``."""
        assert self.net is not None, "the testbed is not set up"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as fh:
            return self.spawn(device, cmd, self.groups[device], netns=self.net.nodes[device].ns, env=env,
                              stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
