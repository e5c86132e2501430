"""Unit tests of the simulator's components: page cache, disk, links and the shared medium, layout, jitter."""

from __future__ import annotations

import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import LinkSpec
from prima_sim.halda.costmodel import ACTIVATION_BYTES_PER_ELEMENT, HEADER_BYTES, hop_time
from prima_sim.plan import make_assignments
from prima_sim.sim.config import Jitter, SimConfig, component_rng
from prima_sim.sim.disk import CANCELLED, DONE, Disk, Read
from prima_sim.sim.layout import OUT, build_layout, split_bytes
from prima_sim.sim.network import Link, Medium, Network, water_fill
from prima_sim.sim.pagecache import PageCache
from prima_sim.sim.toy import toy_cluster, toy_device, toy_gpu


# --- page cache -----------------------------------------------------------------------------------------------
def cache(sizes, capacity, groups=None, growth=0.0) -> PageCache:
    groups = groups or [0] * len(sizes)
    return PageCache("d", sizes, groups, max(groups) + 1, capacity, growth)


def test_lru_evicts_least_recently_used_first():
    c = cache([10] * 5, 30)
    for i in (0, 1, 2):
        assert c.insert(i)
    c.touch(0)  # 1 is now the least recently used
    c.insert(3)
    assert c.lru_order() == [2, 0, 3]
    assert not c.resident(1)
    assert c.evictions == 1 and c.evicted_bytes == 10
    c.check()


def test_a_spared_window_gives_up_every_second_victim_to_the_other_chunks():
    """The first pass after a warm start (docs/sim.md): the window's chunks 2..5 are the least recently used (the
    load read them first), chunks 0, 1, 10, 11 the other window's. For four reads a plain LRU evicts 2, 3, 4, 5
    (the cascade), a window spared for good 0, 1, 10, 11; reclaim takes the window's own chunk and the other
    window's in turn: 2, 0, 3, 1."""
    c = cache([10] * 12, 80)
    c.fill([2, 3, 4, 5, 0, 1, 10, 11])
    c.spared = frozenset({2, 3, 4, 5})
    for new in (6, 7, 8, 9):
        c.insert(new)
    assert [i for i in (0, 1, 2, 3, 4, 5, 10, 11) if not c.resident(i)] == [0, 1, 2, 3]
    c.spared = frozenset()
    c.check()


def test_chunk_larger_than_cache_is_read_and_dropped():
    c = cache([10, 50], 30)
    c.insert(0)
    assert c.insert(1) is False
    assert c.resident(0) and not c.resident(1), "a transient chunk must not evict what it cannot replace"
    c.check()


def test_missing_counts_follow_residency_per_group():
    c = cache([10, 10, 10, 10], 20, groups=[0, 0, 1, 1])
    assert c.missing == [2, 2]
    c.insert(0)
    c.insert(1)
    assert c.missing == [0, 2]
    c.insert(2)  # evicts 0
    assert c.missing == [1, 1]
    c.check()


def test_fill_keeps_the_last_loaded_bytes_like_a_load_through_lru():
    c = cache([10] * 6, 30)
    c.fill(range(6))
    assert c.lru_order() == [3, 4, 5]
    assert c.evictions == 0, "warm-up evictions are not counted as run evictions"


def test_android_swaps_other_apps_out_before_evicting():
    c = cache([10] * 4, 20, growth=15)
    for i in range(3):
        c.insert(i)
    assert c.swapped_out_bytes == 10 and c.evictions == 0 and c.capacity == 30
    c.insert(3)  # 5 bytes of growth left, then evict
    assert c.swapped_out_bytes == 15 and c.capacity == 35
    assert c.evictions == 1 and not c.resident(0)
    c.check()


def test_can_evict_only_when_mapped_bytes_exceed_room():
    assert not cache([10, 10], 20).can_evict
    assert cache([10, 10], 19).can_evict
    assert not cache([10, 10], 15, growth=5).can_evict


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_bytes": [1, 2], "chunk_group": [0]}, "differ in length"),
        ({"capacity_bytes": -1}, "must be >= 0"),
        ({"chunk_bytes": [-1], "chunk_group": [0]}, '"chunk_bytes" must be >= 0'),
        ({"chunk_group": [3]}, r"must be in \[0, 1\)"),
    ],
)
def test_page_cache_rejects_bad_arguments(kwargs, match):
    args = {"name": "d", "chunk_bytes": [1], "chunk_group": [0], "n_groups": 1, "capacity_bytes": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        PageCache(**args)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    capacity=st.integers(0, 120),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11)), max_size=60),
)
def test_page_cache_matches_a_reference_lru(sizes, capacity, ops):
    c = cache(sizes, capacity)
    ref: list[int] = []  # least recently used first
    for is_insert, raw in ops:
        i = raw % len(sizes)
        if is_insert:
            stays = c.insert(i)
            if i in ref:
                ref.remove(i)
                ref.append(i)
                assert stays
            elif sizes[i] > capacity:
                assert not stays
            else:
                while sum(sizes[j] for j in ref) + sizes[i] > capacity:
                    ref.pop(0)
                ref.append(i)
        else:
            c.touch(i)
            if i in ref:
                ref.remove(i)
                ref.append(i)
        assert c.lru_order() == ref
        c.check()


# --- disk -----------------------------------------------------------------------------------------------------
def run_disk(reads_at: list[tuple[float, Read]], skip: set[int] = frozenset()):
    env = simpy.Environment()
    log: list[tuple[float, int, int]] = []
    disk = Disk(env, "d", lambda r: r.chunk not in skip, lambda r: log.append((env.now, r.chunk, r.state)))

    def feeder():
        t = 0.0
        for at, r in reads_at:
            if at > t:
                yield env.timeout(at - t)
                t = at
            disk.submit(r)

    env.process(feeder())
    env.run()
    return disk, log


def test_disk_serves_one_read_at_a_time_at_its_bandwidth():
    disk, log = run_disk([(0.0, Read(i, 100.0, 100.0)) for i in range(3)])
    assert [(t, c) for t, c, _ in log] == [(1.0, 0), (2.0, 1), (3.0, 2)]
    assert disk.busy_s == pytest.approx(3.0) and disk.bytes_read == 300


def test_demand_reads_overtake_queued_prefetch_but_never_interrupt_one_in_service():
    reads = [(0.0, Read(i, 100.0, 100.0, prefetch=True)) for i in range(3)]
    reads.append((0.5, Read(9, 100.0, 100.0)))  # a fault while prefetch chunk 0 is being read
    _, log = run_disk(reads)
    assert [c for _, c, _ in log] == [0, 9, 1, 2]
    assert log[1][0] == pytest.approx(2.0), "the fault waits for the read in service, then goes first"


def test_skipped_and_cancelled_reads_cost_nothing():
    env = simpy.Environment()
    done: list[tuple[float, int, int]] = []
    disk = Disk(env, "d", lambda r: r.chunk != 1, lambda r: done.append((env.now, r.chunk, r.state)))
    rs = [disk.submit(Read(i, 100.0, 100.0, prefetch=True)) for i in range(4)]
    disk.cancel(rs[2])
    env.run()
    assert [(c, s) for _, c, s in done] == [(0, DONE), (1, CANCELLED), (3, DONE)]
    assert done[-1][0] == pytest.approx(2.0)
    assert rs[2].state == CANCELLED and rs[2].wait(env).triggered


def test_read_rejects_bad_arguments():
    with pytest.raises(ValueError, match='"bps" > 0'):
        Read(0, 10.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 1000), st.booleans()), min_size=1, max_size=20))
def test_disk_is_work_conserving_and_fifo_within_a_kind(items):
    reads_at = sorted(((at, Read(i, float(n), 100.0, prefetch=pf)) for i, (at, n, pf) in enumerate(items)),
                      key=lambda x: x[0])  # fmt: skip
    disk, log = run_disk(reads_at)
    assert disk.bytes_read == sum(r.nbytes for _, r in reads_at)
    order = [c for _, c, _ in log]
    for kind in (True, False):
        ids = [r.chunk for _, r in reads_at if r.prefetch is kind]
        assert [c for c in order if c in ids] == ids, "reads of one kind are served first come, first served"
    # never idle while work is queued: any work-conserving server ends its last read at this makespan
    t = 0.0
    for at, r in reads_at:
        t = max(t, at) + r.nbytes / 100.0
    assert log[-1][0] == pytest.approx(t)


# --- network --------------------------------------------------------------------------------------------------
def test_a_dedicated_link_costs_the_cost_models_hop_time():
    c = toy_cluster([toy_device("a"), toy_device("b")], bandwidth_bps=50e6, latency_s=0.004)
    env = simpy.Environment()
    net = Network(env, c)
    arrived: list[float] = []
    n_embd = 4096
    nbytes = ACTIVATION_BYTES_PER_ELEMENT * n_embd + HEADER_BYTES

    def go():
        yield from net.send("a", "b", nbytes, lambda _sent: arrived.append(env.now))

    env.process(go())
    env.run()
    assert arrived == [pytest.approx(hop_time(c, "a", "b", n_embd), rel=1e-12)]


def test_concurrent_transfers_share_the_medium():
    env = simpy.Environment()
    m = Medium(env, "wifi", 100.0)
    ends: dict[str, float] = {}

    def flow(name: str, start: float, nbytes: float, cap: float):
        yield env.timeout(start)
        yield m.transfer(nbytes, cap)
        ends[name] = env.now

    env.process(flow("alone-rate", 0.0, 100.0, 100.0))
    env.process(flow("late", 0.5, 100.0, 100.0))
    env.run()
    # 0-0.5 s: one flow at 100 B/s (50 B left); then both at 50 B/s: the first ends at 1.5 s, the second
    # has 50 B left and finishes alone at 2.0 s
    assert ends["alone-rate"] == pytest.approx(1.5)
    assert ends["late"] == pytest.approx(2.0)
    assert m.max_concurrent == 2


def test_a_lone_transfer_runs_at_its_links_rate_not_the_mediums():
    env = simpy.Environment()
    m = Medium(env, "wifi", 1000.0)
    ev = m.transfer(100.0, 50.0)
    env.run()
    assert ev.triggered and env.now == pytest.approx(2.0)


def test_link_with_medium_uses_it():
    c = toy_cluster([toy_device("a"), toy_device("b"), toy_device("c")], bandwidth_bps=100.0, latency_s=0.0,
                    medium_bps=100.0)  # fmt: skip
    env = simpy.Environment()
    net = Network(env, c)
    got: dict[str, float] = {}

    def go(src, dst):
        yield from net.send(src, dst, 100.0, lambda _s: got.setdefault(f"{src}{dst}", env.now))

    env.process(go("a", "b"))
    env.process(go("b", "c"))
    env.run()
    assert got == {"ab": pytest.approx(2.0), "bc": pytest.approx(2.0)}
    assert isinstance(net.link("a", "b"), Link) and net.link("a", "b").medium is net.media["wifi"]


@settings(max_examples=80, deadline=None)
@given(st.floats(1, 1e9), st.lists(st.floats(1, 1e9), min_size=1, max_size=8))
def test_water_fill_is_max_min_fair(capacity, caps):
    rates = water_fill(capacity, caps)
    assert sum(rates) <= capacity * (1 + 1e-9)
    assert all(r <= c * (1 + 1e-9) for r, c in zip(rates, caps, strict=True))
    if sum(caps) <= capacity:
        assert rates == pytest.approx(caps)
    else:
        assert sum(rates) == pytest.approx(capacity)
        top = max(rates)
        assert all(
            r == pytest.approx(c) or r == pytest.approx(top) for r, c in zip(rates, caps, strict=True)
        ), "unsaturated flows share equally"


def test_medium_rejects_bad_capacity():
    with pytest.raises(ValueError, match='"capacity_bps" must be > 0'):
        Medium(simpy.Environment(), "m", 0.0)


# --- layout -----------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(st.integers(0, 10**10), st.integers(2**16, 10**9))
def test_split_bytes_covers_the_range_with_equal_pieces(total, chunk):
    pieces = split_bytes(total, chunk)
    assert sum(pieces) == total
    assert all(0 < p <= chunk for p in pieces)
    if pieces:
        assert max(pieces) - min(pieces) <= 1


@pytest.fixture(scope="module")
def m8():
    return catalog_model("llama3-8b")


def test_layout_cpu_layers_are_chunked_gpu_layers_are_not(m8):
    dev = toy_device("g", gpu=toy_gpu("cuda"))
    (a,) = make_assignments(["g"], [32], [8], 32)
    lay = build_layout(a, dev, m8, {(0, 32): 0}, is_head=True, chunk_bytes=64 * 2**20)
    w = lay.works[0]
    cpu_bytes = sum(m8.layer_bytes[i] for i in range(24))
    assert sum(lay.chunk_bytes[c] for c in w.chunks) == cpu_bytes
    assert [on_gpu for _, on_gpu in w.slots] == [False] * 24 + [True] * 8, (
        "the last gpu_layers of the window run on the GPU"
    )
    assert w.gpu_copies
    out = lay.works[OUT]
    assert sum(lay.chunk_bytes[c] for c in out.chunks) == m8.output_bytes
    assert w.prefetch_chunks[-len(out.chunks) :] == out.chunks, (
        "the head's last window advises the output head too"
    )
    assert lay.load_order == w.chunks + out.chunks


def test_layout_metal_windows_are_whole_buffers(m8):
    dev = toy_device("mac", os="macos", unified_memory=True, gpu=toy_gpu("metal"))
    (a,) = make_assignments(["mac"], [16], [4], 32)
    lay = build_layout(a, dev, m8, {(0, 16): 0, (16, 32): 1}, is_head=False, chunk_bytes=64 * 2**20)
    assert [len(w.chunks) for w in lay.works.values()] == [1, 1]
    assert lay.chunk_bytes[lay.works[1].chunks[0]] == sum(m8.layer_bytes[16:32])


# --- randomness -------------------------------------------------------------------------------------------------
def test_component_streams_depend_only_on_seed_and_name():
    a = component_rng(3, "D1/cpu").random(4)
    assert (a == component_rng(3, "D1/cpu").random(4)).all()
    assert not (a == component_rng(3, "D2/cpu").random(4)).all()
    assert not (a == component_rng(4, "D1/cpu").random(4)).all()


def test_jitter_is_exactly_one_when_off_and_has_mean_one_when_on():
    assert Jitter(0.0, component_rng(0, "x")).factor() == 1.0
    j = Jitter(0.2, component_rng(0, "x"))
    xs = [j.factor() for _ in range(4000)]
    assert min(xs) > 0 and math.isclose(sum(xs) / len(xs), 1.0, rel_tol=0.02)


@pytest.mark.parametrize(("kwargs", "match"), [({"jitter": 2.0}, "jitter"), ({"chunk_bytes": 10}, "chunk_bytes"),
                                                ({"seed": -1}, "seed")])  # fmt: skip
def test_sim_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimConfig(**kwargs)


def test_link_spec_latency_jitter_is_per_link():
    env = simpy.Environment()
    spec = LinkSpec(bandwidth_bps=1e6, latency_s=0.01)
    lk = Link(env, "a", "b", spec, None, Jitter(0.3, component_rng(1, "link a<->b")))
    vals = {lk.propagation_s() for _ in range(5)}
    assert len(vals) == 5 and all(v > 0 for v in vals)
