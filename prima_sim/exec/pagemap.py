"""This process's mappings of shard files, seen page by page: where llama.cpp mapped a shard, which of its pages
are resident in the page cache, and the warm-up that touches them before a window reports ready.

**Why a warm-up.** llama.cpp maps a shard; its load reads the weights into the page cache but does not touch them
from this process's user space, so the first ``llama_decode`` pays the first touch of every resident page (the
page-table and, on a virtual machine with shadow paging, the hypervisor's work per 4 KiB page). On the nested
virtual machines of this project's CI that is 3 us per page: a 1.8 GB window's first 16-token prefill took
2.6-3.9 s where every later one took 1.25 s (docs/exec.md). llama.cpp's own programs pay it in their warm-up
decode at start-up (``llama-cli``, ``llama-server``, prima.cpp), before the first prompt's clock starts. The
executor touches one byte of every *resident* page of a window's mapping instead of decoding: nothing is read
from disk (a page not in the cache stays out), no compute buffer is grown, and the streamed layers of a window
(``exec/stream.py``) are left alone. A device with several windows that do not all stay resident (k > 1 paging)
is not warmed: the pages its load left are those of its last windows, which its first window's faults will evict
before they run, and touched (mapped, young) pages would only be harder to reclaim.

Linux only (``mincore``/``madvise`` through libc, ``/proc/self/maps``); elsewhere these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

from prima_sim.exec.ring import advice_chunk

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4
_libc: ctypes.CDLL | None = None
_ODD = bytes(i & 1 for i in range(256))  # mincore's byte per page: bit 0 = resident, the others reserved


def _lib() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.mincore.restype = ctypes.c_int
    return _libc


def madvise_fn() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(addr, length, advice)``, or None where there is no libc."""
    lib = _lib()
    if lib is None:
        return None
    fn: Callable[[int, int, int], int] = lib.madvise
    return fn


def mapped_spans(path: Path) -> list[tuple[int, int, int]]:
    """``(start address, end address, file offset)`` of each piece of this process's mappings of ``path``
    (llama.cpp maps a shard whole, then unmaps the fragments no tensor uses), in address order; [] if none."""
    out: list[tuple[int, int, int]] = []
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 5 or int(parts[4]) != st.st_ino:
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                if os.makedev(major, minor) == st.st_dev:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, int(parts[2], 16)))
    except (OSError, ValueError):
        return []
    return sorted(out)


def mapping_base(path: Path) -> int | None:
    """Address of file offset 0 in this process's mapping of ``path`` (any remaining piece gives it), or None."""
    spans = mapped_spans(path)
    return spans[0][0] - spans[0][2] if spans else None


def resident_runs(addr: int, length: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` address runs of the mapped range ``[addr, addr + length)`` (page aligned) whose pages
    are in memory (``mincore``); [] where it cannot be asked."""
    lib = _lib()
    n = length // PAGE
    if lib is None or n <= 0:
        return []
    vec = (ctypes.c_ubyte * n)()
    if lib.mincore(addr, n * PAGE, vec) != 0:
        return []
    bits = bytes(vec).translate(_ODD)
    runs = []
    i = bits.find(1)
    while i >= 0:
        j = bits.find(0, i)
        j = n if j < 0 else j
        runs.append((addr + i * PAGE, addr + j * PAGE))
        i = bits.find(1, j)
    return runs


def _spans_below(path: Path, end: int | None) -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of ``path`` that map file offsets below ``end`` (all: None)."""
    out = []
    for lo, hi, off in mapped_spans(path):
        if end is not None:
            hi = min(hi, lo + max(0, end - off) // PAGE * PAGE)
        if hi > lo:
            out.append((lo, hi))
    return out


def residency(path: Path, end: int | None = None) -> tuple[int, int]:
    """``(resident, mapped)`` bytes of this process's mappings of ``path`` below file offset ``end``."""
    spans = _spans_below(path, end)
    resident = sum(b - a for lo, hi in spans for a, b in resident_runs(lo, hi - lo))
    return resident, sum(hi - lo for lo, hi in spans)


def touch_resident(path: Path, end: int | None = None) -> int:
    """Read one byte of every resident page of this process's mappings of ``path`` (file offsets below ``end``,
    if given), so that the first compute finds them mapped; returns the bytes touched. Reads nothing from disk:
    a page that left the cache between ``mincore`` and the touch is the only one faulted in."""
    touched = 0
    for lo, hi in _spans_below(path, end):
        for a, b in resident_runs(lo, hi - lo):
            view = (ctypes.c_ubyte * (b - a)).from_address(a)
            bytes(memoryview(view)[::PAGE])  # one byte per page, copied in C
            touched += b - a
    return touched


def release_range(path: Path, lo: int, hi: int) -> int:
    """Give file offsets ``[lo, hi)`` of ``path`` (shrunk to whole pages) back: unmap them from this process's
    mappings (``madvise(MADV_DONTNEED)``: the pages stay in the page cache, no longer mapped here) and drop them
    from the page cache (``posix_fadvise(DONTNEED)``: clean pages nothing else maps leave at once). A later touch
    reads them again. Returns the bytes of the range that were resident before; 0 where it cannot be done."""
    lo, hi = -(-lo // PAGE) * PAGE, hi // PAGE * PAGE
    fn = madvise_fn()
    if hi <= lo or fn is None or not hasattr(os, "posix_fadvise"):
        return 0
    before, done = 0, lo  # resident bytes, counted once where several mappings show the same file pages
    for a, b, off in sorted(mapped_spans(path), key=lambda s: s[2]):
        x, y = a + max(0, lo - off), a + min(b - a, hi - off)
        if y <= x:
            continue
        seen = a + max(0, done - off)
        before += sum(v - u for u, v in resident_runs(seen, y - seen)) if y > seen else 0
        done = max(done, off + y - a)
        fn(x, y - x, MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return before


def fault_in(path: Path, lo: int, budget: int) -> int:
    """Read into the page cache, through this process's mappings of ``path`` and in file order from offset ``lo``,
    the pages that are not resident, until ``budget`` bytes: each missing run is advised
    (``posix_fadvise(WILLNEED)``, in the pieces one advice reads) and then touched, one byte per page, so that the
    pages end up mapped here like the ones the load left. Returns the bytes read."""
    gaps: list[tuple[int, int, int]] = []  # (address, file offset, bytes) of the missing runs to read
    left = budget
    done = lo // PAGE * PAGE  # file offsets below this are seen to (by an earlier mapping of the same bytes)
    for base, end, off in sorted(mapped_spans(path), key=lambda s: s[2]):  # in file order, each byte once
        start = base + max(0, done - off)
        at = start
        for x, y in [*resident_runs(start, end - start), (end, end)] if end > start and left > 0 else []:
            n = min(x - at, left)  # [at, x) lies between two resident runs: missing
            if n > 0:
                gaps.append((at, off + at - base, n))
                left -= n
            at = max(at, y)
        done = max(done, off + end - base)
    if not gaps:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        step = advice_chunk(fd)
        for _, pos, n in gaps:
            for piece in range(pos, pos + n, step):
                os.posix_fadvise(fd, piece, min(step, pos + n - piece), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    for addr, _, n in gaps:
        bytes(memoryview((ctypes.c_ubyte * n).from_address(addr))[::PAGE])  # one byte per page, copied in C
    return budget - left
