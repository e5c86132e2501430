"""Disk read bandwidth with the page cache bypassed, measured the way prima.cpp's fio job did.

prima.cpp ran ``fio`` with ``direct=1``, ``time_based``, ``iodepth=1`` and ``numjobs = threads`` on a 1 GiB
file: sequential reads in blocks of the device's readahead (``/sys/block/<dev>/queue/read_ahead_kb``,
128 KiB when unknown), random reads in blocks of one page. This module does the same without fio:

1. write a test file (default 1 GiB) of random bytes in the target folder with ``O_DIRECT`` (or buffered,
   then ``fsync``), so that none of it sits in the page cache;
2. ``n_threads`` reader threads, each with a page-aligned buffer, call ``preadv`` on an ``O_DIRECT`` file
   descriptor for a fixed time: sequentially through their own region of the file (readahead-sized blocks),
   then at random page-aligned offsets (page-sized blocks, one request in flight per thread);
3. bandwidth = all bytes read / elapsed time.

Where ``O_DIRECT`` is refused (tmpfs, some FUSE and network file systems, macOS), reads go through the page
cache and every block is dropped again right after it is read (``posix_fadvise(DONTNEED)``; random reads
also set ``POSIX_FADV_RANDOM`` so the kernel reads nothing ahead); macOS uses ``F_NOCACHE``. The result
records which method was used. On tmpfs the "disk" is RAM, and the figure says so.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prima_sim.errors import InputError

DEFAULT_READAHEAD = 128 * 1024
PAGE = mmap.PAGESIZE


@dataclass
class DiskResult:
    """Sequential and random read bandwidth of the file system holding ``folder``."""

    folder: str
    fs_type: str
    device: str
    file_bytes: int
    seq_block: int
    rand_block: int
    threads: int
    seq_bps: float
    rand_bps: float
    seq_bytes: int
    rand_bytes: int
    seq_s: float
    rand_s: float
    direct: bool
    method: str
    notes: list[str] = field(default_factory=list)

    def describe_seq(self) -> str:
        """One line for a profile's ``sources``."""
        return (
            f"{self.method}; sequential reads of {self.seq_block // 1024} KiB (readahead of {self.device or 'unknown device'}), "
            f"{self.threads} reader(s) each in its own region of a {self.file_bytes / 2**20:.0f} MiB file in {self.folder} "
            f"({self.fs_type}): {self.seq_bytes / 2**20:.0f} MiB in {self.seq_s:.2f} s"
        )

    def describe_rand(self) -> str:
        """One line for a profile's ``sources``."""
        return (
            f"{self.method}; random page-aligned reads of {self.rand_block // 1024} KiB, queue depth 1 per reader, "
            f"{self.threads} reader(s), over the same file: {self.rand_bytes / 2**20:.1f} MiB in {self.rand_s:.2f} s "
            f"({self.rand_bytes / self.rand_block / max(self.rand_s, 1e-9):.0f} IOPS)"
        )


def mount_of(path: str | Path, root: str | Path = "/") -> tuple[str, str, str]:
    """(mount point, file system type, source) of the mount holding ``path`` (longest prefix in mountinfo)."""
    target = os.path.realpath(path)
    best = ("/", "unknown", "")
    try:
        lines = (Path(root) / "proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    best_len = -1
    for line in lines:
        left, sep, right = line.partition(" - ")
        f, rf = left.split(), right.split()
        if not sep or len(f) < 5 or len(rf) < 2:
            continue
        mp = f[4].replace("\\040", " ")
        if (target == mp or target.startswith(mp.rstrip("/") + "/") or mp == "/") and len(mp) > best_len:
            best, best_len = (mp, rf[0], rf[1]), len(mp)
    return best


def readahead_bytes(path: str | Path, sys_root: str | Path = "/sys") -> tuple[int, str]:
    """Readahead of the block device holding ``path`` and the device's name; 128 KiB and '' when unknown."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return DEFAULT_READAHEAD, ""
    if not hasattr(os, "major"):  # Windows
        return DEFAULT_READAHEAD, ""
    node = Path(sys_root) / "dev/block" / f"{os.major(dev)}:{os.minor(dev)}"
    try:
        d = node.resolve(strict=True)
    except OSError:
        return DEFAULT_READAHEAD, ""
    if (d / "partition").exists():
        d = d.parent
    try:
        kb = int((d / "queue/read_ahead_kb").read_text().strip())
    except (OSError, ValueError):
        return DEFAULT_READAHEAD, d.name
    return (kb * 1024 if kb > 0 else DEFAULT_READAHEAD), d.name


def _aligned_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, max(size, PAGE))  # anonymous mappings are page-aligned, as O_DIRECT requires


def _open_direct(path: str, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT when the platform and file system allow it; (fd, direct)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
            return fd, True
        except OSError:
            pass
    return fd, False


def _drop(fd: int, offset: int = 0, length: int = 0) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwritev"):
        return os.pwritev(fd, [data], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows has neither pwritev nor pwrite
    return os.write(fd, data)


def write_test_file(folder: str | Path, size: int, block: int = 8 << 20) -> tuple[Path, bool]:
    """Write ``size`` bytes of random data to a new file in ``folder`` without leaving it in the page cache.

    Returns (path, written with O_DIRECT). The caller deletes the file."""
    fd0, name = tempfile.mkstemp(prefix=".prima-sim-disk-", suffix=".bin", dir=str(folder))
    os.close(fd0)
    block = max(PAGE, block // PAGE * PAGE)
    size = max(block, size // block * block)
    pattern = np.random.default_rng(12345).integers(0, 256, size=block, dtype=np.uint8)
    buf = _aligned_buffer(block)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = pattern
    try:
        fd, direct = _open_direct(name, os.O_WRONLY)
        try:
            for i in range(size // block):
                view[:8] = np.frombuffer(np.int64(i).tobytes(), dtype=np.uint8)  # no two blocks alike
                off = i * block
                done = 0
                while done < block:
                    done += _pwrite(fd, memoryview(buf)[done:], off + done)
            os.fsync(fd)
            if not direct:
                _drop(fd)
        finally:
            os.close(fd)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    finally:
        del view  # the numpy view must go before the mapping can close
        buf.close()
    return Path(name), direct


def _read_phase(
    path: Path, size: int, block: int, threads: int, seconds: float, random: bool, seed: int
) -> tuple[int, float, bool]:
    """``threads`` readers for ``seconds``; returns (bytes read, elapsed seconds, direct)."""
    fd, direct = _open_direct(str(path), os.O_RDONLY)
    if not direct and hasattr(os, "posix_fadvise"):
        _drop(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM if random else os.POSIX_FADV_SEQUENTIAL)
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()
    n_blocks = size // block

    def reader(i: int) -> None:
        buf = _aligned_buffer(block)
        mv = memoryview(buf)
        fh = None if hasattr(os, "preadv") else open(path, "rb", buffering=0)  # noqa: SIM115 (Windows: no preadv)
        try:
            rng = np.random.default_rng(seed + i)
            offsets = rng.integers(0, n_blocks, size=65536) * block if random else None
            region = max(1, n_blocks // threads)
            first = (i * region) % n_blocks
            k = 0
            barrier.wait()
            while not stop.is_set():
                off = (
                    int(offsets[k % offsets.size])
                    if offsets is not None
                    else ((first + k % region) % n_blocks) * block
                )
                if fh is None:
                    got = os.preadv(fd, [mv], off)
                else:
                    fh.seek(off)
                    got = fh.readinto(mv) or 0
                if got <= 0:
                    raise OSError(errno.EIO, f"short read at offset {off}")
                if not direct:
                    _drop(fd, off, got)
                counts[i] += got
                k += 1
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            stop.set()
            if barrier.n_waiting:
                barrier.abort()
        finally:
            if fh is not None:
                fh.close()
            mv.release()
            buf.close()

    workers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=30)
        t0 = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        os.close(fd)
    if errors:
        raise errors[0]
    return sum(counts), elapsed, direct


def measure_disk(
    folder: str | Path,
    file_bytes: int = 1 << 30,
    seconds: float = 1.5,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> DiskResult:
    """Sequential and random read bandwidth of the file system holding ``folder`` (page cache bypassed).

    Raises:
        InputError: ``folder`` does not exist, is not writable, or lacks space for the test file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("--disk-dir", "", f"{folder} is not a directory")
    if not os.access(folder, os.W_OK):
        raise InputError(
            "--disk-dir", "", f"{folder} is not writable (the disk test writes a temporary file there)"
        )
    notes: list[str] = []
    free = shutil.disk_usage(folder).free
    if free < file_bytes + (256 << 20):
        shrunk = (free - (256 << 20)) // 2 // (8 << 20) * (8 << 20)
        if shrunk < (64 << 20):
            raise InputError(
                "--disk-dir",
                "",
                f"{folder} has only {free >> 20} MiB free; the disk test needs a file of 64 MiB or more",
            )
        notes.append(
            f"test file shrunk from {file_bytes >> 20} MiB to {shrunk >> 20} MiB: only {free >> 20} MiB free"
        )
        file_bytes = shrunk
    _, fs_type, source = mount_of(folder)
    ra, dev_name = readahead_bytes(folder)
    seq_block = max(PAGE, ra // PAGE * PAGE)
    rand_block = PAGE
    if progress:
        progress("disk: writing test file")
    path, wrote_direct = write_test_file(folder, file_bytes, block=max(seq_block, 1 << 20))
    try:
        size = path.stat().st_size
        if progress:
            progress("disk: sequential reads")
        seq_bytes, seq_s, direct = _read_phase(path, size, seq_block, threads, seconds, False, 1)
        if progress:
            progress("disk: random reads")
        rand_bytes, rand_s, direct_r = _read_phase(path, size, rand_block, threads, seconds, True, 2)
    finally:
        path.unlink(missing_ok=True)
    direct = direct and direct_r
    if direct:
        method = (
            "O_DIRECT reads (page cache bypassed)"
            if sys.platform != "darwin"
            else "F_NOCACHE reads (page cache bypassed)"
        )
    else:
        method = (
            "buffered reads with posix_fadvise(DONTNEED) after every block (O_DIRECT refused by the file system)"
            if hasattr(os, "posix_fadvise")
            else "buffered reads: this OS offers no way to bypass its cache here, so repeated blocks may be cached"
        )
    if fs_type in ("tmpfs", "ramfs"):
        notes.append(
            f"{folder} is on {fs_type}: the file lives in RAM, so these are memory speeds, not a disk's"
        )
    if not wrote_direct:
        notes.append("test file written with buffered I/O, fsync and posix_fadvise(DONTNEED)")
    return DiskResult(
        folder=str(folder),
        fs_type=fs_type,
        device=dev_name or source,
        file_bytes=size,
        seq_block=seq_block,
        rand_block=rand_block,
        threads=threads,
        seq_bps=seq_bytes / seq_s,
        rand_bps=rand_bytes / rand_s,
        seq_bytes=seq_bytes,
        rand_bytes=rand_bytes,
        seq_s=seq_s,
        rand_s=rand_s,
        direct=direct,
        method=method,
        notes=notes,
    )
