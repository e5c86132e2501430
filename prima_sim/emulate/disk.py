"""The emulated devices' disk: a loop device with its own file system, readahead and read limits.

Shards and the profiler's test file live on a block device that the run creates: a sparse image file in the
work directory attached to a loop device (``losetup --direct-io=on``, so the host's page cache does not hold
a second copy), formatted ext4 and mounted. It gives every run

* a disk whose readahead is that of a typical device (``read_ahead_kb`` = 128 KiB by default, the kernel's
  default for SSDs and eMMC), not the host's: this project's virtual machines set 8 MiB on their virtio disk,
  and with 8 MiB every page fault on a cold embedding row reads 8 MiB (the kernel's mmap read-around), an
  artefact no phone or laptop has;
* a device of its own for the per-device read limits (``blkio.throttle.read_bps_device`` / ``io.max`` name it);
* a file system that disappears with the run.

Reads that reach the loop device are throttled per cgroup like any disk's; the loop device then reads the
image with direct I/O from the host's disk, whose bandwidth all emulated devices share.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prima_sim.emulate.resources import PREFIX, RUN_ID, Registry
from prima_sim.errors import EmulationError

if TYPE_CHECKING:
    from prima_sim.devices.cluster import Cluster
    from prima_sim.emulate.scenario import Scenario

DEFAULT_READAHEAD_BYTES = 128 << 10

BLK_THROTTLE_SLICE_S = 0.1
"""The slice in which Linux 6.x's blk-throttle grants a cgroup's read budget (``DFL_THROTL_SLICE`` = HZ/10, the
same for every disk since the low limit was removed; the loop and virtio disks here report rotational = 1,
which older kernels gave 100 ms too)."""


def with_read_limits(cluster: Cluster, scenario: Scenario) -> Cluster:
    """``cluster`` with each device whose scenario gives it a disk read limit (``disk_read``) marked as having a
    blk-throttled disk (``DeviceProfile.disk_throttle_slice_s``), so the simulator lets its reads through as the
    kernel does: a slice's budget at once after a pause, not a steady rate. Devices without a limit read the
    physical disk unthrottled and stay as they are; so does a profile that already says."""
    limited = {d.name for d in scenario.devices if d.disk_read}
    devs = tuple(d.model_copy(update={"disk_throttle_slice_s": BLK_THROTTLE_SLICE_S})
                 if d.name in limited and d.disk_throttle_slice_s is None else d
                 for d in cluster.devices)  # fmt: skip
    return cluster.model_copy(update={"devices": devs})


DISK_TOOLS = "the emulated disk needs util-linux (losetup, mount) and e2fsprogs (mkfs.ext4); or set [disk] emulated = false"


def run_tool(cmd: list[str], what: str, needs: str = DISK_TOOLS, timeout: float = 120) -> str:
    """Run a system tool of the emulation; its stdout. ``what`` says what it was for and ``needs`` which packages
    provide the tools (both go into the error).

    Raises:
        EmulationError: the tool is missing, does not finish in ``timeout`` seconds, or fails.
    """
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EmulationError(f"{cmd[0]} is not installed: {needs}") from None
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{what}: '{' '.join(cmd)}' did not finish in {timeout:g} s") from None
    if r.returncode != 0:
        raise EmulationError(f"{what}: '{' '.join(cmd)}' failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return r.stdout


@dataclass
class EmulatedDisk:
    """A loop-device disk mounted at :attr:`mountpoint` (see the module doc).

    Args:
        registry: where the image, the loop device and the mount are recorded for teardown.
        parent: directory on the host's disk that holds the image file and the mount point.
        size_bytes: size of the (sparse) image.
        readahead_bytes: the device's ``read_ahead_kb``.
    """

    registry: Registry
    parent: Path
    size_bytes: int
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES
    image: Path = field(init=False)
    mountpoint: Path = field(init=False)
    device: str = ""

    def __post_init__(self) -> None:
        self.image = self.parent / f"{self.registry.prefix}-disk.img"
        self.mountpoint = self.parent / f"{self.registry.prefix}-disk"

    def create(self) -> Path:
        """Create, attach, format and mount the disk; returns the mount point.

        Raises:
            EmulationError: a step failed (what was created is registered and removed by the teardown).
        """
        self.parent.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as fh:
            fh.truncate(self.size_bytes)
        self.registry.add("disk image", str(self.image), lambda: self.image.unlink(missing_ok=True))
        self.device = run_tool(
            ["losetup", "--find", "--show", "--direct-io=on", str(self.image)], "attaching a loop device"
        ).strip()
        dev = self.device
        self.registry.add("loop device", dev, lambda: detach(dev))
        run_tool(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev],
            "formatting the emulated disk",
        )
        self.mountpoint.mkdir(exist_ok=True)
        self.registry.add("dir", str(self.mountpoint), lambda: _rmdir(self.mountpoint))
        run_tool(["mount", "-o", "noatime", dev, str(self.mountpoint)], "mounting the emulated disk")
        self.registry.add("mount", str(self.mountpoint), lambda: unmount(self.mountpoint))
        name = Path(dev).name
        ra = Path(f"/sys/block/{name}/queue/read_ahead_kb")
        try:
            ra.write_text(str(max(4, self.readahead_bytes // 1024)))
        except OSError as exc:
            raise EmulationError(f"cannot set the readahead of {dev} ({ra}): {exc.strerror}") from None
        return self.mountpoint

    @property
    def majmin(self) -> str:
        """``MAJ:MIN`` of the loop device (what read limits name)."""
        st = os.stat(self.device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _rmdir(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.rmdir()


def unmount(p: Path) -> None:
    """Unmount ``p`` (lazily if it is busy).

    Raises:
        EmulationError: it is mounted and cannot be unmounted.
    """
    if not _is_mounted(p):
        return
    r = subprocess.run(["umount", str(p)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        r = subprocess.run(["umount", "-l", str(p)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise EmulationError(f"cannot unmount {p}: {r.stderr.strip()}")


def detach(dev: str) -> None:
    """Detach a loop device (ignoring one that is gone)."""
    subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, timeout=60)


def _is_mounted(p: Path) -> bool:
    target = str(p.resolve()) if p.exists() else str(p)
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                return True
    except OSError:
        pass
    return False


_IMAGE = re.compile(rf"{re.escape(PREFIX)}([0-9a-f]{{6}})-disk\.img")


def leftover_disks(live: set[str]) -> list[tuple[str, str, str]]:
    """(loop device, image, mount point) of emulated disks of runs that are not in ``live``."""
    out: list[tuple[str, str, str]] = []
    try:
        text = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return out
    for line in text.splitlines():
        dev, _, rest = line.partition(":")
        m = _IMAGE.search(rest)
        if not m or m.group(1) in live or not RUN_ID.match(m.group(1)):
            continue
        img = rest[rest.rfind("(") + 1 : rest.rfind(")")] if "(" in rest else ""
        mnt = str(Path(img).with_name(f"{PREFIX}{m.group(1)}-disk")) if img else ""
        out.append((dev.strip(), img, mnt))
    return out


def remove_leftover_disk(dev: str, image: str, mountpoint: str) -> None:
    """Unmount, detach and delete one leftover emulated disk."""
    if mountpoint:
        unmount(Path(mountpoint))
        _rmdir(Path(mountpoint))
    detach(dev)
    if image:
        Path(image).unlink(missing_ok=True)
