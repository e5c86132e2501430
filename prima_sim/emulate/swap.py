"""Swap for emulated devices: one swap file per run, on the run's emulated disk.

A device of a scenario may have swap (``swap = "256 MiB"``, Linux only). Linux has no per-cgroup swap device:
swap space is the host's, and a memory cgroup is only allowed a share of it (cgroup v1: the memory+swap limit
``memory.memsw.limit_in_bytes`` above the memory limit; v2: ``memory.swap.max``; :meth:`Group.set_memory_limit
<prima_sim.emulate.cgroups.Group.set_memory_limit>`). So a run that has any device with swap creates one swap
file of the devices' total size on its emulated disk, ``swapon`` s it once, and every other device keeps a
memory+swap limit equal to its memory limit (no swap). The file is on the loop disk so that swap-ins are
reads of that disk: the device's cgroup read limit throttles them and its I/O counters count them, as the
weights' page faults.

Removal: the run's registry turns the swap off (``swapoff``) and deletes the file before the disk is unmounted
(newest first); ``prima-sim emulate --cleanup`` finds the swap files of dead runs in ``/proc/swaps`` by their
name ``prima-<runid>.swap`` (:func:`leftover_swaps`) and does the same. A crashed run never leaves swap on.

What swap on the host changes for the *other* devices (cgroup v1 with swap accounting, this project's hosts):
their groups cannot swap (memory+swap limit = memory limit, swappiness 0), but the kernel's refault test
(``workingset_test_recent``, mm/workingset.c) counts a group's anonymous memory in its workingset size whenever
``mem_cgroup_get_nr_swap_pages`` is positive, and on v1 that is the *host's* free swap: every group's paging is
judged as on a host with swap (docs/pagecache.md, "Swap"). On v2 it is the group's own ``memory.swap.max``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prima_sim.emulate.disk import run_tool
from prima_sim.emulate.resources import PREFIX, RUN_ID, Registry
from prima_sim.errors import EmulationError

_NAME = re.compile(rf"{re.escape(PREFIX)}([0-9a-f]{{6}})\.swap$")
_CHUNK = 8 << 20
ZSWAP_ENABLED = Path("/sys/module/zswap/parameters/enabled")


SWAP_TOOLS = "a device with swap needs util-linux (mkswap, swapon, swapoff)"


def swap_name(run_prefix: str) -> str:
    """File name of a run's swap file (``prima-<runid>.swap``)."""
    return f"{run_prefix}.swap"


@dataclass
class SwapFile:
    """The run's swap file (see the module doc).

    Args:
        registry: where the file and its activation are recorded for teardown.
        directory: where the file goes (the emulated disk's mount point).
        size_bytes: its size (the devices' swap together; rounded up to whole pages).
    """

    registry: Registry
    directory: Path
    size_bytes: int
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.path = self.directory / swap_name(self.registry.prefix)

    def create(self) -> Path:
        """Write the file in full (swap files must have no holes), ``mkswap`` and ``swapon`` it.

        Raises:
            EmulationError: a step failed (what was created is registered and removed by the teardown).
        """
        page = os.sysconf("SC_PAGE_SIZE")
        size = -(-int(self.size_bytes) // page) * page
        path = self.path
        self.registry.add("swap file", str(path), lambda: path.unlink(missing_ok=True))
        zeros = bytes(_CHUNK)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                left = size
                while left > 0:
                    left -= os.write(fd, zeros[: min(left, _CHUNK)])
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise EmulationError(f"cannot write the swap file {path}: {exc.strerror or exc}") from None
        run_tool(["mkswap", str(path)], "formatting the swap file", SWAP_TOOLS, timeout=300)
        run_tool(["swapon", str(path)], "enabling the swap file", SWAP_TOOLS, timeout=300)
        self.registry.add("swap", str(path), lambda: swap_off(path))
        return path


def swap_off(path: Path) -> None:
    """``swapoff`` a swap file if it is active.

    Raises:
        EmulationError: it is active and could not be turned off (e.g. no memory to swap its pages back in).
    """
    real = os.path.realpath(path)
    if real not in {os.path.realpath(a) for a in active_swaps()}:
        return
    run_tool(["swapoff", real], "turning the swap file off", SWAP_TOOLS, timeout=600)


def active_swaps(proc_swaps: Path = Path("/proc/swaps")) -> list[str]:
    """File names of the host's active swap areas (``/proc/swaps``)."""
    try:
        lines = proc_swaps.read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if parts:
            out.append(parts[0].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return out


def leftover_swaps(live: set[str], proc_swaps: Path = Path("/proc/swaps")) -> list[str]:
    """Active swap files of emulation runs that are not in ``live`` (by name: ``prima-<runid>.swap``)."""
    out = []
    for name in active_swaps(proc_swaps):
        m = _NAME.search(Path(name).name)
        if m and RUN_ID.match(m.group(1)) and m.group(1) not in live:
            out.append(name)
    return out


def remove_leftover_swap(path: str) -> None:
    """Turn a leftover swap file off and delete it."""
    p = Path(path)
    swap_off(p)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def zswap_enabled(flag: Path = ZSWAP_ENABLED) -> bool:
    """Whether zswap is on (swapped pages are then compressed in RAM before they reach the swap file)."""
    try:
        return flag.read_text().strip().upper() in ("Y", "1")
    except OSError:
        return False
