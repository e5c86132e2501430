"""The emulated disk's read limit (blk-throttle) in the simulator: budget granted in whole slices, as Linux 6.x's
block/blk-throttle.c does, the streamer's pattern measured against it, and how emulation profiles say so."""

from __future__ import annotations

import json
import statistics

import pytest
import simpy

from prima_sim.devices.cluster import Cluster
from prima_sim.emulate.disk import BLK_THROTTLE_SLICE_S, with_read_limits
from prima_sim.emulate.scenario import load_scenario
from prima_sim.halda.planner import manual_plan
from prima_sim.sim import SimConfig, simulate
from prima_sim.sim.disk import JIFFY_S, BlkThrottle, Disk, Read
from prima_sim.workload import Workload
from tests.factories import device, smollm2_model

MB = 1e6
BPS = 300 * MB  # the memory-starved scenario's limit
S = 0.1


def test_after_a_pause_a_whole_slice_of_budget_passes_at_once():
    th = BlkThrottle(S)
    assert th.read(5.0, 30 * MB, BPS) == 5.0  # bps * slice = 30 MB: no wait at all
    # the next slice's budget opens one tick after the slice boundary
    assert th.read(5.0, 10 * MB, BPS) == pytest.approx(5.0 + S + JIFFY_S)
    th = BlkThrottle(S)
    assert th.read(5.0, 45 * MB, BPS) == pytest.approx(5.0 + S + JIFFY_S)  # not 45 MB / 300 MB/s = 150 ms


def test_a_busy_group_reads_at_the_limit_on_average():
    th = BlkThrottle(S)
    t = 10.0
    for _ in range(300):  # 3 MB reads back to back: 900 MB, 3 s at the limit
        t = th.read(t, 3 * MB, BPS)
    assert 3.0 - 2 * S <= t - 10.0 <= 3.0 + S


def test_a_short_pause_keeps_its_budget_a_long_one_gets_one_slice():
    th = BlkThrottle(S)
    t = 10.0
    for _ in range(60):
        t = th.read(t, 3 * MB, BPS)
    # a pause shorter than the slice's end: the time paused is budget (granted up to the slice boundary under way)
    t += 0.15
    short = th.read(t, 45 * MB, BPS) - t
    # after a long pause a new slice starts: one slice's budget, the rest a slice later
    long = BlkThrottle(S).read(100.0, 45 * MB, BPS) - 100.0
    assert long == pytest.approx(S + JIFFY_S)
    assert short < long - 0.03 and short < 45 * MB / BPS / 2


def test_the_physical_disk_under_the_limit_bounds_a_burst():
    assert BlkThrottle(S, raw_bps=1e9).read(0.0, 30 * MB, BPS) == pytest.approx(0.03)


def test_throttle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="slice_s"):
        BlkThrottle(0.0)
    with pytest.raises(ValueError, match="raw_bps"):
        BlkThrottle(0.1, raw_bps=-1.0)


def _disk_times(throttle: BlkThrottle | None) -> list[float]:
    env = simpy.Environment()
    done: list[float] = []
    disk = Disk(env, "d", lambda r: True, lambda r: done.append(env.now), throttle)
    for i in range(3):
        disk.submit(Read(i, 30 * MB, BPS))
    env.run()
    return done


def test_a_throttled_disk_serves_its_reads_as_the_throttle_lets_them_through():
    assert _disk_times(None) == pytest.approx([0.1, 0.2, 0.3])
    assert _disk_times(BlkThrottle(S)) == pytest.approx([0.0, S + JIFFY_S, 2 * S + JIFFY_S])


# --- the streamer's pattern, measured (the lead's /tmp/w/stx.sh): a cgroup with 300 MB/s on the disk, a window of
# five layers with 9 ms of compute each, the last two streamed: after each streamed layer computes it is released and
# the next one advised; after the last the first is advised for the next token, read while the device idles
L3, L4 = 32.5 * MB, 34 * MB  # the two streamed layers (31 MiB and about 34 MB)
COMPUTE = 0.009


def _streamer(
    idle_s: float, throttle: BlkThrottle | None, tokens: int = 40
) -> tuple[list[float], list[float]]:
    """Per token (after five of warm-up): the window's time and layer 4's wait for its read."""
    env = simpy.Environment()
    disk = Disk(env, "d", lambda r: True, lambda r: None, throttle)
    windows: list[float] = []
    l4: list[float] = []

    def run():
        r3 = disk.submit(Read(3, L3, BPS, prefetch=True))
        for tok in range(tokens):
            yield env.timeout(idle_s)
            t0 = env.now
            yield env.timeout(3 * COMPUTE)  # layers 0-2, resident
            yield r3.wait(env)
            yield env.timeout(COMPUTE)
            r4 = disk.submit(Read(4, L4, BPS, prefetch=True))
            ts = env.now
            yield r4.wait(env)
            wait4 = env.now - ts
            yield env.timeout(COMPUTE)
            r3 = disk.submit(Read(3, L3, BPS, prefetch=True))
            if tok >= 5:
                windows.append(env.now - t0)
                l4.append(wait4)

    env.process(run())
    env.run()
    return windows, l4


def test_the_streamer_pattern_takes_the_measured_times():
    # idle 117 ms: most tokens' window 87 ms with layer 4 read in 41-42 ms, some 168 ms with 116 (a slice boundary
    # falls badly); the model has the same two kinds of token
    windows, l4 = _streamer(0.117, BlkThrottle(S))
    assert statistics.median(l4) == pytest.approx(0.0415, rel=0.2)
    assert statistics.median(windows) == pytest.approx(0.087, rel=0.2)
    assert max(windows) == pytest.approx(0.168, rel=0.2)
    # idle 300 ms: a new slice every token, layer 4 at about the rate (110 ms), windows 155-169 ms
    windows, l4 = _streamer(0.300, BlkThrottle(S))
    assert statistics.mean(l4) == pytest.approx(0.110, rel=0.2)
    assert statistics.mean(windows) == pytest.approx(0.160, rel=0.2)
    # no idle: windows 204-285 ms, layer 4 97-179 ms
    windows, l4 = _streamer(0.0, BlkThrottle(S))
    assert 0.204 * 0.9 <= statistics.mean(windows) <= 0.285 and 0.097 * 0.9 <= statistics.mean(l4) <= 0.179


def test_a_steady_rate_disk_misses_the_streamer_measurements():
    _, l4 = _streamer(0.117, None)
    assert statistics.mean(l4) > 2 * 0.0415  # 34 MB at 300 MB/s is 113 ms, measured 41


# --- drop-behind streaming on a throttled disk ---------------------------------------------------------------------
@pytest.mark.parametrize("mem_mib", range(18, 30))
def test_streaming_on_a_throttled_disk_reads_the_streamed_layers_and_evicts_nothing(mem_mib):
    # a room for the resident layers and one streamed layer, some with under a chunk to spare (19 MiB: 0.4 MiB): a
    # fault near a streamed layer's end must not read the next streamed layer ahead, which a throttled disk would
    # deliver at once (a slice's budget), before the layer is released, pushing a resident layer out
    model = smollm2_model()  # 30 layers of 2.1 MiB
    wl = Workload(prompt_tokens=8, decode_tokens=6, n_ctx=256)
    devs = [device(f"D{i}", ram_available_bytes=m << 20, ram_total_bytes=m << 20, os="linux", disk_seq_read_bps=BPS,
                   disk_rand_read_bps=BPS, disk_throttle_slice_s=S) for i, m in enumerate([1024, 1024, mem_mib])]  # fmt: skip
    cluster = Cluster(name="stream", devices=devs)
    plan = manual_plan(cluster, model, wl, [10, 10, 10])
    streamed = plan.device("D2").streamed_layers
    assert streamed
    for chunk in (1 << 20, 512 << 10):
        st = simulate(plan, cluster, model, wl, SimConfig(seed=1, chunk_bytes=chunk)).device_stats["D2"]
        assert st["evictions"] == 0
        assert st["sim_disk_bytes_per_decode_token"] == pytest.approx(
            streamed * model.layer_bytes[-1], rel=0.01
        )


# --- profiles -------------------------------------------------------------------------------------------------
def test_a_profile_without_a_throttle_writes_nothing_new_and_keeps_its_fingerprint():
    d = device("D0")
    assert "disk_throttle_slice_s" not in d.model_dump(mode="json", exclude_none=True)
    c = Cluster(name="c", devices=[d, device("D1")])
    marked = c.model_copy(
        update={"devices": (d.model_copy(update={"disk_throttle_slice_s": 0.1}), device("D1"))}
    )
    assert marked.fingerprint() == c.fingerprint()  # the simulator's alone: plans made before still match
    with pytest.raises(ValueError, match="disk_throttle_slice_s"):
        device("D2", disk_throttle_slice_s=0.0)
    back = Cluster.model_validate_json(json.dumps(marked.model_dump(mode="json")))
    assert back.devices[0].disk_throttle_slice_s == 0.1


def test_emulation_marks_exactly_the_devices_with_a_disk_read_limit():
    sc = load_scenario("memory-starved")
    names = [d.name for d in sc.ring]
    assert all(d.disk_read for d in sc.devices)
    free = sc.model_copy(update={"devices": tuple(d.model_copy(update={"disk_read": None}) if d.name == names[0]
                                                  else d for d in sc.devices)})  # fmt: skip
    c = Cluster(name="c", devices=[device(n) for n in names], head=sc.head_name)
    out = {d.name: d.disk_throttle_slice_s for d in with_read_limits(c, free).devices}
    assert out == {n: (None if n == names[0] else BLK_THROTTLE_SLICE_S) for n in names}
