"""Drop-behind streaming of a window larger than its page cache: the rule (behaviour), the planner's choice and
prediction (costmodel, Halda), the simulator, the plan contract, and the executor's streamer on a real mapping."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prima_sim.devices.behaviour import streamed_count, streamed_count_prefix
from prima_sim.devices.cluster import Cluster
from prima_sim.halda.costmodel import DeviceCosts, choose_streaming, predict
from prima_sim.halda.planner import make_plan, manual_plan
from prima_sim.plan import Plan, make_assignments
from prima_sim.sim import SimConfig, simulate
from prima_sim.workload import Workload
from tests.factories import device, smollm2_model

MiB = 1 << 20


# --- the rule -----------------------------------------------------------------------------------------------
def test_streamed_count_makes_the_rest_and_one_layer_fit():
    layers = [40.0 * MiB] * 8
    mapped, fit, fly = 8 * 40.0 * MiB, 150.0 * MiB, 40.0 * MiB
    t = streamed_count(mapped, fit, layers, fly)
    assert mapped - t * 40 * MiB + fly <= fit
    assert mapped - (t - 1) * 40 * MiB + fly > fit  # the fewest
    assert streamed_count(100.0 * MiB, fit, layers, fly) == 0  # fits: nothing streams
    assert (
        streamed_count(mapped, 20.0 * MiB, layers, fly) == 0
    )  # even all streamed does not fit: the page cache decides


@settings(max_examples=200, deadline=None)
@given(layers=st.lists(st.floats(1e6, 1e9), min_size=1, max_size=30), start=st.integers(0, 29),
       extra=st.floats(0, 2e9), fit=st.floats(1e6, 4e10), fly=st.floats(0, 1e9))  # fmt: skip
def test_the_searchs_bisection_counts_as_the_rule(layers, start, extra, fit, fly):
    start = min(start, len(layers) - 1)
    prefix = np.concatenate([[0.0], np.cumsum(layers)])
    window = layers[start:]
    mapped = float(sum(window)) + extra
    want = streamed_count(mapped, fit, window, fly)
    got = streamed_count_prefix(prefix, np.array(0), np.array(start), np.array(len(layers)), np.array(mapped),
                                np.array(fit), fly)  # fmt: skip
    assert int(got) == want


# --- planner and cost model ---------------------------------------------------------------------------------
def _cluster(mem_mib: list[int], os_name: str = "linux") -> Cluster:
    devs = [device(f"D{i}", ram_available_bytes=m * MiB, ram_total_bytes=m * MiB, os=os_name, disk_seq_read_bps=300e6,
                   disk_rand_read_bps=300e6) for i, m in enumerate(mem_mib)]  # fmt: skip
    return Cluster(name="stream", devices=devs)


@pytest.fixture(scope="module")
def model():
    return smollm2_model()  # 30 layers of 2.1 MiB


WL = Workload(prompt_tokens=8, decode_tokens=6, n_ctx=256)


def test_a_k1_device_over_its_room_streams_and_reads_only_the_streamed_layers(model):
    cluster = _cluster([1024, 1024, 22])
    plan = manual_plan(cluster, model, WL, [10, 10, 10])
    d2 = plan.device("D2")
    assert d2.streamed_layers is not None and d2.streamed_layers >= 1
    assert plan.device("D0").streamed_layers is None and plan.device("D1").streamed_layers is None
    per = {t.name: t for t in plan.prediction.per_device}
    assert per["D2"].read_bytes == pytest.approx(d2.streamed_layers * model.layer_bytes[-1])
    plain = manual_plan(cluster, model, WL, [10, 10, 10], stream=False)
    assert plain.device("D2").streamed_layers is None
    assert {t.name: t for t in plain.prediction.per_device}["D2"].read_bytes > per["D2"].read_bytes
    assert plan.prediction.tpot_s < plain.prediction.tpot_s


def test_a_streaming_worker_reads_its_first_streamed_layer_while_it_waits(model):
    cluster = _cluster([1024, 1024, 22])
    plan = manual_plan(cluster, model, WL, [10, 10, 10])
    d2 = {t.name: t for t in plan.prediction.per_device}["D2"]
    assert d2.prefetch  # its first streamed layer is read behind the others' work: the load bound applies
    layer = model.layer_bytes[-1]
    streamed = plan.device("D2").streamed_layers * layer
    t = plan.device("D2").streamed_layers
    per_layer = (d2.compute_s + d2.memory_s) / 10  # uniform layers
    # the other streamed layers are each advised when the one before is released: their reads overlap only
    # their own compute, not the window's resident layers (before this, the whole work hid them: a 2-device
    # plan streaming 2 of 17 layers was priced 1064 ms, simulated 1348, measured 1429; docs/halda.md)
    assert d2.disk_s == pytest.approx(max(0.0, (streamed - layer) / 300e6 - (t - 1) * per_layer), rel=1e-6,
                                      abs=1e-9)  # fmt: skip
    assert d2.disk_s > 0
    assert plan.prediction.tpot_s >= streamed / 300e6  # never faster than its disk
    # the head alone (or as head) gets no such credit
    head = manual_plan(_cluster([50]), model, WL, [30])
    assert head.device("D0").streamed_layers and not head.prediction.per_device[0].prefetch


def test_no_streaming_where_it_cannot_help_or_run(model):
    # fits: nothing to stream
    assert manual_plan(_cluster([1024] * 3), model, WL, [10, 10, 10]).device("D2").streamed_layers is None
    assert (
        manual_plan(_cluster([1024, 1024, 22]), model, WL, [12, 12, 6]).device("D2").streamed_layers is None
    )
    # k = 2: every device cycles through two windows (prefetch handles those)
    p2 = manual_plan(_cluster([1024, 1024, 22]), model, WL, [5, 5, 5])
    assert p2.k == 2 and all(a.streamed_layers is None for a in p2.devices)
    # macOS: the executor cannot release pages it maps
    mac = _cluster([1024, 1024, 22], "macos")
    c = DeviceCosts(mac.device("D2"), model, WL)
    a = make_assignments(["D0", "D1", "D2"], [10, 10, 10], [0, 0, 0], 30)[2]
    assert choose_streaming(c, a, False) is None


def test_streaming_reads_no_more_than_the_page_cache_would(model):
    cluster = _cluster([1024, 1024, 22])
    for w in ([10, 10, 10], [6, 6, 18], [12, 8, 10]):
        plan = manual_plan(cluster, model, WL, w)
        plain = predict(plan.without_streaming(), cluster, model, WL)
        assert plan.prediction.per_device[-1].read_bytes <= plain.per_device[-1].read_bytes + 1


def test_halda_search_and_predict_agree_with_streaming(model):
    cluster = _cluster([50, 30, 30])
    plan = make_plan(cluster, model, WL, "halda", k=1)
    assert any(a.streamed_layers for a in plan.devices)
    assert plan.solver.details.search_vs_predict == pytest.approx(0.0, abs=0.01)


# --- the plan contract ----------------------------------------------------------------------------------------
def test_plan_validates_streamed_layers():
    devs = make_assignments(["D0", "D1"], [4, 4], [0, 0], 8)
    ok = devs[1].model_copy(update={"streamed_layers": 3})
    Plan(model_id="m", n_layers=8, cluster_name="c", k=1, n_ctx=64, devices=(devs[0], ok), scheduler="manual")
    with pytest.raises(ValidationError, match="exceeds"):
        type(devs[1]).model_validate({**devs[1].model_dump(), "streamed_layers": 5})
    two = make_assignments(["D0", "D1"], [2, 2], [0, 0], 8)
    with pytest.raises(ValidationError, match="one window"):
        type(two[1]).model_validate({**two[1].model_dump(), "streamed_layers": 1})
    with pytest.raises(ValidationError):
        type(devs[1]).model_validate({**devs[1].model_dump(), "streamed_layers": 0})


def test_fingerprint_covers_streaming_only_when_set():
    devs = make_assignments(["D0", "D1"], [4, 4], [0, 0], 8)
    base = Plan(model_id="m", n_layers=8, cluster_name="c", k=1, n_ctx=64, devices=devs, scheduler="manual")
    streamed = base.model_copy(
        update={"devices": (devs[0], devs[1].model_copy(update={"streamed_layers": 2}))}
    )
    assert streamed.fingerprint() != base.fingerprint()
    assert streamed.without_streaming().fingerprint() == base.fingerprint()
    assert Plan.model_validate_json(streamed.model_dump_json()) == streamed


# --- the simulator --------------------------------------------------------------------------------------------
def test_simulated_streaming_reads_the_streamed_layers_per_token_and_evicts_nothing(model):
    cluster = _cluster([1024, 1024, 22])
    plan = manual_plan(cluster, model, WL, [10, 10, 10])
    res = simulate(plan, cluster, model, WL, SimConfig(seed=1))
    st_ = res.device_stats["D2"]
    streamed = plan.device("D2").streamed_layers * model.layer_bytes[-1]
    assert st_["sim_disk_bytes_per_decode_token"] == pytest.approx(streamed, rel=0.02)
    assert st_["evictions"] == 0
    plain = simulate(plan, cluster, model, WL, SimConfig(seed=1, stream=False))
    assert plain.device_stats["D2"]["sim_disk_bytes_per_decode_token"] > 1.3 * streamed
    assert res.summary()["tpot_s"] < plain.summary()["tpot_s"]
    # without streaming the simulator runs the plan as it would have been made without it
    again = simulate(
        manual_plan(cluster, model, WL, [10, 10, 10], stream=False), cluster, model, WL, SimConfig(seed=1)
    )
    assert again.summary()["tpot_s"] == plain.summary()["tpot_s"]


def test_simulated_streamed_tpot_is_near_the_cost_model(model):
    cluster = _cluster([1024, 1024, 22])
    for w in ([10, 10, 10], [6, 6, 18]):
        plan = manual_plan(cluster, model, WL, w)
        res = simulate(plan, cluster, model, WL, SimConfig(seed=1))
        assert res.summary()["tpot_s"] == pytest.approx(plan.prediction.tpot_s, rel=0.25)


# --- the executor's streamer (a real llama.cpp mapping) ---------------------------------------------------------
def _resident_pages(path: Path, lo: int, hi: int) -> int:
    """Pages of ``path``'s ``[lo, hi)`` in the page cache (mincore through a mapping of our own)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    lo, hi = lo // page * page, -(-hi // page) * page
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), hi - lo, offset=lo, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(m, dtype=np.uint8)
            vec = ctypes.create_string_buffer((hi - lo) // page)
            if libc.mincore(view.ctypes.data, hi - lo, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec.raw)
        finally:
            del view
            m.close()


def _resident_in(path: Path, spans: list[tuple[int, int]]) -> int:
    return sum(_resident_pages(path, lo, hi) for lo, hi in spans)


def _pages(spans: list[tuple[int, int]]) -> int:
    """Pages of a layer (a large folio read for the neighbouring layer's advice may cover a few of them)."""
    return sum(-(-(hi - lo) // mmap.PAGESIZE) for lo, hi in spans)


@pytest.mark.real
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/fadvise streaming is Linux's")
def test_streamer_releases_each_streamed_layer_and_keeps_the_rest(smollm2, tmp_path):
    pytest.importorskip("llama_cpp")
    from prima_sim.exec.llamacpp import Model
    from prima_sim.exec.pagemap import mapping_base
    from prima_sim.exec.stream import LayerStreamer, layer_ranges

    path = tmp_path / "m.gguf"
    path.write_bytes(smollm2.read_bytes())
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as after a reboot: the load reads it (large folios)
    os.close(fd)
    with Model(path) as m:
        assert mapping_base(path) is not None
        ranges = layer_ranges(path, m.n_layer)
        spans = sorted(x for r in ranges for x in r)
        assert all(a < b <= c for (a, b), (c, _) in itertools.pairwise(spans))  # no overlap
        assert _resident_in(path, ranges[25]) == _pages(ranges[25])  # llama.cpp's load populated the mapping
        s = LayerStreamer(path, m.n_layer, 10)
        try:
            assert s.first == 20 and s.end == 30
            assert set(s.watch.values()) == set(range(20, 30))
            # released at start (layer 20 is advised again for the first token; the last one may share a large
            # folio with the resident data after it, which is kept)
            for i in range(21, 29):
                assert _resident_in(path, ranges[i]) < 0.1 * _pages(ranges[i]), f"layer {i} still resident"
            assert _resident_in(path, ranges[5]) > 0  # a resident layer stays
            before = s.dropped_bytes
            s.layer_done(20)
            assert _resident_in(path, ranges[20]) < 0.1 * _pages(ranges[20])
            assert s.dropped_bytes > before
            s.layer_done(3)  # not streamed: nothing happens
            assert _resident_in(path, ranges[3]) > 0
        finally:
            s.close()
