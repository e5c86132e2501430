"""The simulator's mechanisms on toy clusters: prefetch and its conflict, LRU under a cyclic scan, the OS
behaviours (Metal, macOS, Android, CUDA), the KV cache growing, cold and warm starts, memory pressure. The plans
leave every window to the page cache (``stream=False``); drop-behind streaming is tested in test_stream.py."""

from __future__ import annotations

import itertools

import pytest

from prima_sim.devices.catalog import catalog_model
from prima_sim.devices.cluster import Cluster
from prima_sim.devices.profile import DeviceProfile
from prima_sim.halda.costmodel import DeviceCosts, memory_use, predict
from prima_sim.halda.planner import manual_plan
from prima_sim.sim import SimConfig, SimResult, simulate
from prima_sim.sim.toy import toy_cluster, toy_device, toy_gpu
from prima_sim.workload import Workload

WL = Workload(n_ctx=256, prompt_tokens=8, decode_tokens=6, n_ubatch=512)


@pytest.fixture(scope="module")
def m8():
    return catalog_model("llama3-8b")


def with_room(
    cluster: Cluster, model, windows, gpu, name: str, room_bytes: float, wl: Workload = WL
) -> Cluster:
    """The cluster with ``name``'s available RAM set so its page cache has exactly ``room_bytes`` for weights."""
    plan = manual_plan(cluster, model, wl, windows, gpu, stream=False)
    a = plan.device(name)
    d = cluster.device(name)
    use = memory_use(DeviceCosts(d, model, wl), a, name == plan.head)
    pinned = use.pinned_ram  # on Metal the GPU's KV cache and buffers included: its memory is this RAM
    upd: dict = {"ram_available_bytes": int(pinned + room_bytes)}
    if d.is_metal:
        upd["gpu"] = d.gpu.model_copy(update={"vram_free_bytes": int(pinned + room_bytes)})
    devices = tuple(dd.model_copy(update=upd) if dd.name == name else dd for dd in cluster.devices)
    return cluster.model_copy(update={"devices": devices})


def decode_rows(res: SimResult, device: str):
    return [r for r in res.rows if r.device == device and r.phase == "decode"]


def per_token(res: SimResult, device: str, col: str) -> float:
    rows = decode_rows(res, device)
    return sum(getattr(r, col) for r in rows) / len(rows)


# --- prefetch ---------------------------------------------------------------------------------------------------
def prefetch_toy(m8, windows):
    """Head H (fast disk, plenty of RAM, slow memory so its windows take long) and worker B with room for 3.5
    layers, every layer the same size."""
    h = toy_device("H", memory_bandwidth_bps=2e9, ram_total_bytes=64 * 2**30)
    b = toy_device("B", disk_seq_read_bps=2e9)
    c = toy_cluster([h, b])
    return with_room(c, m8, windows, None, "B", 3.5 * m8.layer_bytes[0])


def test_one_round_does_not_prefetch_the_window_it_runs_again(m8):
    """k = 1: B's window (6 layers) is larger than its cache (3.5). prima.cpp would advise that same window
    after sending and read every byte twice (paper Fig. 3); the executor and the simulator skip advice on a
    device's only window once it has run (exec.ring.Route.prefetch_window): same reads, same TPOT."""
    c = prefetch_toy(m8, [26, 6])
    plan = manual_plan(c, m8, WL, [26, 6], stream=False)
    assert plan.k == 1
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    on = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    window = sum(m8.layer_bytes[0:6])
    assert per_token(off, "B", "disk_read_bytes") == pytest.approx(window, rel=0.01)
    assert per_token(on, "B", "disk_read_bytes") == pytest.approx(window, rel=0.01)
    assert on.tpot_s == pytest.approx(off.tpot_s, rel=1e-9)
    assert on.device_stats["B"]["disk_prefetch_bytes"] == 0


def test_prima_cpp_prefetch_conflict_with_one_round(m8):
    """The same k = 1 plan prefetching as prima.cpp does (``prefetch_own_window``): the advice reads the whole
    window while H computes, ends with its last layers resident, and B's compute faults on every layer anyway
    (paper Fig. 3): every byte is read twice and TPOT does not improve."""
    c = prefetch_toy(m8, [26, 6])
    plan = manual_plan(c, m8, WL, [26, 6], stream=False)
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    on = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True, prefetch_own_window=True))
    window = sum(m8.layer_bytes[0:6])
    assert per_token(on, "B", "disk_read_bytes") == pytest.approx(2 * window, rel=0.01)
    assert on.tpot_s == pytest.approx(off.tpot_s, rel=0.02)
    steps = WL.decode_tokens + 1
    assert on.device_stats["B"]["wasted_prefetch_bytes"] / steps == pytest.approx(window, rel=0.2), (
        "all of it wasted"
    )
    assert any("prefetch-release conflict" in line for line in on.differences())


def test_prefetch_release_conflict_with_windows_larger_than_the_cache(m8):
    """k = 2 with B's two windows of 6 layers each, room for 3.5: the prefetch reads the whole next window
    while H computes, ends with its last layers resident, and B's compute faults on every layer anyway
    (paper Fig. 3): every byte is read twice and TPOT does not improve."""
    c = prefetch_toy(m8, [10, 6])
    plan = manual_plan(c, m8, WL, [10, 6], stream=False)
    assert plan.k == 2
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    on = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    both = 2 * sum(m8.layer_bytes[0:6])
    assert per_token(off, "B", "disk_read_bytes") == pytest.approx(both, rel=0.03)
    assert per_token(on, "B", "disk_read_bytes") == pytest.approx(2 * both, rel=0.03)
    assert on.tpot_s == pytest.approx(off.tpot_s, rel=0.02)
    steps = WL.decode_tokens + 1
    assert on.device_stats["B"]["wasted_prefetch_bytes"] / steps == pytest.approx(both, rel=0.2), (
        "all of it wasted"
    )
    assert any("prefetch-release conflict" in line for line in on.differences())


def test_prefetch_hides_the_next_window_with_two_rounds(m8):
    """k = 2: B runs two windows of 3 layers; each fits the cache beside the other's remains, so the window
    prefetched after a send is still resident when B's turn comes: B stops waiting for the disk."""
    c = prefetch_toy(m8, [13, 3])
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    assert plan.k == 2
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    on = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    wait_off = per_token(off, "B", "disk_wait_s")
    read_s = sum(m8.layer_bytes[0:6]) / 2e9
    assert per_token(off, "B", "disk_read_bytes") == pytest.approx(2 * read_s * 1e9, rel=0.01), (
        "all 6 layers fault"
    )
    # readahead overlaps B's compute of one chunk with the read of the next; the rest is waited for
    assert read_s - per_token(off, "B", "compute_s") <= wait_off <= read_s
    assert per_token(on, "B", "disk_wait_s") < 0.02 * wait_off
    assert off.tpot_s - on.tpot_s > 0.9 * wait_off
    assert per_token(on, "B", "prefetch_s") > 0
    assert on.device_stats["B"]["wasted_prefetch_bytes"] == 0


def test_prefetch_can_be_too_late_on_a_slow_disk(m8):
    """k = 2 with a disk too slow to load a window during the others' compute: part of the load is hidden and
    the rest is waited for (paper Fig. 5)."""
    c = prefetch_toy(m8, [13, 3])
    slow = c.device("B").model_copy(update={"disk_seq_read_bps": 0.3e9})
    c = c.model_copy(update={"devices": (c.devices[0], slow)})
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    off = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    on = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=True))
    w_on, w_off = per_token(on, "B", "disk_wait_s"), per_token(off, "B", "disk_wait_s")
    assert 0.1 * w_off < w_on < 0.9 * w_off


# --- page cache behaviour ------------------------------------------------------------------------------------------
def test_lru_rereads_a_whole_window_that_barely_overflows(m8):
    """A window 5% larger than its cache, one round, no prefetch: an LRU cache under a cyclic scan hits nothing,
    so the whole window is read every token, as the cost model says (prima.cpp's model re-reads only the 5%
    overflow)."""
    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), toy_device("B")])
    window = sum(m8.layer_bytes[0:8])
    c = with_room(c, m8, [24, 8], None, "B", window / 1.05)
    plan = manual_plan(c, m8, WL, [24, 8], stream=False)
    res = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    assert per_token(res, "B", "disk_read_bytes") == pytest.approx(window, rel=0.01)
    assert res.device_stats["B"]["analytic_disk_bytes_per_token"] == pytest.approx(window, rel=0.01)
    assert res.tpot_s == pytest.approx(res.analytic.tpot_s, rel=0.03)


def test_cold_start_reads_everything_warm_start_nothing(m8):
    c = toy_cluster([toy_device("H"), toy_device("B")])
    plan = manual_plan(c, m8, WL, [16, 16], stream=False)
    warm = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", warm=True, prefetch=False))
    cold = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", warm=False, prefetch=False))
    mapped = sum(s["mapped_weight_bytes"] for s in cold.device_stats.values())
    prefill_cold = sum(v for (tok, _), v in cold.disk_read.items() if tok == 0)
    assert prefill_cold >= mapped
    assert cold.ttft_s > mapped / 2e9, (
        "without prefetch the two disks load one after the other, in ring order"
    )
    # with prefetch the head loads its window while B computes the first one
    pf = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", warm=False, prefetch=True))
    assert warm.ttft_s < pf.ttft_s < cold.ttft_s
    assert warm.ttft_s == pytest.approx(warm.analytic.ttft_s, rel=0.02)
    assert sum(v for (tok, _), v in warm.disk_read.items() if tok >= 1) < 1e5, "only embedding rows in decode"
    assert cold.tpot_s == pytest.approx(warm.tpot_s, rel=1e-6)


def test_the_first_window_after_the_load_reads_what_the_load_left_out_not_the_whole_window(m8):
    """k = 2, B's two windows of 3 layers in room for 5.8: the load (warm start) leaves the first window's first
    chunks out. Its first run faults those in, evicting its own next chunk and the other window's in turn (every
    page the load populated is young alike, docs/sim.md), instead of cascading through the whole window in LRU
    order (each fault evicting the window's next chunk, the oldest of the load)."""
    c = prefetch_toy(m8, [13, 3])
    c = with_room(c, m8, [13, 3], None, "B", 5.8 * m8.layer_bytes[0])
    plan = manual_plan(c, m8, WL, [13, 3], stream=False)
    assert plan.k == 2
    res = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False, warm=True))
    mapped = res.device_stats["B"]["mapped_weight_bytes"]  # both windows
    missing = mapped - res.device_stats["B"]["page_cache_capacity_bytes"]
    first = res.disk_read[(0, "B")]
    assert 0 < missing < 0.25 * mapped
    # its first window reads what is missing (its second one then pages as in decode); an LRU cascade read both
    assert first < 0.6 * mapped, "the first window read what the load left out, not every chunk"
    # from the second token on, the windows page as before (an LRU re-reads both every token)
    assert per_token(res, "B", "disk_read_bytes") == pytest.approx(mapped, rel=0.01)


def test_a_chunk_whose_read_ends_during_the_compute_before_its_touch_is_a_hit(m8, monkeypatch):
    """Compute slower than the disk: the readahead of the next chunk completes while the current one is
    computed, so the touch finds it resident. It is a hit: no fault is counted and nothing is queued for it (a
    fault was taken on the resident chunk after waiting out the compute: page_faults inflated, an extra
    readahead queued)."""
    from prima_sim.sim import device as sim_device

    on_resident = []
    fault = sim_device.SimDevice._fault

    def checked(self, chunk):
        if self.cache.resident(chunk):
            on_resident.append((self.name, chunk))
        return fault(self, chunk)

    monkeypatch.setattr(sim_device.SimDevice, "_fault", checked)
    h = toy_device("H", memory_bandwidth_bps=2e9, ram_total_bytes=64 * 2**30)
    b = toy_device("B", disk_seq_read_bps=20e9, memory_bandwidth_bps=0.5e9)
    c = with_room(toy_cluster([h, b]), m8, [10, 6], None, "B", 3.5 * m8.layer_bytes[0])
    plan = manual_plan(c, m8, WL, [10, 6], stream=False)
    res = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    assert per_token(res, "B", "disk_read_bytes") > 0, "B pages"
    assert on_resident == []


# --- OS behaviours -----------------------------------------------------------------------------------------------
def test_metal_reloads_the_whole_working_set_when_over_its_limit(m8):
    mac = toy_device("M", os="macos", unified_memory=True, gpu=toy_gpu("metal", vram_bytes=8 * 2**30))
    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), mac])
    window = sum(m8.layer_bytes[0:8])
    c = with_room(c, m8, [24, 8], [0, 8], "M", 0.9 * window)
    plan = manual_plan(c, m8, WL, [24, 8], [0, 8], stream=False)
    res = simulate(plan, c, m8, WL, SimConfig(page_cache="lru", prefetch=False))
    analytic = next(t for t in predict(plan, c, m8, WL, prefetch=False).per_device if t.name == "M")
    assert analytic.read_bytes == pytest.approx(window)
    assert per_token(res, "M", "disk_read_bytes") == pytest.approx(window, rel=1e-6)
    # a 10% larger working set holds it: nothing reloads
    c2 = with_room(c, m8, [24, 8], [0, 8], "M", 1.1 * window)
    res2 = simulate(
        manual_plan(c2, m8, WL, [24, 8], [0, 8], stream=False),
        c2,
        m8,
        WL,
        SimConfig(page_cache="lru", prefetch=False),
    )
    assert per_token(res2, "M", "disk_read_bytes") == 0


def test_macos_without_metal_faults_at_random_read_bandwidth(m8):
    mac = toy_device("M", os="macos", disk_seq_read_bps=3e9, disk_rand_read_bps=0.5e9)
    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30, memory_bandwidth_bps=1e9), mac])
    window = sum(m8.layer_bytes[0:4])
    c = with_room(c, m8, [28, 4], None, "M", 0.5 * window)
    res = simulate(
        manual_plan(c, m8, WL, [28, 4], stream=False), c, m8, WL, SimConfig(page_cache="lru", prefetch=False)
    )
    assert per_token(res, "M", "disk_wait_s") == pytest.approx(window / 0.5e9, rel=0.02)


def test_cuda_layers_never_page_cpu_layers_of_the_same_device_do(m8):
    pc = toy_device("G", gpu=toy_gpu("cuda", vram_bytes=24 * 2**30))
    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), pc])
    cpu_bytes = sum(m8.layer_bytes[0:4])
    c = with_room(c, m8, [16, 16], [0, 12], "G", 0.5 * cpu_bytes)
    res = simulate(
        manual_plan(c, m8, WL, [16, 16], [0, 12], stream=False),
        c,
        m8,
        WL,
        SimConfig(page_cache="lru", prefetch=False),
    )
    assert per_token(res, "G", "disk_read_bytes") == pytest.approx(cpu_bytes, rel=0.01)
    assert res.device_stats["G"]["mapped_weight_bytes"] == cpu_bytes
    assert res.device_stats["G"]["vram_weight_bytes"] == sum(m8.layer_bytes[4:16])


def test_android_swaps_other_apps_out_instead_of_rereading(m8):
    window = sum(m8.layer_bytes[0:6])
    phone = toy_device("P", os="android", swappable_bytes=int(window), swap_bytes=int(window))
    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), phone])
    c = with_room(c, m8, [26, 6], None, "P", 0.6 * window)
    res = simulate(
        manual_plan(c, m8, WL, [26, 6], stream=False), c, m8, WL, SimConfig(page_cache="lru", prefetch=False)
    )
    st = res.device_stats["P"]
    assert per_token(res, "P", "disk_read_bytes") == 0
    assert st["swapped_out_bytes"] == pytest.approx(0.4 * window, rel=0.01)
    assert st["page_cache_capacity_bytes"] == pytest.approx(window, rel=0.01)


@pytest.mark.parametrize("page_cache", ["lru", "linux"])
def test_linux_with_swap_swaps_cold_memory_out_instead_of_rereading(m8, page_cache):
    """A Linux device whose window misses its room by less than its swappable (cold) anonymous memory: with swap the
    kernel swaps that memory out and the window fits (docs/pagecache.md, "Swap": 640 MiB cgroup, 0 MiB read per
    token with 256 MiB of swap against 214 without); without swap, or with less swap than that, it pages."""
    window = sum(m8.layer_bytes[0:6])
    cold = int(0.1 * window)

    def run(swap: int) -> tuple[float, SimResult]:
        dev = toy_device("P", swappable_bytes=cold, swap_bytes=swap)
        c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), dev])
        c = with_room(c, m8, [26, 6], None, "P", 0.95 * window)
        plan = manual_plan(c, m8, WL, [26, 6], stream=False)
        res = simulate(plan, c, m8, WL, SimConfig(page_cache=page_cache, prefetch=False))
        assert plan.prediction is not None
        return per_token(res, "P", "disk_read_bytes"), res

    with_swap, res = run(256 * 2**20 + cold)
    assert with_swap == 0
    assert res.device_stats["P"]["swapped_out_bytes"] == pytest.approx(0.05 * window, rel=0.05)
    without, _ = run(0)
    assert without > 0.5 * window  # near a fit: Linux re-reads the window every token
    short, _ = run(cold // 4)  # swap smaller than the cold memory: only that much room
    assert short > 0.5 * window


def test_linux_swap_room_is_in_the_memory_model() -> None:
    from prima_sim.devices.behaviour import behaviour_of

    base = toy_device("L", ram_total_bytes=2**30, ram_available_bytes=800 * 2**20)
    swapping = toy_device("L", ram_total_bytes=2**30, ram_available_bytes=800 * 2**20, swappable_bytes=40 * 2**20,
                          swap_bytes=256 * 2**20)  # fmt: skip
    small = swapping.model_copy(update={"swap_available_bytes": 10 * 2**20})
    no_swap = swapping.model_copy(update={"swap_total_bytes": 0, "swap_available_bytes": 0})
    b, s, sm, ns = (behaviour_of(d) for d in (base, swapping, small, no_swap))
    assert (b.ram_budget_bytes, b.swap_out_first_bytes) == (800 * 2**20, 0)
    assert (s.ram_budget_bytes, s.swap_out_first_bytes) == (840 * 2**20, 40 * 2**20)
    assert sm.swap_out_first_bytes == 10 * 2**20  # no more than the free swap
    assert ns.ram_budget_bytes == 800 * 2**20 and ns.swap_out_first_bytes == 0  # swappable but no swap
    assert s.weights_room(100 * 2**20) == pytest.approx(740 * 2**20)
    mac = swapping.model_copy(update={"os": "macos"})
    assert behaviour_of(mac).swap_out_first_bytes == 0  # macOS keeps its own rule


# --- workload, memory ---------------------------------------------------------------------------------------------
def test_kv_cache_growth_makes_later_tokens_slower(m8):
    c = toy_cluster([toy_device("H", flops=20e9), toy_device("B", flops=20e9)])
    wl = Workload(n_ctx=2048, prompt_tokens=64, decode_tokens=40)
    res = simulate(manual_plan(c, m8, wl, [16, 16], stream=False), c, m8, wl)
    lat = [r.latency_s for r in res.rows if r.device == "H" and r.phase == "decode"]
    assert all(b >= a for a, b in itertools.pairwise(lat)) and lat[-1] > lat[0]


def test_prefill_runs_in_micro_batches_like_the_cost_model(m8):
    c = toy_cluster([toy_device("H"), toy_device("B")])
    wl = Workload(n_ctx=256, prompt_tokens=40, decode_tokens=2, n_ubatch=16)
    res = simulate(manual_plan(c, m8, wl, [16, 16], stream=False), c, m8, wl)
    assert res.ttft_s == pytest.approx(res.analytic.ttft_s, rel=0.01)
    embeds = [s for s in res.spans if s.label == "embed" and s.token == 0 and s.kind.value == "head"]
    assert len(embeds) == 3


def test_memory_pressure_is_pinned_ram_over_total(m8):
    c = toy_cluster([toy_device("H", ram_total_bytes=16 * 2**30), toy_device("B", ram_total_bytes=8 * 2**30)])
    plan = manual_plan(c, m8, WL, [16, 16], stream=False)
    res = simulate(plan, c, m8, WL)
    for name in ("H", "B"):
        d: DeviceProfile = c.device(name)
        use = memory_use(DeviceCosts(d, m8, WL), plan.device(name), name == "H")
        assert res.memory_pressure[name] == pytest.approx(use.pinned_ram / d.ram_total_bytes)
        assert (
            res.device_stats[name]["model_page_cache_peak_bytes"]
            == res.device_stats[name]["mapped_weight_bytes"]
        )


def test_infeasible_pinned_memory_is_refused(m8):
    from prima_sim.errors import InfeasiblePlanError

    tiny = toy_device("B", ram_total_bytes=2**20, ram_available_bytes=2**19)
    c = toy_cluster([toy_device("H"), tiny])
    with pytest.raises(InfeasiblePlanError, match="KV cache and compute buffers"):
        simulate(manual_plan(c, m8, WL, [16, 16], stream=False), c, m8, WL)


def test_results_converge_as_chunks_get_finer():
    """The chunk size is a resolution, not a parameter: 8 to 64 MiB agree within 0.5% on a paging cluster."""
    from prima_sim.devices.cluster import load_cluster

    m = catalog_model("llama3-70b")
    c = load_cluster("prefetch-4x8g")
    wl = Workload(n_ctx=1024, prompt_tokens=4, decode_tokens=2)
    plan = manual_plan(c, m, wl, [10] * 4, stream=False)
    tpots = [
        simulate(plan, c, m, wl, SimConfig(page_cache="lru", chunk_bytes=mib << 20)).tpot_s
        for mib in (8, 32, 64)
    ]
    assert max(tpots) / min(tpots) < 1.005


def test_linux_keeps_a_frozen_part_of_a_share_much_larger_than_its_cache(m8):
    """k = 1, no prefetch, B's window twice its cache: Linux's two-list LRU keeps the active list it froze after
    the first token (docs/pagecache.md), so B re-reads its window less that part; a plain LRU re-reads all of it.
    The simulated bytes follow the cost model's closed form."""
    from prima_sim.devices.behaviour import frozen_active_bytes

    c = toy_cluster([toy_device("H", ram_total_bytes=64 * 2**30), toy_device("B")])
    window = sum(m8.layer_bytes[0:8])
    c = with_room(c, m8, [24, 8], None, "B", window / 2)
    plan = manual_plan(c, m8, WL, [24, 8], stream=False)
    linux = simulate(plan, c, m8, WL, SimConfig(prefetch=False))
    lru = simulate(plan, c, m8, WL, SimConfig(prefetch=False, page_cache="lru"))
    b = c.device("B")
    frozen = float(frozen_active_bytes(window, window / 2, True, b.disk_seq_read_bps))
    assert 0 < frozen < window / 2
    assert per_token(lru, "B", "disk_read_bytes") == pytest.approx(window, rel=0.01)
    # the protected part is whole chunks (32 MiB here), so it can fall short of the formula by one chunk
    assert per_token(linux, "B", "disk_read_bytes") == pytest.approx(window - frozen, abs=32 * 2**20)
    analytic = next(t for t in linux.analytic.per_device if t.name == "B")
    assert analytic.read_bytes == pytest.approx(window - frozen, rel=1e-6)
    assert linux.tpot_s < lru.tpot_s
