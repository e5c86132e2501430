"""The documented file formats: generated docs are current, schemas accept every shipped file, and the loaders'
messages for hand-written files (unknown keys, case, omitted provenance, the default link) are the ones the
docs promise."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from prima_sim.devices.cluster import bundled_names, datasets_root, load_cluster, load_device
from prima_sim.emulate.scenario import load_scenario
from prima_sim.errors import InputError
from prima_sim.exec.hosts import load_hosts
from prima_sim.formats import FORMATS, json_schema, markdown

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "datasets" / "examples"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prima_sim.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_docs_formats_md_is_generated_from_the_models() -> None:
    page = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")
    assert page == markdown(), "docs/formats.md is stale: prima-sim schema --markdown > docs/formats.md"


@pytest.mark.parametrize("kind", list(FORMATS))
def test_every_field_is_documented(kind: str) -> None:
    schema = json_schema(kind)
    for obj in [schema, *schema.get("$defs", {}).values()]:
        for name, prop in obj.get("properties", {}).items():
            if name != "schema_version":
                assert prop.get("description"), f"{kind}: {obj.get('title')}.{name} has no description"


def _files(kind: str) -> list[Path]:
    folder = {"device": "devices", "cluster": "clusters", "scenario": "scenarios"}[kind]
    return sorted((ROOT / "datasets" / folder).glob("*.toml"))


@pytest.mark.parametrize("kind", ["device", "scenario"])
def test_schema_accepts_every_shipped_file(kind: str) -> None:
    validator = jsonschema.Draft202012Validator(json_schema(kind))
    files = _files(kind) + ([EXAMPLES / f"{n}.toml" for n in ("desktop", "mac", "laptop", "phone")]
                            if kind == "device" else [])  # fmt: skip
    for f in files:
        errors = [e.message for e in validator.iter_errors(tomllib.loads(f.read_text(encoding="utf-8")))]
        assert not errors, f"{f.name}: {errors[:3]}"


def test_cluster_and_hosts_schemas_accept_the_examples_and_reject_typos() -> None:
    for kind, files in (
        ("cluster", [*_files("cluster"), EXAMPLES / "home.toml"]),
        ("hosts", [EXAMPLES / "hosts.toml"]),
    ):
        validator = jsonschema.Draft202012Validator(json_schema(kind))
        for f in files:
            data = tomllib.loads(f.read_text(encoding="utf-8"))
            assert not list(validator.iter_errors(data)), f.name
        bad = dict(tomllib.loads(files[0].read_text(encoding="utf-8")), colour="red")
        assert list(validator.iter_errors(bad))


def test_schema_command_prints_json_and_rejects_unknown_kinds() -> None:
    out = cli("schema", "Device")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["properties"]["ram_total_bytes"]["x-unit"] == "bytes"
    out = cli("schema", "devices")
    assert (
        out.returncode == 2 and "give one of device, cluster" in out.stderr and "Traceback" not in out.stderr
    )


def test_examples_load_and_plan(tmp_path: Path) -> None:
    home = load_cluster("examples/home")
    assert [d.name for d in home.devices] == ["desktop", "mac", "laptop", "phone"]
    assert home.device("mac").is_metal and home.device("phone").gpu is None
    assert load_hosts(EXAMPLES / "hosts.toml").devices["phone"].host == "192.168.1.13"
    assert "home" in bundled_names("examples") and (datasets_root() / "examples" / "home.toml").is_file()
    out = cli("plan", "--cluster", "examples/home", "--model", "qwen2.5-32b", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plan"]["cluster_source"] == "examples/home"


def test_init_copies_the_example_home_and_never_overwrites(tmp_path: Path) -> None:
    out = cli("init", str(tmp_path / "myhome"))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "myhome").iterdir())
    assert names == ["desktop.toml", "home.toml", "hosts.toml", "laptop.toml", "mac.toml", "phone.toml"]
    assert load_cluster(str(tmp_path / "myhome" / "home.toml")).name == "home"
    (tmp_path / "myhome" / "mac.toml").write_text("# mine\n", encoding="utf-8")
    out = cli("init", str(tmp_path / "myhome"))
    assert out.returncode == 2 and "already has" in out.stderr
    assert (tmp_path / "myhome" / "mac.toml").read_text(encoding="utf-8") == "# mine\n"


HAND_WRITTEN = """
name = "box"
os = "Linux"
cores = 4
memory_bandwidth_bps = "20 GB/s"
ram_total_bytes = "16 GiB"
ram_available_bytes = "8 GiB"
disk_seq_read_bps = "2 GB/s"
disk_rand_read_bps = "500 MB/s"
[cpu_flops]
F32 = "100 GFLOPS"
Q4_K = "300 GFLOPS"
[gpu]
kind = "CUDA"
vram_total_bytes = "8 GiB"
vram_free_bytes = "7 GiB"
memory_bandwidth_bps = "300 GB/s"
flops = { f32 = "5 TFLOPS" }
"""


def test_hand_written_device_needs_no_provenance_and_ignores_case(tmp_path: Path) -> None:
    p = tmp_path / "box.toml"
    p.write_text(HAND_WRITTEN, encoding="utf-8")
    d = load_device(str(p))
    assert d.provenance.kind == "manual"
    assert d.os == "linux" and d.gpu is not None and d.gpu.kind == "cuda"
    assert set(d.cpu_flops) == {"f32", "q4_k"}


@pytest.mark.parametrize(
    ("old", "new", "field", "hint"),
    [
        ("ram_total_bytes", "ram_totl_bytes", "ram_totl_bytes", "did you mean 'ram_total_bytes'"),
        (
            'vram_free_bytes = "7 GiB"',
            'vram_fre_bytes = "7 GiB"',
            "gpu.vram_fre_bytes",
            "did you mean 'vram_free_bytes'",
        ),
        ("cores = 4", 'cores = 4\ncolour = "red"', "colour", "known fields here"),
        ("F32 =", "F32 = 1\nf32 =", "cpu_flops", "repeat when case is ignored"),
    ],
)
def test_misspelled_keys_are_named_as_unknown(
    tmp_path: Path, old: str, new: str, field: str, hint: str
) -> None:
    p = tmp_path / "box.toml"
    p.write_text(HAND_WRITTEN.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_device(str(p))
    assert info.value.field == field
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_scenario_enums_ignore_case(tmp_path: Path) -> None:
    text = (ROOT / "datasets" / "scenarios" / "fits-in-memory.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    p = tmp_path / "s.toml"
    edited = text.replace(f'quant = "{data["model"]["quant"]}"', 'quant = "q4_0"')
    assert 'quant = "q4_0"' in edited
    p.write_text(edited.replace('schedulers = ["', 'schedulers = ["HALDA", "'), encoding="utf-8")
    sc = load_scenario(str(p))
    assert sc.model.quant == "Q4_0" and sc.run.schedulers[0] == "halda"


def test_default_link_is_announced_when_used(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('name = "c"\ndevices = ["D3", "D2", "D4"]\n', encoding="utf-8")
    out = cli("plan", "--cluster", str(tmp_path / "c.toml"), "--model", "llama3-8b", "--json")
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)  # notes go to stderr, stdout stays one JSON object
    assert "note:" in out.stderr and "no [default_link]" in out.stderr and "1 Gbit/s" in out.stderr
    assert "D3-D2" in out.stderr
    (tmp_path / "w.toml").write_text('name = "w"\ndevices = ["D3", "D2"]\n[default_link]\nbandwidth_bps = "400 Mbps"\n'
                                     'latency_s = "5 ms"\n', encoding="utf-8")  # fmt: skip
    out = cli("plan", "--cluster", str(tmp_path / "w.toml"), "--model", "llama3-8b")
    assert out.returncode == 0 and "default_link" not in out.stderr
