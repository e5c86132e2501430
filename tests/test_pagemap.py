"""exec/pagemap.py: the warm-up touches exactly the resident pages of a mapping and reads nothing from disk."""

from __future__ import annotations

import mmap
import os
import sys

import pytest

from prima_sim.exec.pagemap import PAGE, mapped_spans, mapping_base, residency, resident_runs, touch_resident

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and /proc/self/maps")


def _resident(addr: int, length: int) -> int:
    return sum(b - a for a, b in resident_runs(addr, length))


def test_touch_resident_touches_the_cached_pages_only(tmp_path):
    path = tmp_path / "w.bin"
    mib = 1 << 20
    n = 16 * mib  # page-cache folios can be up to 2 MiB: the dropped range is aligned to that
    path.write_bytes(os.urandom(n))
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 4 * mib, 4 * mib, os.POSIX_FADV_DONTNEED)  # [4, 8) MiB leaves the cache
        with open(path, "rb") as f, mmap.mmap(f.fileno(), n, prot=mmap.PROT_READ) as m:
            spans = mapped_spans(path)
            assert len(spans) == 1 and spans[0][1] - spans[0][0] == n and spans[0][2] == 0
            base = mapping_base(path)
            assert base == spans[0][0]
            cached = _resident(base, n)
            assert cached == n - 4 * mib  # the dropped pages are out (mincore sees the page cache)
            assert residency(path) == (cached, n) and residency(path, end=4 * mib) == (4 * mib, 4 * mib)
            assert touch_resident(path) == cached
            assert _resident(base, n) == cached  # nothing was read in
            # a window's streamed part (from end on) is not touched
            assert touch_resident(path, end=2 * mib + 100) == 2 * mib
            assert m[0:1]  # still a valid mapping
    finally:
        os.close(fd)


def test_unmapped_file_has_no_spans(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\0" * PAGE)
    assert mapped_spans(path) == [] and mapping_base(path) is None and touch_resident(path) == 0
    assert mapped_spans(tmp_path / "missing") == []


def test_warm_up_skips_a_paging_device_with_several_windows(tmp_path):
    from prima_sim.exec.worker import LoadedWindow, warm_up

    mib = 1 << 20
    paths = []
    for name in ("w0.bin", "w1.bin"):
        p = tmp_path / name
        p.write_bytes(os.urandom(8 * mib))
        paths.append(p)
    os.sync()
    fd = os.open(paths[0], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 4 * mib, os.POSIX_FADV_DONTNEED)  # w0 half evicted, as a k = 2 load leaves it
    os.close(fd)
    files = [open(p, "rb") for p in paths]  # noqa: SIM115
    maps = [mmap.mmap(f.fileno(), 8 * mib, prot=mmap.PROT_READ) for f in files]
    try:
        wins = [LoadedWindow(i, p, None, None) for i, p in enumerate(paths)]  # type: ignore[arg-type]
        assert warm_up(wins) == 0  # several windows, one paging: nothing touched
        assert warm_up(wins[:1]) == 4 * mib  # one window: its resident part
        assert warm_up(wins[1:]) == 8 * mib
        assert residency(paths[0]) == (4 * mib, 8 * mib)  # and nothing was read in
    finally:
        for m in maps:
            m.close()
        for f in files:
            f.close()
