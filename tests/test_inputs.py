"""Validation where data enters: one clear line naming file, field and fix; exit status 2; no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prima_sim.devices.cluster import load_cluster, load_device
from prima_sim.devices.gguf_file import read_gguf
from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.errors import InputError
from prima_sim.plan import Plan
from prima_sim.units import parse_bandwidth, parse_bytes, parse_seconds

GOOD_DEVICE = """
name = "box"
os = "linux"
cores = 8
cpu_flops = { f32 = "100 GFLOPS", q4_k = "300 GFLOPS" }
memory_bandwidth_bps = "20 GB/s"
ram_total_bytes = "16 GiB"
ram_available_bytes = "8 GiB"
disk_seq_read_bps = "2 GB/s"
disk_rand_read_bps = "500 MB/s"
[provenance]
kind = "spec"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_sim.cli.main", *args], capture_output=True, text=True)


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


def test_units_parse_and_reject_wrong_dimensions() -> None:
    assert parse_bytes("8 GiB") == 8 * 2**30
    assert parse_bandwidth("610 Mbps") == pytest.approx(610e6 / 8)
    assert parse_bandwidth("2.98 GB/s") == pytest.approx(2.98e9)
    assert parse_seconds("5 ms") == pytest.approx(0.005)
    with pytest.raises(ValueError, match="not a bandwidth"):
        parse_bandwidth("2 GB")
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_bytes(-1)


def test_good_device_loads(tmp_path: Path) -> None:
    d = load_device(str(write(tmp_path, "box.toml", GOOD_DEVICE)))
    assert d.ram_available_bytes == 8 * 2**30 and d.disk_seq_read_bps == 2e9


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (lambda s: s.replace("cores = 8\n", ""), "cores", "required but missing"),
        (lambda s: s + 'colour = "red"\n', "colour", "not a known field"),
        (lambda s: s.replace('"20 GB/s"', '"20 GB"'), "memory_bandwidth_bps", "not a bandwidth"),
        (lambda s: s.replace('"2 GB/s"', "-2"), "disk_seq_read_bps", "cannot be negative"),
        (lambda s: s.replace("cores = 8", 'cores = "many"'), "cores", "integer"),
        (lambda s: s.replace('os = "linux"', 'os = "plan9"'), "os", "linux"),
        (lambda s: s.replace('"8 GiB"', '"32 GiB"'), "", "exceeds ram_total_bytes"),
        (lambda s: s.replace("q4_k =", "q4_x ="), "cpu_flops", "unknown ggml type"),
    ],
)
def test_bad_device_fields_are_named(tmp_path: Path, edit: object, field: str, message: str) -> None:
    p = write(tmp_path, "box.toml", edit(GOOD_DEVICE))  # type: ignore[operator]
    with pytest.raises(InputError) as info:
        load_device(str(p))
    err = info.value
    assert str(p) in str(err)
    assert field in err.field
    assert message in str(err)
    assert "\n" not in str(err)


def test_cluster_naming_an_unknown_device(tmp_path: Path) -> None:
    write(tmp_path, "box.toml", GOOD_DEVICE)
    p = write(tmp_path, "c.toml", 'name = "c"\ndevices = ["box", "nosuchdevice"]\n')
    with pytest.raises(InputError, match=r"devices\[1\].*unknown device 'nosuchdevice'"):
        load_cluster(str(p))


def test_cluster_link_to_unknown_device_and_bad_head(tmp_path: Path) -> None:
    write(tmp_path, "box.toml", GOOD_DEVICE)
    p = write(tmp_path, "c.toml", 'name = "c"\ndevices = ["box"]\n[[links]]\na = "box"\nb = "ghost"\n'
                                  'bandwidth_bps = "1 Gbps"\nlatency_s = "1 ms"\n')  # fmt: skip
    with pytest.raises(InputError, match="unknown device 'ghost'"):
        load_cluster(str(p))
    p = write(tmp_path, "c2.toml", 'name = "c"\ndevices = ["box"]\nhead = "ghost"\n')
    with pytest.raises(InputError, match="head 'ghost'"):
        load_cluster(str(p))


def test_cluster_with_no_device(tmp_path: Path) -> None:
    p = write(tmp_path, "c.toml", 'name = "c"\ndevices = []\n')
    with pytest.raises(InputError, match="non-empty list"):
        load_cluster(str(p))


def test_plan_errors(tmp_path: Path) -> None:
    good = {"model_id": "m", "n_layers": 4, "cluster_name": "c", "k": 1, "n_ctx": 64, "scheduler": "manual",
            "devices": [{"name": "a", "window": 2, "gpu_layers": 0, "layers": [[2, 4]]},
                        {"name": "b", "window": 2, "gpu_layers": 0, "layers": [[0, 2]]}]}  # fmt: skip
    p = write(tmp_path, "p.json", json.dumps(good))
    assert Plan.load(p).n_layers == 4
    bad = json.loads(json.dumps(good))
    bad["devices"][1]["layers"] = [[0, 3]]
    bad["devices"][1]["window"] = 3
    with pytest.raises(InputError, match="overlap"):
        Plan.load(write(tmp_path, "p2.json", json.dumps(bad)))
    bad = dict(good, schema_version=9)
    with pytest.raises(InputError, match="schema_version"):
        Plan.load(write(tmp_path, "p3.json", json.dumps(bad)))
    with pytest.raises(InputError, match="not valid JSON"):
        Plan.load(write(tmp_path, "p4.json", "{not json"))


def test_not_gguf_and_truncated_gguf(tmp_path: Path, smollm2: Path) -> None:
    with pytest.raises(InputError, match="is not a GGUF file"):
        read_gguf(write(tmp_path, "x.gguf", "hello, not a model"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[:5_000_000])
    with pytest.raises(InputError, match="truncated GGUF"):
        model_profile_from_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(smollm2.read_bytes()[:2000])
    with pytest.raises(InputError, match="truncated GGUF"):
        read_gguf(head)


@pytest.mark.parametrize(
    "args",
    [
        ("plan", "--cluster", "no-such-cluster"),
        ("plan", "--model", "no-such-model"),
        ("plan", "--k", "3"),
        ("plan", "--windows", "1,2"),
        ("plan", "--windows", "a,b"),
        ("model-info", "/nonexistent/model.gguf"),
    ],
)
def test_cli_errors_are_one_line_exit_2_no_traceback(args: tuple[str, ...]) -> None:
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], out.stderr


def test_cli_error_leaves_an_existing_output_intact(tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    assert run_cli("plan", "--out", str(out_file), "--json").returncode == 0
    before = out_file.read_bytes()
    assert run_cli("plan", "--out", str(out_file), "--k", "3").returncode == 2
    assert out_file.read_bytes() == before


# --- junk thrown at every loader: only InputError may come out ----------------------------------------
junk_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["name", "os", "cores", "cpu_flops", "memory_bandwidth_bps", "ram_total_bytes",
                               "ram_available_bytes", "disk_seq_read_bps", "disk_rand_read_bps", "provenance",
                               "gpu", "devices", "head", "links", "default_link", "n_layers", "k", "layers"])  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(field_names, junk_values, max_size=8), st.sampled_from(["device", "cluster", "plan"]))
def test_junk_structures_only_raise_input_error(tmp_path: Path, data: dict, kind: str) -> None:
    base = tomllib.loads(GOOD_DEVICE) if kind == "device" else {}
    base.update(data)
    p = tmp_path / f"{kind}.json"
    p.write_text(json.dumps(base, default=str), encoding="utf-8")
    loader = {"device": lambda: load_device(str(p)), "cluster": lambda: load_cluster(str(p)),
              "plan": lambda: Plan.load(p)}[kind]  # fmt: skip
    try:
        loader()
    except InputError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096), st.sampled_from(["x.gguf", "x.toml", "x.json"]))
def test_junk_bytes_only_raise_input_error(tmp_path: Path, blob: bytes, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(
        (b"GGUF\x03\x00\x00\x00" + blob) if name.endswith(".gguf") and blob[:1] == b"\x00" else blob
    )
    loaders = {"x.gguf": lambda: model_profile_from_gguf(p), "x.toml": lambda: load_device(str(p)),
               "x.json": lambda: load_cluster(str(p))}  # fmt: skip
    with pytest.raises(InputError):
        loaders[name]()
