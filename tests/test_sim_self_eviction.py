"""The reads a prefetching device's own advice makes it repeat (prima_sim/sim/self_eviction.py)."""

from __future__ import annotations

import pytest

from prima_sim.sim.self_eviction import _replay_read, self_eviction_bytes

MiB = 1 << 20
# the head of the emulation's three-rounds k3-2,1,1 plan: two 2-layer windows and one with the output head,
# 79 MiB of page cache, a 249 MB/s disk; measured 358 MiB read per token for 275 MiB of windows
HEAD = {"window_bytes": [65 * MiB, 65 * MiB, 144 * MiB], "room": 79 * MiB, "disk_bps": 249e6,
        "compute_s": 0.06, "gap_s": 0.02}  # fmt: skip


def test_a_window_larger_than_the_room_is_read_again_as_measured():
    extra = self_eviction_bytes(**HEAD)
    mapped = sum(HEAD["window_bytes"])
    assert 60 * MiB < extra < 120 * MiB  # measured: 358 - 275 = 83 MiB
    assert mapped + extra == pytest.approx(358 * MiB, rel=0.1)


@pytest.mark.parametrize(
    "change",
    [
        {"room": 150 * MiB},  # every window fits its room: the LRU's one pass stands
        {"window_bytes": [274 * MiB]},  # one window: the executor never advises it again
        {"disk_bps": 0.0},  # no disk
    ],
)
def test_nothing_to_add_where_the_lru_already_holds(change):
    assert self_eviction_bytes(**{**HEAD, **change}) == 0.0


def test_the_replay_is_cached():
    self_eviction_bytes(**HEAD)
    hits = _replay_read.cache_info().hits
    self_eviction_bytes(**HEAD)
    assert _replay_read.cache_info().hits == hits + 3  # one per room of the spread
