"""One-host emulation: scenario files, cgroup v1/v2 logic (on fake trees), user-space latency, and, as root,
real cgroups, namespaces, cleanup on every exit path and a small scenario run end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prima_sim.cli.main import main
from prima_sim.emulate import cgroups
from prima_sim.emulate.netns import htb_burst_bytes, latency_table
from prima_sim.emulate.scenario import Scenario, load_scenario
from prima_sim.errors import EmulationError, InputError
from prima_sim.schema import validate_model
from prima_sim.testing import smollm2_path

IS_ROOT = os.geteuid() == 0
ROOT_TOOLS = (
    IS_ROOT
    and Path("/sys/fs/cgroup").is_dir()
    and "memory" in cgroups.detect()
    and all(shutil.which(t) for t in ("ip", "tc", "losetup", "mkfs.ext4", "mount"))
)
needs_root = pytest.mark.skipif(
    not ROOT_TOOLS, reason="needs root, a memory cgroup controller, iproute2, util-linux and e2fsprogs"
)


def _scenario(**over: object) -> dict:
    base: dict = {
        "name": "t",
        "model": {"gguf": str(smollm2_path())},
        "devices": [
            {"name": "A", "memory": "768 MiB", "cpus": 1.0, "bandwidth": "100 Mbit/s", "latency": "2 ms"},
            {"name": "B", "memory": "1 GiB", "cpuset": "0", "bandwidth": "50 Mbit/s", "latency": "3 ms"},
        ],
    }
    base.update(over)
    return base


# --- scenario files ---------------------------------------------------------------------------------------------
def test_scenario_pairs_and_controllers() -> None:
    sc = validate_model(Scenario, _scenario(), "t")
    bw, lat = sc.pair("A", "B")
    assert bw == pytest.approx(50e6 / 8) and lat == pytest.approx(0.005)
    assert sc.controllers() == ["memory", "cpu", "cpuset"]
    sc2 = validate_model(
        Scenario,
        _scenario(network={"links": [{"a": "B", "b": "A", "bandwidth": "1 Gbit/s", "latency": "1 ms"}]}),
        "t",
    )
    assert sc2.pair("A", "B") == (pytest.approx(125e6), pytest.approx(0.001))
    assert [d.name for d in validate_model(Scenario, _scenario(head="B"), "t").ring] == ["B", "A"]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"run": {"schedulers": ["nope"]}}, "unknown scheduler"),
        ({"model": {"gguf": "x.gguf", "like": "llama3-8b"}}, "exactly one"),
        ({"model": {"layers": 4, "embd": 64}}, "all of layers"),
        ({"run": {"manual": [{"windows": [1, 2, 3]}]}}, "one window per device"),
        ({"run": {"single": ["Z"]}}, "unknown device"),
        ({"head": "Z"}, "head"),
    ],
)
def test_scenario_errors(over: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        validate_model(Scenario, _scenario(**over), "t")


def test_scenario_device_errors() -> None:
    bad = _scenario()
    bad["devices"][0]["cpuset"] = "0"
    with pytest.raises(InputError, match="cpus or cpuset"):
        validate_model(Scenario, bad, "t")
    bad = _scenario()
    bad["devices"][1]["name"] = "A"
    with pytest.raises(InputError, match="unique"):
        validate_model(Scenario, bad, "t")
    bad = _scenario()
    bad["devices"][0]["memory"] = "64 MiB"
    with pytest.raises(InputError, match="at least 128 MiB"):
        validate_model(Scenario, bad, "t")


def test_bundled_suite_is_valid() -> None:
    root = Path(__file__).resolve().parents[1] / "datasets" / "scenarios"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 8
    for f in files:
        sc = load_scenario(f)
        assert sc.devices and sc.model and sc.description, f
    # the paging experiments kept beside the benchmarks (not in the suite) load too, and only run baselines
    extra = sorted((root.parents[1] / "benchmarks" / "scenarios").glob("*.toml"))
    assert len(extra) >= 4
    for f in extra:
        sc = load_scenario(f)
        assert sc.run.single and not sc.run.schedulers and f.stem == sc.name, f


def test_synth_args_and_labels() -> None:
    sc = validate_model(
        Scenario, _scenario(model={"layers": 8, "embd": 512, "ff": 1024, "heads": 8, "kv_heads": 2}), "t"
    )
    args = sc.model.synth_args()
    assert args[:2] == ["--layers", "8"] and "--quant" in args
    assert sc.model.label() == "llama-8L-512-q4_0"
    assert len(sc.model.key()) == 12


# --- network helpers and the latency hook ------------------------------------------------------------------
def test_latency_table_and_burst() -> None:
    t = json.loads(latency_table({("A", "B"): 0.004, ("B", "A"): 0.004, ("A", "C"): 0.0}))
    assert t == {"B": {"A": 0.004}, "A": {"B": 0.004}}
    assert htb_burst_bytes(1e3) == 2 * 1514 and htb_burst_bytes(125e6) == 125000


def test_link_latency_holds_messages() -> None:
    from prima_sim.exec.ring import LinkLatency, parse_latency_table

    table = parse_latency_table(json.dumps({"B": {"A": 0.03}}))
    lat = LinkLatency("B", table)
    t0 = time.time()
    end = lat.hold("A", t0)
    assert end - t0 >= 0.03 and time.time() - t0 < 0.5
    assert lat.hold("C", t0) == t0  # no entry: no delay
    assert LinkLatency("A", table).delay == {}
    for bad in ("[1, 2]", '{"B": {"A": -1}}', '{"B": 3}', "{oops"):
        with pytest.raises(InputError, match="--link-latency: must be a JSON object"):
            parse_latency_table(bad)
    assert parse_latency_table("") == {} and LinkLatency("B").delay == {}


# --- cgroups on fake trees -------------------------------------------------------------------------------
def _fake_tree(tmp: Path, mounts: list[tuple[str, str, str]], controllers_v2: str = "") -> Path:
    (tmp / "proc/self").mkdir(parents=True)
    (tmp / "proc/self/mounts").write_text("".join(f"cgroup {m} {t} rw,{o} 0 0\n" for t, m, o in mounts))
    for t, m, _ in mounts:
        d = tmp / m.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        if t == "cgroup2":
            (d / "cgroup.controllers").write_text(controllers_v2)
            (d / "cgroup.subtree_control").write_text("")
    return tmp


def test_detect_v1_v2_and_hybrid(tmp_path: Path) -> None:
    hybrid = _fake_tree(tmp_path / "h", [("cgroup", "/sys/fs/cgroup/memory", "memory"), ("cgroup", "/sys/fs/cgroup/cpu", "cpu,cpuacct"),
                                         ("cgroup2", "/sys/fs/cgroup/unified", "nsdelegate")], "hugetlb")  # fmt: skip
    h = cgroups.detect(hybrid)
    assert h["memory"].version == 1 and h["cpu"].version == 1 and "io" not in h
    v2 = _fake_tree(
        tmp_path / "v2", [("cgroup2", "/sys/fs/cgroup", "nsdelegate")], "cpuset cpu io memory pids"
    )
    h2 = cgroups.detect(v2)
    assert {c: x.version for c, x in h2.items()} == {"memory": 2, "cpu": 2, "cpuset": 2, "io": 2}
    with pytest.raises(EmulationError, match="'io' is not available"):
        cgroups.Cgroups("prima-abcdef", need=("memory", "io"), root=hybrid, require_root=False)


def test_v2_group_writes_limits(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, [("cgroup2", "/sys/fs/cgroup", "nsdelegate")], "cpuset cpu io memory")
    cgs = cgroups.Cgroups(
        "prima-abcdef", need=("memory", "cpu", "io", "cpuset"), root=root, require_root=False
    )
    g = cgs.create("dev0")
    base = root / "sys/fs/cgroup"
    assert (
        (base / "cgroup.subtree_control").read_text().startswith("+")
    )  # controllers enabled for the run group
    assert (base / "prima-abcdef/cgroup.subtree_control").read_text().startswith("+")
    (g.dirs["memory"] / "memory.swap.max").write_text("max")
    g.set_memory_limit(512 << 20)
    g.set_cpu_quota(0.5, 10_000)
    g.set_read_bps("254:0", 100e6)
    g.set_cpuset("0")
    d = base / "prima-abcdef/dev0"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "cpu.max").read_text() == "5000 10000"
    assert (d / "io.max").read_text() == "254:0 rbps=100000000"
    assert (d / "cpuset.cpus").read_text() == "0"
    (d / "memory.stat").write_text("anon 1000\nfile 2000\n")
    (d / "memory.current").write_text("3000\n")
    (d / "memory.events").write_text("oom 0\noom_kill 2\n")
    (d / "io.stat").write_text("254:0 rbytes=4096 wbytes=0\n")
    st = g.memory_stat()
    assert (st["anon"], st["file"], st["usage"], st["limit"]) == (1000, 2000, 3000, 512 << 20)
    light = g.memory_light()  # no process in the fake group: all of the charge is page cache or kernel memory
    assert (light["anon"], light["file"], light["usage"], light["limit"]) == (0, 3000, 3000, 512 << 20)
    assert g.oom_kills() == 2 and g.io_read_bytes() == 4096 and g.io_read_bytes("254:0") == 4096
    assert g.io_read_bytes("8:0") == 0
    assert g.procs_files() == [d / "cgroup.procs"]


def test_v1_group_writes_limits(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, [("cgroup", "/sys/fs/cgroup/memory", "memory"), ("cgroup", "/sys/fs/cgroup/cpu", "cpu"),
                                 ("cgroup", "/sys/fs/cgroup/blkio", "blkio")])  # fmt: skip
    cgs = cgroups.Cgroups("prima-abcdef", need=("memory", "cpu", "io"), root=root, require_root=False)
    g = cgs.create("dev0")
    mem = root / "sys/fs/cgroup/memory/prima-abcdef/dev0"
    (mem / "memory.memsw.limit_in_bytes").write_text("")
    g.set_memory_limit(1 << 30)
    g.set_cpu_quota(1.5, 10_000)
    g.set_read_bps("8:0", 2e8)
    assert (mem / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(1 << 30)
    cpu = root / "sys/fs/cgroup/cpu/prima-abcdef/dev0"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "15000" and (
        cpu / "cpu.cfs_period_us"
    ).read_text() == "10000"
    assert (
        root / "sys/fs/cgroup/blkio/prima-abcdef/dev0/blkio.throttle.read_bps_device"
    ).read_text() == "8:0 200000000"
    assert len(g.procs_files()) == 3
    (mem / "memory.stat").write_text("cache 10\nrss 20\ntotal_cache 100\ntotal_rss 200\n")
    assert g.memory_stat()["anon"] == 200 and g.memory_stat()["file"] == 100


def test_remove_all_or_raise_raises_what_could_not_be_removed(tmp_path: Path) -> None:
    """The registry's undo for a run's groups: nothing to say when all went, one EmulationError naming what stayed."""
    root = _fake_tree(tmp_path, [("cgroup", "/sys/fs/cgroup/memory", "memory")])
    cgs = cgroups.Cgroups("prima-abcdef", need=("memory",), root=root, require_root=False)
    cgs.create("dev0")
    cgs.remove_all_or_raise()
    assert not (root / "sys/fs/cgroup/memory/prima-abcdef").exists()
    cgs.create("dev1")
    (root / "sys/fs/cgroup/memory/prima-abcdef/dev1/stray").write_text("")  # a directory rmdir cannot remove
    with pytest.raises(EmulationError, match="dev1"):
        cgs.remove_all_or_raise()


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationError, match="needs root"):
        cgroups.check_root()


def test_read_only_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path
    (root / "proc/self").mkdir(parents=True)
    (root / "sys/fs/cgroup/memory").mkdir(parents=True)
    (root / "proc/self/mounts").write_text("cgroup /sys/fs/cgroup/memory cgroup ro,memory 0 0\n")
    with pytest.raises(EmulationError, match="read-only"):
        cgroups.Cgroups("prima-abcdef", root=root, require_root=False)


def test_block_device_of_a_real_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("x")
    try:
        dev = cgroups.block_device_of(f)
    except EmulationError as exc:  # tmpfs or overlay without a block device: a clear error is the contract
        assert "block device" in str(exc)
        return
    assert ":" in dev and not (Path("/sys/dev/block") / dev / "partition").exists()


# --- CLI ----------------------------------------------------------------------------------------------------
def test_emulate_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["emulate", "--check", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"root", "controllers", "tools", "ok"}
    assert rc == (0 if out["ok"] else 1)


def test_emulate_bad_scenario_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.toml"
    f.write_text('name = "x"\n[model]\ngguf = "nope.gguf"\n[[devices]]\nname = "A"\nmemory = "1 GiB"\n')
    assert main(["emulate", "--scenario", str(f)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("prima-sim emulate: error:")
        and "nope.gguf" in err
        and len(err.strip().splitlines()) == 1
    )


# --- as root: real cgroups and namespaces -------------------------------------------------------------------
def _foreign_runs(mine: frozenset[int]) -> set[str]:
    """Run ids of live emulations started by other processes (someone else emulating on this host)."""
    from prima_sim.emulate.resources import STATE_DIR

    out: set[str] = set()
    for f in STATE_DIR.glob("*.pid") if STATE_DIR.is_dir() else ():
        try:
            pid = int(f.read_text().strip())
            if pid in mine or pid == os.getpid():
                continue
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        out.add(f.stem)
    return out


def _ours(mine: frozenset[int] = frozenset()) -> tuple[set[str], set[str]]:
    """The emulation objects (namespaces, cgroups) on this host, except those of other processes' live runs."""
    from prima_sim.emulate.resources import list_netns

    foreign = _foreign_runs(mine)
    ns = {
        n
        for n in list_netns()
        if n.startswith("prima-") and not any(n.startswith(f"prima-{r}") for r in foreign)
    }
    cg = {str(p) for p in cgroups.leftover_dirs("prima-") if not any(f"prima-{r}" in str(p) for r in foreign)}
    return ns, cg


def _tiny(tmp_path: Path, **over: object) -> Path:
    data = _scenario(**over)
    data["devices"][0]["disk_read"] = "300 MB/s"
    data["devices"][1]["disk_read"] = "300 MB/s"
    data.setdefault("workload", {"decode_tokens": 4, "repetitions": 1, "n_ctx": 128})
    data.setdefault("run", {"schedulers": ["halda"], "single": ["A"]})
    import tomli_w

    f = tmp_path / "tiny.toml"
    f.write_text(tomli_w.dumps(data))
    return f


@pytest.mark.root
@needs_root
def test_failure_mid_setup_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prima_sim.emulate.calibrate import Calibrator
    from prima_sim.emulate.emulator import EmulateOptions, emulate

    before = _ours()
    pids: list[int] = []

    def boom(self: Calibrator, *a: object) -> None:
        tb = self.tb
        p = tb.spawn_in(tb.ring[1].name, ["sleep", "60"], self.out / "sleep.log")
        pids.append(p.pid)
        assert tb.groups[tb.ring[1].name].pids() == {p.pid}
        assert len(_ours()[0]) == len(before[0]) + 3  # bridge + two devices exist now
        raise RuntimeError("boom in the middle of the set-up")

    monkeypatch.setattr(Calibrator, "profile_devices", boom)
    sc = load_scenario(_tiny(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        emulate(sc, EmulateOptions(out_dir=tmp_path / "out", reports_dir=tmp_path / "rep"))
    assert _ours() == before
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


@pytest.mark.root
@needs_root
def test_sigterm_mid_run_leaves_nothing(tmp_path: Path) -> None:
    before = _ours()
    f = _tiny(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "prima_sim.cli.main", "emulate", "--scenario", str(f), "--out",
                          str(tmp_path / "out"), "--reports", str(tmp_path / "rep"), "--quick-profile", "--profile-repeats", "1"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    child = frozenset({p.pid})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_ours(child)[0]) < len(before[0]) + 3:
        time.sleep(0.1)
    assert len(_ours(child)[0]) >= len(before[0]) + 3, "the emulation did not create its namespaces"
    time.sleep(1.0)  # into the profiling of the first device
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert _ours() == before


@pytest.mark.root
@needs_root
def test_cleanup_removes_crashed_leftovers() -> None:
    from prima_sim.emulate.cleanup import cleanup_leftovers

    rid = "fedcb9"
    subprocess.run(["ip", "netns", "add", f"prima-{rid}-d0"], check=True)
    mem = cgroups.detect()["memory"].mount / f"prima-{rid}" / "dev"
    mem.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    (mem / "cgroup.procs").write_text(str(sleeper.pid))
    found, problems = cleanup_leftovers()
    assert f"prima-{rid}-d0" in found["netns"] and any(rid in c for c in found["cgroups"])
    assert not problems
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert not mem.parent.exists()
    assert (
        f"prima-{rid}-d0"
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


@pytest.mark.root
@pytest.mark.real
@needs_root
def test_small_scenario_end_to_end(tmp_path: Path) -> None:
    """Two emulated devices (SmolLM2): profiles inside the limits, shaped links, a Halda plan and a one-device
    baseline run for real, rows and plots written, nothing left behind."""
    from prima_sim.emulate.emulator import EmulateOptions, emulate

    before = _ours()
    sc = load_scenario(_tiny(tmp_path))
    res = emulate(
        sc, EmulateOptions(out_dir=tmp_path / "out", reports_dir=tmp_path / "rep", quick_profile=True)
    )
    assert _ours() == before
    assert res.cluster.device("A").ram_total_bytes == 768 << 20  # the profiler saw the cgroup, not the host
    assert res.cluster.device("B").ram_total_bytes == 1 << 30
    assert (
        res.cluster.device("A").cores == 1 and res.cluster.device("B").cores == 1
    )  # quota 1 CPU; cpuset "0"
    (link,) = res.cluster.links
    assert link.bandwidth_bps == pytest.approx(50e6 / 8, rel=0.2)  # shaped by HTB, measured by netprobe
    assert link.latency_s >= 0.005  # user-space latency 2 ms + 3 ms on top of the kernel's
    by = {r["scheduler"]: r for r in res.rows}
    assert set(by) == {"halda", "single-A", "llama.cpp-A"}  # stock llama.cpp beside our one-device executor
    for r in by.values():
        assert r["status"] == "ok", r["error"]
        assert r["tpot_meas_s"] > 0 and math.isfinite(r["tpot_sim_s"]) and math.isfinite(r["tpot_analytic_s"])
        assert 0 < r["mem_pressure_max_pct"] < 100
        # re-predicted with the streaming rates measured around the runs (the same windows, restamped)
        assert math.isfinite(r["tpot_sim_run_s"]) and math.isfinite(r["tpot_analytic_run_s"])
    assert (tmp_path / "rep" / "emulation.csv").is_file()
    assert (tmp_path / "rep" / f"{sc.name}-tpot.png").is_file()
    assert (tmp_path / "rep" / f"{sc.name}-halda-gantt.png").is_file()
    rep = json.loads((tmp_path / "out" / "runs" / "halda" / "rep0" / "summary.json").read_text())
    assert rep["n_decode"] == 4


def test_executor_overhead_lowers_the_budget() -> None:
    from prima_sim.emulate.calibrate import Footprint, executor_overhead, with_executor_overhead
    from tests.factories import device

    fp = Footprint(worker=30, head=32, vocab=10)
    assert executor_overhead(fp, is_head=True) == 42 and executor_overhead(fp, is_head=False) == 30
    prof = device("A", ram_total_bytes=512 << 20, ram_available_bytes=480 << 20)
    out = with_executor_overhead(prof, 512 << 20, 64 << 20, is_head=True)
    assert out.ram_available_bytes == 448 << 20
    assert "executor" in out.sources["ram_available_bytes"]


class _QuietGroup:
    """The cgroup reads a MemorySampler makes that these tests do not look at (a fake group overrides the rest)."""

    def io_read_bytes(self, device: str | None = None) -> int:
        return 0

    def oom_kills(self) -> int:
        return 0

    def reset_peak(self) -> None:
        pass

    def cpu_throttled_s(self) -> float:
        return 0.0

    def swap_usage(self) -> int:
        return 0


def test_memory_sampler_peaks_and_windows() -> None:
    from prima_sim.emulate.memory import MemorySampler

    class FakeGroup(_QuietGroup):
        def __init__(self) -> None:
            self.n = 0
            self.full = 0

        def memory_stat(self) -> dict:
            self.full += 1
            return self.memory_light()

        def memory_light(self) -> dict:
            self.n += 1
            return {"anon": 100 * self.n, "file": 7, "usage": 0, "peak": 0, "limit": 1000}

        def io_read_bytes(self, device: str | None = None) -> int:
            return 10 * self.n

        def swap_usage(self) -> int:
            return 5 * self.n

    g = FakeGroup()
    s = MemorySampler({"A": g}, interval_s=0.01).start()  # type: ignore[dict-item]
    time.sleep(0.1)
    peaks = s.stop()
    assert g.full == 2, "memory.stat (which flushes the kernel's statistics) is read only at start and stop"
    assert peaks["A"].anon >= 300 and peaks["A"].file == 7 and peaks["A"].limit == 1000
    assert peaks["A"].pressure == peaks["A"].anon / 1000
    assert peaks["A"].swap >= 15  # the swapped-out peak is sampled with the light reads
    tl = s.timeline["A"]
    assert s.io_between("A", tl[1][0], tl[3][0]) == tl[3][3] - tl[1][3]
    assert s.anon_peak_between("A", tl[0][0], tl[2][0]) == tl[2][1]


def test_memory_sampler_lists_at_stop() -> None:
    """The file LRU lists of a device after a run (a cgroup v1 ``memory.stat``: the hierarchical ``total_*`` fields),
    and the refaults and major faults of the run, from the two full reads only."""
    from prima_sim.emulate.memory import MemorySampler

    class FakeGroup(_QuietGroup):
        reads = iter([
            {"anon": 1, "total_active_file": 1 << 20, "total_inactive_file": 2 << 20, "active_file": 5,
             "total_workingset_refault_file": 100, "total_pgmajfault": 7},
            {"anon": 1, "total_active_file": 120 << 20, "total_inactive_file": 60 << 20, "active_file": 5,
             "total_workingset_refault_file": 50100, "total_pgmajfault": 907},
        ])  # fmt: skip

        def memory_stat(self) -> dict:
            return next(self.reads)

        def memory_light(self) -> dict:
            return {"anon": 1, "file": 0, "usage": 0, "limit": 0}

    s = MemorySampler({"A": FakeGroup()}, interval_s=0.01).start()  # type: ignore[dict-item]
    assert s.lists_at_stop("A") == {}  # not stopped yet
    s.stop()
    assert s.lists_at_stop("A") == {"active_file": 120 << 20, "inactive_file": 60 << 20, "refault_file": 50000,
                                    "pgmajfault": 900}  # fmt: skip


@pytest.mark.root
@needs_root
def test_cleanup_removes_a_crashed_runs_disk(tmp_path: Path) -> None:
    from prima_sim.emulate.cleanup import cleanup_leftovers
    from tests.factories import crashed_run_disk

    img, dev = crashed_run_disk(tmp_path, "fedcb8", 64 << 20)
    found, problems = cleanup_leftovers()
    assert dev in found["disks"] and not problems
    assert str(img) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert not img.exists()


def test_prefetch_advice_is_chunked_to_the_readahead_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One WILLNEED reads at most one readahead window on Linux: the executor's prefetch (a hook added for the
    emulation) advises a window chunk by chunk, covering it exactly."""
    from prima_sim.exec import ring

    f = tmp_path / "w.gguf"
    f.write_bytes(b"\0" * 100_000)
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n)))
    monkeypatch.setattr(ring, "advice_chunk", lambda fd: 16384)
    p = ring.Prefetcher(True)
    p.register(f, 4096)
    p.advise(f)
    p.close()
    assert calls[0][0] == 4096 and all(n <= 16384 for _, n in calls)
    assert sum(n for _, n in calls) == 100_000 - 4096
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))


def test_the_emulated_disk_has_room_for_the_stock_twins_model() -> None:
    """paper-claim (three plans, one of them a one-device baseline with its stock llama.cpp twin) ran out of room on
    its emulated disk copying the twin's original GGUF: the disk must count it."""
    from prima_sim.emulate.emulator import disk_plans
    from prima_sim.emulate.scenario import load_scenario

    sc = load_scenario("paper-claim")
    assert sc.run.single
    assert disk_plans(sc) == len(sc.run.schedulers) + len(sc.run.manual) + 2 * len(sc.run.single)
    assert disk_plans(sc) > len(sc.run.schedulers) + len(sc.run.manual) + len(sc.run.single)


def test_blkio_read_bytes_counts_reads_of_one_device_or_all(tmp_path: Path) -> None:
    from prima_sim.emulate.cgroups import blkio_read_bytes

    f = tmp_path / "blkio.throttle.io_service_bytes"
    f.write_text("7:0 Read 4096\n7:0 Write 512\n8:0 Read 100\n7:0 Total 4608\nTotal 4708\n")
    assert blkio_read_bytes(f, "7:0") == 4096
    assert blkio_read_bytes(f) == 4196
    assert blkio_read_bytes(tmp_path / "missing") == 0
