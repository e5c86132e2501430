"""Removing what emulation runs left behind (``prima-sim emulate --cleanup``): processes, namespaces, cgroups,
swap files, loop disks and state files of runs that are not alive. It needs both the run registry (``resources``) and the
emulated disks (``disk``), which is why it lives apart from either.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from prima_sim.emulate import cgroups, disk, swap
from prima_sim.emulate.resources import STATE_DIR, delete_netns, find_leftovers, kill_tree, live_run_ids


def cleanup_leftovers(include_live: bool = False) -> tuple[dict[str, list[str]], list[str]]:
    """Remove what :func:`find_leftovers` finds: processes first, then namespaces, then cgroups, then swap files
    (turned off: they live on the emulated disks), then the emulated disks.

    Returns:
        (what was found, problems).
    """
    found = find_leftovers(include_live)
    live = set() if include_live else live_run_ids()
    disks = disk.leftover_disks(live)
    found["disks"] = [d for d, _, _ in disks]
    found["swap"] = swap.leftover_swaps(live)
    problems: list[str] = []
    for d in found["cgroups"]:  # killing the processes first frees the namespaces too
        kill_tree(Path(d))
    for ns in found["netns"]:
        try:
            delete_netns(ns)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
    for d in found["cgroups"]:
        err = cgroups.remove_dir(Path(d))
        if err:
            problems.append(err)
    for sw in found["swap"]:  # before the disks: an active swap file keeps its file system busy
        try:
            swap.remove_leftover_swap(sw)
        except Exception as exc:  # report and go on with the rest
            problems.append(f"{sw}: {exc}")
    for dev, image, mnt in disks:
        try:
            disk.remove_leftover_disk(dev, image, mnt)
        except Exception as exc:  # report and go on with the rest
            problems.append(f"{dev}: {exc}")
    live = live_run_ids()
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("*.pid"):
            if f.stem not in live:
                with contextlib.suppress(OSError):
                    f.unlink()
    return found, problems
