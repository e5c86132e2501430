"""The page cache of one device: clean, file-backed weight chunks under LRU replacement.

llama.cpp maps the model file; weights are read on first touch and stay in the kernel's page cache as clean
pages that can be dropped at any time and read again from disk. The cache here holds *chunks* (see
:class:`~prima_sim.sim.layout.DeviceLayout`) up to a capacity in bytes: the device's RAM budget minus the
memory the run pins (KV cache, compute buffers), exactly the room the cost model gives weights. When a chunk
arrives and there is no room, least recently used chunks are evicted (they are clean: nothing is written).

Android first makes room by swapping other apps out (up to ``growth_bytes``, the cost model's
``min(swappable, swap available)``), and only then evicts: the capacity grows and the swapped-out bytes are
recorded (they are memory the run took from other apps).

Every chunk belongs to a *group* (one window of the device, or the head's output head); the cache keeps the
number of missing chunks per group so that "is this window fully resident?" costs one lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class PageCache:
    """LRU cache of weight chunks with a capacity in bytes.

    Args:
        name: device name (for messages).
        chunk_bytes: size of every chunk, by chunk id.
        chunk_group: group of every chunk, by chunk id (0 .. n_groups-1).
        n_groups: number of groups.
        capacity_bytes: room for weights (may be 0: every chunk is then read and dropped at once).
        growth_bytes: extra room the OS can make by swapping other apps out before it evicts (Android).

    Raises:
        ValueError: sizes and groups disagree, or a size or the capacity is negative.
    """

    def __init__(self, name: str, chunk_bytes: Sequence[int], chunk_group: Sequence[int], n_groups: int,
                 capacity_bytes: float, growth_bytes: float = 0.0, protected_bytes: float = 0.0) -> None:  # fmt: skip
        if len(chunk_bytes) != len(chunk_group):
            raise ValueError(
                f'"chunk_bytes" ({len(chunk_bytes)}) and "chunk_group" ({len(chunk_group)}) differ in length'
            )
        if capacity_bytes < 0 or growth_bytes < 0 or protected_bytes < 0:
            raise ValueError('"capacity_bytes", "growth_bytes" and "protected_bytes" must be >= 0')
        if any(b < 0 for b in chunk_bytes):
            raise ValueError('"chunk_bytes" must be >= 0')
        if any(not 0 <= g < n_groups for g in chunk_group):
            raise ValueError(f'"chunk_group" values must be in [0, {n_groups})')
        self.name = name
        self.size: list[int] = list(chunk_bytes)
        self.group: list[int] = list(chunk_group)
        self.capacity = float(capacity_bytes)
        self.growth_left = float(growth_bytes)
        self.used = 0.0
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.protected_target = float(protected_bytes)
        self._protected: set[int] = set()
        self.protected_bytes = 0.0
        self.missing: list[int] = [0] * n_groups
        for g in self.group:
            self.missing[g] += 1
        self.mapped_bytes = float(sum(self.size))
        self.evictions = 0
        self.evicted_bytes = 0.0
        self.swapped_out_bytes = 0.0
        self.peak_used = 0.0
        self.inserted_bytes = 0.0
        self._unused_prefetch: set[int] = set()
        self.wasted_prefetch_bytes = 0.0
        self.spared: frozenset[int] = frozenset()
        """The window a device runs first after a warm start (docs/sim.md, "first pass"): when reclaim's least
        recently used chunk is one of these, every second time it takes the least recently used chunk outside them
        instead (if any); empty: plain LRU."""
        self._spared_met = 0  # how often reclaim's least recently used chunk was a spared one

    # --- queries ---------------------------------------------------------------------------------------------
    def resident(self, chunk: int) -> bool:
        """Whether ``chunk`` is in the cache."""
        return chunk in self._lru or chunk in self._protected

    @property
    def can_evict(self) -> bool:
        """Whether anything could ever be evicted (False when every mapped byte fits)."""
        return self.mapped_bytes > self.capacity + self.growth_left

    def lru_order(self) -> list[int]:
        """Resident chunks that can be evicted, least recently used first."""
        return list(self._lru)

    # --- updates ---------------------------------------------------------------------------------------------
    def touch(self, chunk: int) -> None:
        """Mark a resident chunk as just used (no effect if it is not resident)."""
        if chunk in self._lru:
            self._lru.move_to_end(chunk)
            if self._unused_prefetch:
                self._unused_prefetch.discard(chunk)

    def touch_all(self, chunks: Iterable[int]) -> None:
        """:meth:`touch` every chunk, in order."""
        lru, unused = self._lru, self._unused_prefetch
        for c in chunks:
            if c in lru:
                lru.move_to_end(c)
                if unused:
                    unused.discard(c)

    def insert(self, chunk: int, prefetched: bool = False) -> bool:
        """Put a chunk just read from disk in the cache as most recently used, making room first.

        A ``prefetched`` chunk evicted before anything touches it counts in ``wasted_prefetch_bytes`` (the
        prefetch-release conflict made visible).

        Returns:
            True if it stays resident; False if it is larger than the whole cache (read, used, dropped).
        """
        if chunk in self._lru:
            self._lru.move_to_end(chunk)
            return True
        if chunk in self._protected:
            return True
        size = self.size[chunk]
        self.inserted_bytes += size
        if size > self.capacity + self.growth_left:
            if prefetched:
                self.wasted_prefetch_bytes += size
            return False
        short = self.used + size - self.capacity
        if short > 0 and self.growth_left > 0:  # Android: swap other apps out before evicting
            grow = min(short, self.growth_left)
            self.capacity += grow
            self.growth_left -= grow
            self.swapped_out_bytes += grow
        lru = self._lru
        spared = self.spared
        while self.used + size > self.capacity and lru:
            victim = next(iter(lru))
            if spared and victim in spared:
                self._spared_met += 1
                if self._spared_met % 2 == 0:  # the least recently used chunk that is not spared, if any
                    victim = next((c for c in lru if c not in spared), victim)
            del lru[victim]
            vsize = self.size[victim]
            self.used -= vsize
            self.missing[self.group[victim]] += 1
            self.evictions += 1
            self.evicted_bytes += vsize
            if victim in self._unused_prefetch:
                self._unused_prefetch.discard(victim)
                self.wasted_prefetch_bytes += vsize
        lru[chunk] = None
        if prefetched:
            self._unused_prefetch.add(chunk)
        self.used += size
        self.missing[self.group[chunk]] -= 1
        if self.used > self.peak_used:
            self.peak_used = self.used
        return True

    def release(self, chunks: Iterable[int]) -> None:
        """Drop resident ``chunks`` on the device's own request (drop-behind streaming: ``MADV_DONTNEED`` and
        ``POSIX_FADV_DONTNEED``); not evictions."""
        lru = self._lru
        for c in chunks:
            if c in lru:
                del lru[c]
                self.used -= self.size[c]
                self.missing[self.group[c]] += 1
                self._unused_prefetch.discard(c)

    def fill(self, chunks: Iterable[int]) -> None:
        """Read ``chunks`` in order as a load does (warm start); what does not fit pushes out what came first.

        Then the most recently loaded ``protected_bytes`` stay resident for good: Linux's frozen active list
        (llama.cpp's populating load activates every page; the first decode token deactivates the active list
        from its oldest end down to a share it then keeps: docs/pagecache.md,
        :func:`prima_sim.devices.behaviour.frozen_active_bytes`).
        """
        for c in chunks:
            self.insert(c)
        for c in reversed(list(self._lru)):
            if self.protected_bytes + self.size[c] > self.protected_target:
                break
            del self._lru[c]
            self._protected.add(c)
            self.protected_bytes += self.size[c]
        self.inserted_bytes = 0.0
        self.evictions = 0
        self.evicted_bytes = 0.0

    def check(self) -> None:
        """Internal invariants (used by tests).

        Raises:
            AssertionError: the bookkeeping is inconsistent.
        """
        assert abs(self.used - sum(self.size[c] for c in (*self._lru, *self._protected))) < 1e-6, (
            "used bytes disagree with contents"
        )
        assert self.used <= self.capacity + 1e-6, (
            f"{self.name}: {self.used} bytes resident over capacity {self.capacity}"
        )
        counts = [0] * len(self.missing)
        for c, g in enumerate(self.group):
            if not self.resident(c):
                counts[g] += 1
        assert counts == self.missing, "missing-chunk counts disagree with contents"
