"""exec/pagemap.py: the warm-up touches exactly the resident pages of a mapping and reads nothing from disk."""

from __future__ import annotations

import mmap
import os
import sys

import pytest

from prima_sim.exec.pagemap import (
    PAGE,
    fault_in,
    mapped_spans,
    mapping_base,
    release_range,
    residency,
    resident_runs,
    touch_resident,
)

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


def test_release_range_drops_its_pages_and_fault_in_reads_back_at_most_its_budget(tmp_path):
    """The head's load gives the token table's pages back (release_range) and reads as many missing bytes of its
    window back (fault_in): the released range leaves the cache, the others keep theirs, and fault_in reads the
    missing pages in file order from its start and stops at its budget."""
    mib = 1 << 20
    n = 16 * mib
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(n))
    os.sync()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), n, prot=mmap.PROT_READ) as m:
        base = mapping_base(path)
        assert base is not None
        assert (
            m[n - 1 :] is not None and touch_resident(path) == n
        )  # all resident and mapped, as after a load
        # the "table" [2, 6) MiB leaves; [0, 2) and [6, 16) MiB stay
        assert release_range(path, 2 * mib, 6 * mib) == 4 * mib
        assert _resident(base + 2 * mib, 4 * mib) == 0
        assert _resident(base, 2 * mib) == 2 * mib and _resident(base + 6 * mib, 10 * mib) == 10 * mib
        assert release_range(path, 2 * mib, 6 * mib) == 0  # nothing left there to give back
        # the "window" [8, 16) MiB lost [9, 14) MiB; a budget of 2 MiB reads [9, 11) MiB back, in file order (the
        # kernel's readahead after the last fault may read a little further: not asserted)
        release_range(path, 9 * mib, 14 * mib)
        assert fault_in(path, 8 * mib, 2 * mib) == 2 * mib
        assert _resident(base + 9 * mib, 2 * mib) == 2 * mib
        assert _resident(base + 9 * mib, 5 * mib) < 5 * mib
        assert _resident(base + 2 * mib, 4 * mib) == 0  # below the window's start: not read
        assert fault_in(path, 8 * mib, 8 * mib) <= 3 * mib  # the rest of what is missing, no more
        assert _resident(base + 8 * mib, 8 * mib) == 8 * mib
    assert release_range(tmp_path / "shard.bin", 0, n) == 0  # no mapping left: nothing to say was resident


def test_release_and_fault_in_count_each_file_page_once_under_two_mappings(tmp_path):
    """The head maps its logits shard twice (llama.cpp's mapping and the token table's own): what was resident and
    what is read back are bytes of the file, not of each mapping."""
    mib = 1 << 20
    path = tmp_path / "shard.bin"
    path.write_bytes(os.urandom(16 * mib))
    os.sync()
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ),
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ),
    ):
        assert len(mapped_spans(path)) == 2
        touch_resident(path)
        assert release_range(path, 4 * mib, 12 * mib) == 8 * mib
        assert fault_in(path, 4 * mib, 6 * mib) == 6 * mib
        base = mapping_base(path)
        assert base is not None and _resident(base + 4 * mib, 6 * mib) == 6 * mib
