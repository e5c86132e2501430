"""Emulated devices with swap: the scenario field, its validation, the cgroup limits and the swap file's lifecycle
(creation, teardown, cleanup of a crashed run's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from prima_sim.emulate import cgroups, swap
from prima_sim.emulate.scenario import Scenario, load_scenario
from prima_sim.errors import EmulationError, InputError
from prima_sim.schema import validate_model
from prima_sim.testing import smollm2_path
from prima_sim.units import MiB
from tests.test_emulate import ROOT_TOOLS, _fake_tree

needs_swap_tools = pytest.mark.skipif(
    not (ROOT_TOOLS and all(shutil.which(t) for t in ("mkswap", "swapon", "swapoff"))),
    reason="needs root, loop devices, mkfs.ext4 and mkswap/swapon/swapoff",
)


def _scenario(**dev_over: object) -> dict:
    d2 = {"name": "C", "memory": "200 MiB", "swap": "256MiB"}
    d2.update(dev_over)
    return {
        "name": "t",
        "model": {"gguf": str(smollm2_path())},
        "devices": [{"name": "A", "memory": "512 MiB"}, d2],
    }


# --- the scenario field ---------------------------------------------------------------------------------------
def test_swap_parses_and_sums() -> None:
    sc = validate_model(Scenario, _scenario(), "t")
    assert sc.device("C").swap == 256 * MiB and sc.device("A").swap == 0
    assert sc.swap_bytes == 256 * MiB


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"os": "android"}, "swap is emulated for os = 'linux' only"),
        ({"os": "macos"}, "swap is emulated for os = 'linux' only"),
        ({"swap": "1 MiB"}, "between 16 MiB and 16 GiB"),
        ({"swap": "17 GiB"}, "between 16 MiB and 16 GiB"),
        ({"swap": "lots"}, "swap"),
        ({"swap": -5}, "swap"),
    ],
)
def test_swap_errors(over: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        validate_model(Scenario, _scenario(**over), "t")


def test_swap_needs_the_emulated_disk() -> None:
    data = _scenario()
    data["disk"] = {"emulated": False}
    with pytest.raises(InputError, match=r"C have swap: it needs \[disk\] emulated = true"):
        validate_model(Scenario, data, "t")
    data["devices"][1]["swap"] = 0
    assert validate_model(Scenario, data, "t").swap_bytes == 0


def test_bad_swap_is_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text(
        f'name = "x"\n[model]\ngguf = "{smollm2_path()}"\n[[devices]]\nname = "A"\nmemory = "1 GiB"\n'
        'os = "android"\nswap = "1 GiB"\n'
    )
    with pytest.raises(InputError) as ei:
        load_scenario(f)
    msg = str(ei.value)
    assert "devices" in msg and "linux" in msg and len(msg.splitlines()) == 1


def test_bundled_swap_scenario() -> None:
    sc = load_scenario("swap-device")
    swapping = [d for d in sc.devices if d.swap]
    assert len(sc.devices) == 3 and len(swapping) == 1
    assert swapping[0].os == "linux" and sc.disk.emulated


def test_profile_key_changes_only_with_swap() -> None:
    from prima_sim.devices.model import model_profile_from_gguf
    from prima_sim.emulate.calibrate import profile_key

    sc = validate_model(Scenario, _scenario(), "t")
    model = model_profile_from_gguf(smollm2_path())
    c = sc.device("C")
    no_swap = c.model_copy(update={"swap": 0})
    assert profile_key(c, model, True) != profile_key(no_swap, model, True)
    # a device without swap keeps the key it had before the field existed (cached profiles stay valid)
    assert "swap" not in no_swap.model_dump(exclude_defaults=True)


# --- cgroup limits --------------------------------------------------------------------------------------------
def test_v1_swap_limits(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, [("cgroup", "/sys/fs/cgroup/memory", "memory")])
    cgs = cgroups.Cgroups("prima-abcdef", root=root, require_root=False)
    g, h = cgs.create("swapper"), cgs.create("plain")
    for grp in (g, h):
        for f in ("memory.memsw.limit_in_bytes", "memory.swappiness"):
            (grp.dirs["memory"] / f).write_text("")
    g.set_memory_limit(200 * MiB, 256 * MiB)
    h.set_memory_limit(512 * MiB)
    mg, mh = g.dirs["memory"], h.dirs["memory"]
    assert (mg / "memory.limit_in_bytes").read_text() == str(200 * MiB)
    assert (mg / "memory.memsw.limit_in_bytes").read_text() == str(456 * MiB)
    assert (mg / "memory.swappiness").read_text() == "60"
    assert (mh / "memory.memsw.limit_in_bytes").read_text() == str(512 * MiB)
    assert (mh / "memory.swappiness").read_text() == "0"
    (mg / "memory.memsw.usage_in_bytes").write_text(str(300 * MiB))
    (mg / "memory.usage_in_bytes").write_text(str(190 * MiB))
    assert g.swap_usage() == 110 * MiB
    assert h.swap_usage() == 0  # no usage files: nothing swapped
    # a group that may not swap: the two usages, read one after the other, differ by the per-CPU charge batches
    (mh / "memory.memsw.usage_in_bytes").write_text(str(300 * MiB + (192 << 10)))
    (mh / "memory.usage_in_bytes").write_text(str(300 * MiB))
    assert h.swap_usage() == 0


def test_v1_swap_without_accounting_is_a_clear_error(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, [("cgroup", "/sys/fs/cgroup/memory", "memory")])
    g = cgroups.Cgroups("prima-abcdef", root=root, require_root=False).create("d")
    with pytest.raises(EmulationError, match="swapaccount=1"):
        g.set_memory_limit(200 * MiB, 64 * MiB)


def test_v2_swap_limits(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path, [("cgroup2", "/sys/fs/cgroup", "nsdelegate")], "memory")
    cgs = cgroups.Cgroups("prima-abcdef", root=root, require_root=False)
    g, h = cgs.create("swapper"), cgs.create("plain")
    for grp in (g, h):
        (grp.dirs["memory"] / "memory.swap.max").write_text("max")
    g.set_memory_limit(200 * MiB, 256 * MiB)
    h.set_memory_limit(512 * MiB)
    assert (g.dirs["memory"] / "memory.swap.max").read_text() == str(256 * MiB)
    assert (h.dirs["memory"] / "memory.swap.max").read_text() == "0"
    (g.dirs["memory"] / "memory.swap.current").write_text("4096\n")
    assert g.swap_usage() == 4096


# --- /proc/swaps ------------------------------------------------------------------------------------------------
def test_leftover_swaps_by_name(tmp_path: Path) -> None:
    f = tmp_path / "swaps"
    f.write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/var/tmp/x/prima-abc123-disk/prima-abc123.swap file\t\t262140\t\t0\t\t-2\n"
        "/var/tmp/y/prima-def456-disk/prima-def456.swap file\t\t262140\t\t0\t\t-3\n"
        "/dev/sda2                               partition\t8388604\t\t0\t\t-4\n"
        "/swap\\040file                          file\t\t1024\t\t0\t\t-5\n"
    )
    assert swap.active_swaps(f)[-1] == "/swap file"
    assert swap.leftover_swaps({"def456"}, f) == ["/var/tmp/x/prima-abc123-disk/prima-abc123.swap"]
    assert swap.leftover_swaps(set(), tmp_path / "missing") == []
    flag = tmp_path / "enabled"
    flag.write_text("N\n")
    assert not swap.zswap_enabled(flag)
    flag.write_text("Y\n")
    assert swap.zswap_enabled(flag)


# --- as root: a real swap file -----------------------------------------------------------------------------------
@pytest.mark.root
@needs_swap_tools
def test_swap_file_on_the_emulated_disk_goes_away(tmp_path: Path) -> None:
    from prima_sim.emulate.disk import EmulatedDisk
    from prima_sim.emulate.resources import Registry

    with Registry() as reg:
        disk = EmulatedDisk(reg, tmp_path, 256 << 20)
        mnt = disk.create()
        sw = swap.SwapFile(reg, mnt, 32 * MiB)
        path = sw.create()
        assert os.path.realpath(path) in swap.active_swaps()
    assert os.path.realpath(path) not in swap.active_swaps()
    assert not path.exists() and disk.device not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True
    ).stdout.split(":")


@pytest.mark.root
@needs_swap_tools
def test_cleanup_turns_a_crashed_runs_swap_off(tmp_path: Path) -> None:
    from prima_sim.emulate.cleanup import cleanup_leftovers
    from tests.factories import crashed_run_disk

    rid = "fedcb7"
    img, dev = crashed_run_disk(tmp_path, rid, 128 << 20)
    mnt = tmp_path / f"prima-{rid}-disk"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    subprocess.run(["mount", dev, str(mnt)], check=True)
    sw = mnt / f"prima-{rid}.swap"
    with sw.open("wb") as fh:
        fh.write(bytes(16 * MiB))
    sw.chmod(0o600)
    subprocess.run(["mkswap", str(sw)], check=True, capture_output=True)
    subprocess.run(["swapon", str(sw)], check=True)
    found, problems = cleanup_leftovers()
    assert not problems, problems
    assert os.path.realpath(sw) in [os.path.realpath(s) for s in found["swap"]] and dev in found["disks"]
    assert os.path.realpath(sw) not in swap.active_swaps()
    assert not img.exists()


def test_executor_footprint_is_swappable_on_a_device_with_swap() -> None:
    from prima_sim.emulate.calibrate import with_executor_overhead
    from tests.factories import device

    plain = device("A", ram_total_bytes=200 * MiB, ram_available_bytes=180 * MiB)
    swapping = plain.model_copy(update={"swap_total_bytes": 256 * MiB, "swap_available_bytes": 256 * MiB})
    a = with_executor_overhead(plain, 200 * MiB, 33 * MiB, is_head=False)
    b = with_executor_overhead(swapping, 200 * MiB, 33 * MiB, is_head=False)
    assert a.ram_available_bytes == b.ram_available_bytes == 167 * MiB
    assert a.swappable_bytes == 0 and "swappable_bytes" not in a.sources
    assert b.swappable_bytes == 33 * MiB and "swap out" in b.sources["swappable_bytes"]


def test_testbed_turns_swap_on_once_and_limits_each_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The testbed's glue without root: one swap file of the devices' total on the emulated disk, registered after the
    disk (so torn down before it), the swapping device's group limited to memory + swap, the others to memory."""
    from prima_sim.emulate import testbed as tbm
    from prima_sim.emulate.resources import Registry

    made: list[tuple[Path, int]] = []

    class FakeSwap:
        def __init__(self, reg: Registry, directory: Path, size: int) -> None:
            self.reg, self.path, self.size = reg, directory / swap.swap_name(reg.prefix), size

        def create(self) -> Path:
            made.append((self.path, self.size))
            self.reg.add("swap", str(self.path), lambda: None)
            return self.path

    class FakeDisk:
        mountpoint = tmp_path / "mnt"
        device = "/dev/loop99"
        majmin = "7:99"

    limits: dict[str, tuple[int, int]] = {}

    class FakeGroup:
        def __init__(self, name: str) -> None:
            self.name = name

        def set_memory_limit(self, nbytes: int, swap_bytes: int = 0) -> None:
            limits[self.name] = (nbytes, swap_bytes)

        def set_read_bps(self, dev: str, bps: float) -> None:
            pass

    class FakeCgroups:
        def __init__(self, parent: str, need: object = ()) -> None:
            pass

        def create(self, name: str) -> FakeGroup:
            return FakeGroup(name)

        def remove_all_or_raise(self) -> None:
            pass

    class FakeNetwork:
        def __init__(self, reg: Registry) -> None:
            self.nodes: dict[str, object] = {}

        def create(self, names: list[str]) -> None:
            pass

        def shape(self, name: str, peers: dict[str, float]) -> None:
            pass

    monkeypatch.setattr(tbm, "SwapFile", FakeSwap)
    monkeypatch.setattr(tbm.cg, "Cgroups", FakeCgroups)
    monkeypatch.setattr(tbm, "Network", FakeNetwork)
    monkeypatch.setattr(tbm, "zswap_enabled", lambda: False)
    sc = validate_model(Scenario, _scenario(), "t")
    tb = tbm.Testbed(sc, tmp_path, model_bytes=1 << 20, n_plans=1, say=lambda m: None)
    tb.disk = FakeDisk()  # type: ignore[assignment]
    tb.setup_swap()
    tb.setup_devices()
    assert made == [(tmp_path / "mnt" / f"{tb.reg.prefix}.swap", 256 * MiB)]
    assert limits == {"A": (512 * MiB, 0), "C": (200 * MiB, 256 * MiB)}
    kinds = [i.kind for i in tb.reg.items]
    assert kinds.index("swap") < kinds.index(
        "cgroups"
    )  # torn down (newest first) after the groups, before the disk
    assert any("refault test" in n for n in tb.notes)
    tb.reg.teardown()
