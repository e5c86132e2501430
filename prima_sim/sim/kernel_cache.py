"""Linux's page cache of one memory cgroup, as the kernel really reclaims it (classic two-list LRU).

:class:`~prima_sim.sim.pagecache.PageCache` is a pure LRU: when a window larger than the cache is scanned
cyclically it re-reads every byte every token. Linux 6.x (without MGLRU) keeps part of such a window resident,
sometimes none, and the outcome is not monotone in the cache size (reports/pagecache-grid.csv). This module
models the mechanism at chunk granularity, following mm/vmscan.c, mm/workingset.c, mm/readahead.c and
mm/filemap.c (docs/pagecache.md has the references and the measurements):

* **Two lists** per cgroup, inactive and active. A chunk read from disk enters at the head of the inactive
  list, or of the active list when its refault is "recent" (below). Reclaim scans from the tails.
* **Referenced bits of mapped pages** (``folio_check_references``). A chunk touched through llama.cpp's mapping
  has its PTE young bit set. At the inactive tail: young and already ``PG_referenced`` -> activated; young but
  not referenced -> marked referenced and rotated to the inactive head (a second chance); not young -> evicted.
  The check clears the young bit. A chunk read ahead and not yet touched is not mapped: never young.
* **Deactivation** (``shrink_active_list``): the active tail moves to the inactive head, with its young bit
  cleared and ``PG_workingset`` set, whether or not it was used (only executable mappings rotate). The active
  list is scanned only when the reclaim may deactivate: refaults have activated pages since the previous
  reclaim (``WORKINGSET_ACTIVATE`` moved), or the inactive list is low (``inactive * ratio < active``, ratio
  ``isqrt(10 * GiB)`` of the cgroup's file LRU, 1 below 1 GiB). Both lists are then scanned in proportion to
  their sizes (``get_scan_count``: ``size >> priority`` each).
* **Shadow entries and refault distance** (mm/workingset.c). An eviction leaves a shadow holding the cgroup's
  ``nonresident_age`` (bytes evicted plus bytes activated so far, ``workingset_age_nonresident``). A chunk
  read again while its shadow exists has refault distance ``age_now - age_then``; when that is at most the
  active list's size (no swap: only ``NR_ACTIVE_FILE`` counts) the chunk enters the active list directly
  (``workingset_refault``) and counts as a refault activation.
* **In-flight reads are locked.** A chunk whose read has been submitted but not completed cannot be
  reclaimed (``folio_trylock`` fails: it is rotated). ``posix_fadvise(WILLNEED)`` allocates every page of its
  range when it is called (``page_cache_ra_unbounded``), so an advised window occupies the cache, locked,
  before its data arrives; an allocation that finds nothing reclaimable fails (readahead allocates with
  ``__GFP_NORETRY``) and the rest of that call is dropped. Give each insertion the time its read completes
  (``ready_at``) and set :attr:`KernelCache.now` before each call to get this behaviour; without times every
  chunk is unlocked at once.
* **Stale statistics.** ``inactive_is_low``, the refault test and the refault counter read the cgroup's flushed
  statistics (rstat: every 2 s, and whenever ``memory.stat`` is read); the scan targets use exact sizes.
  ``flush_interval_s`` (None: always exact) and :meth:`KernelCache.flush_stats` model this; it decides how much
  of the active list the first decode token deactivates, hence how much of a window stays resident.
* **llama.cpp's load** (``MAP_POPULATE``): ``get_user_pages(FOLL_TOUCH)`` marks every page accessed, so every
  large folio is activated (:meth:`KernelCache.populate`, :meth:`KernelCache.fill`).

What it leaves out (docs/pagecache.md): MGLRU (``/sys/kernel/mm/lru_gen``), anonymous memory and swap, other
file pages of the cgroup (give the capacity the model's share), the per-CPU LRU batches, real folio sizes,
shadow-node reclaim, kswapd and global reclaim, the mmap-miss heuristic and fault-around.

:func:`replay` runs the model (or the LRU :class:`~prima_sim.sim.pagecache.PageCache`) on the access pattern of
one device of a ring (k windows scanned in turn in llama.cpp's order, optional ``WILLNEED`` prefetch, a throttled
FIFO disk); use 256 KiB chunks (llama.cpp's readahead folios) for fidelity. :func:`reread_fraction` is the closed
form the analytic cost model can use.

Why one module of this size: it is one mechanism. The cgroup's two lists, readahead, WILLNEED and reclaim share one
state (the chunk table), and the replay harness (``Window``, ``ReplayConfig``, ``ReplayResult``, ``_Disk``) drives
exactly that state and is checked against the same measurements; split, the harness would reach into the cache's
internals.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prima_sim.devices.behaviour import (
    inactive_ratio,
)
from prima_sim.sim.pagecache import PageCache

INACTIVE, ACTIVE = 0, 1
DEF_PRIORITY = 12
GIB = 1 << 30
NEVER = float("-inf")


class KernelCache:
    """The page cache of one cgroup, chunk by chunk, with Linux's reclaim (see the module doc).

    Same surface as :class:`~prima_sim.sim.pagecache.PageCache` (``resident``, ``touch``, ``touch_all``,
    ``insert``, ``fill``, ``missing``, ``can_evict``, the counters, ``check``) plus time (:attr:`now`,
    ``ready_at``) for reads in flight, and :meth:`stats`.

    Args:
        name: device name (for messages).
        chunk_bytes: size of every chunk, by chunk id.
        chunk_group: group of every chunk (a window, or the output head), by chunk id.
        n_groups: number of groups.
        capacity_bytes: room for these chunks in the cgroup's page cache.
        growth_bytes: room the OS can make by swapping other apps out before it evicts (Android); used first.
        lru_extra_bytes: other file pages on the cgroup's LRU (they count in ``inactive_ratio``'s size only).

    Raises:
        ValueError: sizes and groups disagree, or a size or the capacity is negative.
    """

    def __init__(self, name: str, chunk_bytes: Sequence[int], chunk_group: Sequence[int], n_groups: int,
                 capacity_bytes: float, growth_bytes: float = 0.0, lru_extra_bytes: float = 0.0,
                 multi_pte: bool = False, flush_interval_s: float | None = None) -> None:  # fmt: skip
        if len(chunk_bytes) != len(chunk_group):
            raise ValueError(
                f'"chunk_bytes" ({len(chunk_bytes)}) and "chunk_group" ({len(chunk_group)}) differ in length'
            )
        if capacity_bytes < 0 or growth_bytes < 0 or lru_extra_bytes < 0:
            raise ValueError('"capacity_bytes", "growth_bytes" and "lru_extra_bytes" must be >= 0')
        if any(b < 0 for b in chunk_bytes):
            raise ValueError('"chunk_bytes" must be >= 0')
        if any(not 0 <= g < n_groups for g in chunk_group):
            raise ValueError(f'"chunk_group" values must be in [0, {n_groups})')
        n = len(chunk_bytes)
        self.name = name
        self.size: list[int] = list(chunk_bytes)
        self.group: list[int] = list(chunk_group)
        self.capacity = float(capacity_bytes)
        self.growth_left = float(growth_bytes)
        self.lru_extra = float(lru_extra_bytes)
        self.multi_pte = multi_pte
        self.now = 0.0
        """Current time (seconds): chunks whose ``ready_at`` is later are locked (read in flight)."""
        self.used = 0.0
        self.mapped_bytes = float(sum(self.size))
        self.missing: list[int] = [0] * n_groups
        for g in self.group:
            self.missing[g] += 1
        self._lists: tuple[OrderedDict[int, None], OrderedDict[int, None]] = (OrderedDict(), OrderedDict())
        self._bytes = [0.0, 0.0]
        self._where = bytearray([255]) * n  # 255: not resident, else INACTIVE / ACTIVE
        self._young = bytearray(n)
        self._ref = bytearray(n)
        self._ws = bytearray(n)
        self._ready: list[float] = [NEVER] * n
        self._shadow: dict[int, tuple[float, int]] = {}
        self._age = 0.0  # nonresident_age, in bytes
        self._refault_act = 0.0  # WORKINGSET_ACTIVATE_FILE, in bytes
        self._snapshot = 0.0  # its value at the end of the previous reclaim
        self._carry_i = self._carry_a = 0.0
        self.flush_interval_s = flush_interval_s
        self._stale = (0.0, 0.0, 0.0)
        self._flushed_at = NEVER
        self._unused_prefetch: set[int] = set()
        # counters (PageCache's names first)
        self.evictions = 0
        self.evicted_bytes = 0.0
        self.inserted_bytes = 0.0
        self.peak_used = 0.0
        self.swapped_out_bytes = 0.0
        self.wasted_prefetch_bytes = 0.0
        self.refault_bytes = 0.0
        self.refault_activated_bytes = 0.0
        self.promoted_bytes = 0.0
        self.deactivated_bytes = 0.0
        self.rotated_bytes = 0.0
        self.failed_allocations = 0
        self.phase = ""
        """A label of what the device is doing (set by the caller); evictions are counted per label."""
        self.evicted_by_phase: dict[tuple[str, str], float] = {}

    # --- queries ---------------------------------------------------------------------------------------------
    def resident(self, chunk: int) -> bool:
        """Whether ``chunk`` is in the cache (its read may still be in flight: see :meth:`ready_at`)."""
        return self._where[chunk] != 255

    def ready_at(self, chunk: int) -> float:
        """When the read of a resident chunk completes (``-inf`` when it was inserted without a time)."""
        return self._ready[chunk]

    def set_ready(self, chunk: int, when: float) -> None:
        """Set when the read of a resident chunk completes (the chunk is locked until :attr:`now` reaches it)."""
        if self._where[chunk] != 255:
            self._ready[chunk] = when

    @property
    def can_evict(self) -> bool:
        """Whether anything could ever be evicted (False when every mapped byte fits)."""
        return self.mapped_bytes > self.capacity + self.growth_left

    @property
    def active_bytes(self) -> float:
        """Bytes on the active list."""
        return self._bytes[ACTIVE]

    @property
    def inactive_bytes(self) -> float:
        """Bytes on the inactive list."""
        return self._bytes[INACTIVE]

    def is_active(self, chunk: int) -> bool:
        """Whether a resident chunk is on the active list."""
        return self._where[chunk] == ACTIVE

    def lru_order(self) -> list[int]:
        """Resident chunks in the order reclaim would reach them if nothing were referenced: the inactive list
        from its tail, then the active list from its tail."""
        return list(self._lists[INACTIVE]) + list(self._lists[ACTIVE])

    def stats(self) -> dict[str, float]:
        """Counters and list sizes (bytes)."""
        return {
            "capacity_bytes": self.capacity,
            "used_bytes": self.used,
            "active_bytes": self._bytes[ACTIVE],
            "inactive_bytes": self._bytes[INACTIVE],
            "inserted_bytes": self.inserted_bytes,
            "evicted_bytes": self.evicted_bytes,
            "evictions": float(self.evictions),
            "refault_bytes": self.refault_bytes,
            "refault_activated_bytes": self.refault_activated_bytes,
            "promoted_bytes": self.promoted_bytes,
            "deactivated_bytes": self.deactivated_bytes,
            "rotated_bytes": self.rotated_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetch_bytes,
            "failed_allocations": float(self.failed_allocations),
            "shadow_entries": float(len(self._shadow)),
            "nonresident_age_bytes": self._age,
        }

    # --- accesses --------------------------------------------------------------------------------------------
    def touch(self, chunk: int) -> None:
        """An access through the mapping to a resident chunk: its PTE becomes young (no list movement: the
        kernel only looks at the bit when reclaim reaches the chunk). No effect if it is not resident."""
        if self._where[chunk] != 255:
            self._young[chunk] = 1
            if self._unused_prefetch:
                self._unused_prefetch.discard(chunk)

    def touch_all(self, chunks: Iterable[int]) -> None:
        """:meth:`touch` every chunk, in order."""
        where, young, unused = self._where, self._young, self._unused_prefetch
        for c in chunks:
            if where[c] != 255:
                young[c] = 1
                if unused:
                    unused.discard(c)

    def insert(
        self, chunk: int, prefetched: bool = False, ready_at: float | None = None, mapped: bool | None = None
    ) -> bool:
        """A chunk enters the cache: read on a fault (mapped and young at once), or by readahead or
        ``WILLNEED`` (``prefetched``: unmapped until touched). Room is made first.

        Args:
            chunk: the chunk.
            prefetched: read ahead of use (counts in ``wasted_prefetch_bytes`` if evicted untouched).
            ready_at: when its read completes (it is locked until :attr:`now` reaches it); None: at once.
            mapped: override: whether the access that brings it in maps it (default: not ``prefetched``).

        Returns:
            True if it is resident afterwards; False if it does not fit at all, or nothing could be reclaimed
            to make room (every other chunk is locked): the allocation fails as a ``__GFP_NORETRY``
            readahead allocation does.
        """
        if self._where[chunk] != 255:
            if mapped or (mapped is None and not prefetched):
                self._young[chunk] = 1
            return True
        size = self.size[chunk]
        if size > self.capacity + self.growth_left:
            if prefetched:
                self.wasted_prefetch_bytes += size
            self.inserted_bytes += size
            return False
        short = self.used + size - self.capacity
        if short > 0 and self.growth_left > 0:  # Android: swap other apps out before evicting
            grow = min(short, self.growth_left)
            self.capacity += grow
            self.growth_left -= grow
            self.swapped_out_bytes += grow
            short -= grow
        if short > 0 and not self._reclaim(short):
            self.failed_allocations += 1
            return False
        self.inserted_bytes += size
        lst = INACTIVE
        sh = self._shadow.pop(chunk, None)
        if sh is not None:
            self.refault_bytes += size
            if self._age - sh[0] <= self._stats()[1]:  # workingset_test_recent (no swap: active file only)
                lst = ACTIVE
                self._age += size
                self._refault_act += size
                self.refault_activated_bytes += size
            self._ws[chunk] = sh[1] if lst == ACTIVE else 0
        else:
            self._ws[chunk] = 0
        self._where[chunk] = lst
        self._lists[lst][chunk] = None
        self._bytes[lst] += size
        self._ref[chunk] = 0
        self._young[chunk] = 1 if (mapped if mapped is not None else not prefetched) else 0
        self._ready[chunk] = NEVER if ready_at is None else ready_at
        if prefetched:
            self._unused_prefetch.add(chunk)
        self.used += size
        self.missing[self.group[chunk]] -= 1
        if self.used > self.peak_used:
            self.peak_used = self.used
        return True

    def mark_accessed(self, chunk: int) -> None:
        """``folio_mark_accessed`` (a ``read()``, or ``get_user_pages`` with ``FOLL_TOUCH``): the first call sets
        ``PG_referenced``, the next one activates a chunk on the inactive list (and clears the bit)."""
        lst = self._where[chunk]
        if lst == 255:
            return
        if not self._ref[chunk]:
            self._ref[chunk] = 1
        elif lst == INACTIVE:
            self._move(chunk, ACTIVE)
            self._ref[chunk] = 0
            self._age += self.size[chunk]
            self.promoted_bytes += self.size[chunk]

    def populate(self, chunk: int) -> bool:
        """``MAP_POPULATE`` of a chunk (llama.cpp maps every model file so): it is faulted in (mapped, young)
        and ``get_user_pages`` touches each of its pages with ``FOLL_TOUCH``; a chunk made of large folios
        is touched at least twice per folio and so lands on the active list."""
        ok = self.insert(chunk)
        if ok:
            self.mark_accessed(chunk)
            self.mark_accessed(chunk)
        return ok

    def fill(self, chunks: Iterable[int]) -> None:
        """Load ``chunks`` in order as llama.cpp does (:meth:`populate` each); counters start from zero
        afterwards."""
        for c in chunks:
            self.populate(c)
        self.inserted_bytes = 0.0
        self.evictions = 0
        self.evicted_bytes = 0.0
        self.refault_bytes = self.refault_activated_bytes = self.promoted_bytes = 0.0
        self.deactivated_bytes = self.rotated_bytes = 0.0

    def drop(self, chunk: int) -> None:
        """Remove a chunk without a shadow (``drop_caches``, truncation)."""
        lst = self._where[chunk]
        if lst == 255:
            return
        del self._lists[lst][chunk]
        self._bytes[lst] -= self.size[chunk]
        self._where[chunk] = 255
        self.used -= self.size[chunk]
        self.missing[self.group[chunk]] += 1
        self._unused_prefetch.discard(chunk)

    # --- reclaim ---------------------------------------------------------------------------------------------
    def flush_stats(self) -> None:
        """The cgroup's statistics flush (rstat): list sizes and the refault-activation counter that reclaim's
        heuristics read (``lruvec_page_state``) take their current values. The kernel flushes every 2 s
        (``FLUSH_TIME``) and whenever someone reads ``memory.stat``; in between those heuristics see stale
        values (scan targets use the exact list sizes)."""
        self._stale = (self._bytes[INACTIVE], self._bytes[ACTIVE], self._refault_act)
        self._flushed_at = self.now

    def _stats(self) -> tuple[float, float, float]:
        """(inactive, active, refault activations) as the heuristics see them."""
        if self.flush_interval_s is None:
            return self._bytes[INACTIVE], self._bytes[ACTIVE], self._refault_act
        if self.now - self._flushed_at >= self.flush_interval_s:
            self.flush_stats()
        return self._stale

    def _move(self, c: int, to: int) -> None:
        frm = self._where[c]
        del self._lists[frm][c]
        s = self.size[c]
        self._bytes[frm] -= s
        self._bytes[to] += s
        self._where[c] = to
        self._lists[to][c] = None

    def _deactivate_tail(self) -> None:
        act = self._lists[ACTIVE]
        c = next(iter(act))
        self._young[c] = 0  # folio_referenced() clears the PTE young bits
        self._ws[c] = 1
        self._move(c, INACTIVE)
        self.deactivated_bytes += self.size[c]

    def _evict(self, c: int) -> None:
        s = self.size[c]
        del self._lists[INACTIVE][c]
        self._bytes[INACTIVE] -= s
        self._where[c] = 255
        self._shadow[c] = (self._age, self._ws[c])
        self._age += s
        self.used -= s
        self.missing[self.group[c]] += 1
        self.evictions += 1
        self.evicted_bytes += s
        kind = "used"
        if c in self._unused_prefetch:
            self._unused_prefetch.discard(c)
            self.wasted_prefetch_bytes += s
            kind = "unused prefetch"
        key = (self.phase, kind)
        self.evicted_by_phase[key] = self.evicted_by_phase.get(key, 0.0) + s

    def _scan_inactive_tail(self) -> float:
        """``shrink_folio_list`` on the inactive tail chunk; returns the bytes freed."""
        ina = self._lists[INACTIVE]
        c = next(iter(ina))
        s = self.size[c]
        if self._ready[c] > self.now:  # locked: its read is in flight (folio_trylock fails)
            ina.move_to_end(c)
            return 0.0
        if self._young[c]:
            self._young[c] = 0
            if self._ref[c] or self.multi_pte:  # referenced before, or by several mappings
                self._move(c, ACTIVE)
                self._age += s  # move_folios_to_lru ages the non-resident clock on activation
                self.promoted_bytes += s
            else:  # first reference seen: PG_referenced, one more trip round the inactive list
                self._ref[c] = 1
                ina.move_to_end(c)
                self.rotated_bytes += s
            return 0.0
        self._evict(c)
        return float(s)

    def _reclaim(self, need: float) -> bool:
        """Free ``need`` bytes: one ``try_to_free_mem_cgroup_pages``. From priority 12 down to 0 each list is
        scanned ``size >> priority`` more bytes (the active one only when deactivation is allowed), in turns,
        until enough is freed; when that fails without having deactivated, once more with deactivation forced.
        Fractions of a chunk carry over to the next call. Returns False when it could not free ``need``."""
        st_i, st_a, st_ref = self._stats()
        may = st_ref != self._snapshot or st_i * inactive_ratio(st_i + st_a + self.lru_extra) < st_a
        ina, act = self._lists
        freed = 0.0
        for deact in (True,) if may else (False, True):
            for prio in range(DEF_PRIORITY, -1, -1):
                self._carry_i = min(
                    self._carry_i + self._bytes[INACTIVE] / (1 << prio), self._bytes[INACTIVE]
                )
                if deact:
                    self._carry_a = min(
                        self._carry_a + self._bytes[ACTIVE] / (1 << prio), self._bytes[ACTIVE]
                    )
                while freed < need:
                    did = False
                    if ina and self._carry_i >= self.size[next(iter(ina))]:
                        self._carry_i -= self.size[next(iter(ina))]
                        freed += self._scan_inactive_tail()
                        did = True
                    if deact and act and self._carry_a >= self.size[next(iter(act))]:
                        self._carry_a -= self.size[next(iter(act))]
                        self._deactivate_tail()
                        did = True
                    if not did:
                        break
                if freed >= need:
                    break
            if freed >= need:
                break
            self._carry_i = self._carry_a = 0.0
        self._snapshot = st_ref
        return freed >= need

    # --- checks ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Internal invariants (used by tests).

        Raises:
            AssertionError: the bookkeeping is inconsistent.
        """
        ina, act = self._lists
        assert not (set(ina) & set(act)), "a chunk is on both lists"
        for lst, od in ((INACTIVE, ina), (ACTIVE, act)):
            assert abs(self._bytes[lst] - sum(self.size[c] for c in od)) < 1e-6, "list bytes disagree"
            assert all(self._where[c] == lst for c in od), "where[] disagrees with the lists"
        assert abs(self.used - self._bytes[0] - self._bytes[1]) < 1e-6, "used bytes disagree with the lists"
        assert self.used <= self.capacity + 1e-6, (
            f"{self.name}: {self.used} bytes resident over capacity {self.capacity}"
        )
        counts = [0] * len(self.missing)
        for c, g in enumerate(self.group):
            if self._where[c] == 255:
                counts[g] += 1
        assert counts == self.missing, "missing-chunk counts disagree with contents"
        assert not (set(self._shadow) & (set(ina) | set(act))), "a resident chunk has a shadow entry"


# =============================================================================================================
# replay: one device of a ring decoding its k windows, with a throttled disk
# =============================================================================================================
@dataclass
class Window:
    """One window of a device: its chunks in file order, and the order compute touches them.

    Args:
        chunks: chunk ids of the window's file, in file order (what ``WILLNEED`` walks).
        order: (chunk, bytes computed) in the order a decode step touches them (tensors in graph order).
    """

    chunks: list[int]
    order: list[tuple[int, int]]


@dataclass
class ReplayConfig:
    """How one device decodes (see :func:`replay`)."""

    disk_bps: float
    compute_bps: float
    gap_s: float
    prefetch: bool
    tokens: int = 8
    warmup: int = 3
    readahead_chunks: int = 1
    advise_bytes: int = 1280 << 10
    advise_s_per_byte: float = 0.2e-3 / (1 << 20)
    """CPU time of ``WILLNEED`` per byte it allocates (page allocation, charge, reclaim, bio submission):
    measured 0.14-0.25 ms per MiB, median 0.19 (benchmarks/bench_pagecache.py, ``advise_s``)."""
    advise_fail_s: float = 1e-3
    """CPU time of a ``WILLNEED`` call whose allocation fails (a reclaim pass that finds only locked pages)."""
    populate: bool = True
    own_window_again: bool = False
    preload: Sequence[int] = ()
    """Chunks already cached, unmapped, when the load starts (the interpreter's and libraries' files, which
    the cgroup charged before llama.cpp mapped anything)."""
    flush_times: Sequence[float] | None = None
    """Times (from the start of the load) at which the cgroup's statistics are flushed besides the kernel's
    periodic flush (the cache's ``flush_interval_s``): every read of ``memory.stat`` flushes them."""


@dataclass
class ReplayResult:
    """Per decode step: bytes read from disk and busy time (windows' compute plus waits); load bytes."""

    read_per_token: list[float] = field(default_factory=list)
    busy_per_token: list[float] = field(default_factory=list)
    load_read_bytes: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)
    lists_per_token: list[tuple[float, float]] = field(default_factory=list)
    """(active, inactive) bytes at the end of the load and of every step (kernel model only)."""

    def mean_read(self, warmup: int) -> float:
        """Mean bytes read per decode token after ``warmup`` tokens."""
        xs = self.read_per_token[warmup:]
        return sum(xs) / len(xs) if xs else 0.0

    def median_busy(self, warmup: int) -> float:
        """Median busy seconds per decode token after ``warmup`` tokens."""
        xs = sorted(self.busy_per_token[warmup:])
        return xs[len(xs) // 2] if xs else 0.0


class _Disk:
    """A FIFO disk at a fixed rate (a blkio-throttled device): completion times are known at submission."""

    def __init__(self, bps: float) -> None:
        self.bps = bps
        self.free_at = 0.0
        self.read_bytes = 0.0

    def submit(self, now: float, nbytes: float) -> float:
        start = max(now, self.free_at)
        self.free_at = start + nbytes / self.bps
        self.read_bytes += nbytes
        return self.free_at


def replay(cache: KernelCache | PageCache, windows: Sequence[Window], cfg: ReplayConfig,
           next_in_file: Sequence[int] | None = None) -> ReplayResult:  # fmt: skip
    """Decode ``cfg.warmup + cfg.tokens`` steps on one device: every step runs its windows in order; after each
    window the next own window is advised (``WILLNEED``) when ``cfg.prefetch`` (the executor's rule: not the
    only window once it has run, unless ``own_window_again``), then the device idles ``gap_s`` (the other
    devices' work). Works on :class:`KernelCache` and on the LRU :class:`~prima_sim.sim.pagecache.PageCache`.

    Faults read the chunk and, as sequential readahead does, the next ``readahead_chunks`` chunks of the file
    (``next_in_file``); compute waits for a chunk whose read is in flight. ``WILLNEED`` allocates the window's
    missing chunks at once, in calls of ``advise_bytes``, each read in turn by the disk.
    """
    kc = cache if isinstance(cache, KernelCache) else None
    lru = cache if isinstance(cache, PageCache) else None
    disk = _Disk(cfg.disk_bps)
    pending: dict[int, float] = {}  # LRU cache: completion time of reads not yet inserted
    lru_prefetched: set[int] = set()
    t = 0.0
    res = ReplayResult()
    nxt_file = list(next_in_file) if next_in_file is not None else []

    flushes = sorted(cfg.flush_times) if cfg.flush_times else []
    fi = 0

    def set_now(x: float) -> None:
        nonlocal fi
        if kc is not None:
            while fi < len(flushes) and flushes[fi] <= x:  # someone read memory.stat: the stats are flushed
                kc.now = max(kc.now, flushes[fi])
                kc.flush_stats()
                fi += 1
            kc.now = x

    def flush_lru(upto: float) -> None:
        if lru is None or not pending:
            return
        done = sorted((e, c) for c, e in pending.items() if e <= upto)
        for _end, c in done:
            del pending[c]
            lru.insert(c, prefetched=c in lru_prefetched)
            lru_prefetched.discard(c)

    def read(c: int, now: float, prefetched: bool, mapped: bool) -> float | None:
        """Submit a read of ``c`` (allocating it first in the kernel model); its completion time or None."""
        size = cache.size[c]
        if kc is not None:
            set_now(now)
            if not kc.insert(c, prefetched=prefetched, ready_at=float("inf"), mapped=mapped):
                return None
            end = disk.submit(now, size)
            kc.set_ready(c, end)
            return end
        if c in pending:
            return pending[c]
        end = disk.submit(now, size)
        pending[c] = end
        if prefetched:
            lru_prefetched.add(c)
        return end

    def is_resident(c: int) -> bool:
        return cache.resident(c) or (lru is not None and c in pending)

    def ready(c: int) -> float:
        if kc is not None:
            return kc.ready_at(c)
        return pending.get(c, NEVER)

    marks: set[int] = set()  # chunks brought by readahead: touching one reads further (PG_readahead)

    def readahead(c: int, now: float) -> None:
        x = c
        for _ in range(cfg.readahead_chunks):
            x = nxt_file[x] if nxt_file else -1
            if x < 0 or is_resident(x):
                return
            if read(x, now, True, False) is None:
                return
            marks.add(x)

    def phase(label: str) -> None:
        if kc is not None:
            kc.phase = label

    def run_window(w: Window, now: float) -> float:
        for c, nbytes in w.order:
            flush_lru(now)
            if not is_resident(c):
                end = read(c, now, False, True)
                if end is None:  # nothing reclaimable: the fault waits for the disk to drain, then reads
                    now = max(now, disk.free_at)
                    set_now(now)
                    end = read(c, now, False, True)
                    if end is None:
                        end = disk.submit(now, cache.size[c])
                readahead(c, now)
                now = max(now, end)
            else:
                if c in marks:  # asynchronous readahead: the stream goes on while this chunk is used
                    marks.discard(c)
                    readahead(c, now)
                r = ready(c)
                if r > now:
                    now = r
            flush_lru(now)
            set_now(now)
            if lru is not None and not lru.resident(c):
                lru.insert(c)
            cache.touch(c)
            now += nbytes / cfg.compute_bps
        return now

    def advise(w: Window, now: float) -> float:
        """The executor's advice loop: one ``WILLNEED`` call per ``advise_bytes``; returns when it ends. Each
        call allocates (and charges, reclaiming as needed) the missing pages of its range and queues their
        reads; the loop costs CPU time, during which earlier reads complete."""
        per_call = max(1, cfg.advise_bytes)
        call_bytes = 0.0
        failed = False
        for c in w.chunks:
            if call_bytes >= per_call:
                call_bytes, failed = 0.0, False
            size = cache.size[c]
            call_bytes += size
            if failed or is_resident(c):
                continue
            flush_lru(now)
            if read(c, now, True, False) is None:
                failed = True  # this call's readahead stops (__GFP_NORETRY); the next call tries again
                now += cfg.advise_fail_s
            else:
                now += size * cfg.advise_s_per_byte
        return now

    for c in cfg.preload:
        if kc is not None:
            kc.insert(c, mapped=False)
        elif lru is not None:
            lru.insert(c)
    # load: each window's file populated in order (MAP_POPULATE faults every page, sequentially)
    phase("load")
    if cfg.populate:
        for w in windows:
            for c in w.chunks:
                flush_lru(t)
                if not is_resident(c):
                    end = read(c, t, False, True)
                    if end is None:
                        continue
                    t = max(t, end)
                set_now(t)
                flush_lru(t)
                if lru is not None and not lru.resident(c):
                    lru.insert(c)
                cache.touch(c)
                if kc is not None:  # MAP_POPULATE's FOLL_TOUCH: every page of the folio marked accessed
                    kc.mark_accessed(c)
                    kc.mark_accessed(c)
    res.load_read_bytes = disk.read_bytes
    if kc is not None:
        res.lists_per_token.append((kc.active_bytes, kc.inactive_bytes))
    n = len(windows)
    for _step in range(cfg.warmup + cfg.tokens):
        r0, busy = disk.read_bytes, 0.0
        for j, w in enumerate(windows):
            t0 = t
            phase(f"compute w{j}")
            t = run_window(w, t)
            # the executor's rule: a device with one window does not advise it again (prima_sim.plan)
            nxt = (j + 1) % n if cfg.prefetch and (n > 1 or cfg.own_window_again) else None
            if nxt is not None:
                set_now(t)
                phase(f"advise w{nxt}")
                t = advise(windows[nxt], t)
            busy += t - t0
            t += cfg.gap_s
        res.read_per_token.append(disk.read_bytes - r0)
        res.busy_per_token.append(busy)
        if kc is not None:
            res.lists_per_token.append((kc.active_bytes, kc.inactive_bytes))
    flush_lru(float("inf"))
    if kc is not None:
        res.stats = kc.stats()
    return res


def cyclic_windows(
    window_bytes: Sequence[int], chunk_bytes: int
) -> tuple[list[int], list[int], list[Window], list[int]]:
    """Chunks for windows of the given sizes, each touched in file order: (sizes, groups, windows, next_in_file)."""
    sizes: list[int] = []
    groups: list[int] = []
    wins: list[Window] = []
    nxt: list[int] = []
    for g, wb in enumerate(window_bytes):
        ids = []
        left = int(wb)
        while left > 0:
            s = min(chunk_bytes, left)
            ids.append(len(sizes))
            sizes.append(s)
            groups.append(g)
            left -= s
        nxt += [*ids[1:], -1] if ids else []
        wins.append(Window(ids, [(c, sizes[c]) for c in ids]))
    return sizes, groups, wins, nxt


def replay_cyclic(window_bytes: Sequence[int], cache_bytes: float, cfg: ReplayConfig, chunk_bytes: int = 1 << 20,
                  lru_extra_bytes: float = 0.0, flush_interval_s: float | None = 0.1) -> ReplayResult:  # fmt: skip
    """:func:`replay` of windows of the given sizes, each scanned in file order, in a cache of ``cache_bytes``."""
    sizes, groups, wins, nxt = cyclic_windows(window_bytes, chunk_bytes)
    cache = KernelCache(
        "replay",
        sizes,
        groups,
        len(window_bytes),
        cache_bytes,
        lru_extra_bytes=lru_extra_bytes,
        flush_interval_s=flush_interval_s,
    )
    return replay(cache, wins, cfg, nxt)
