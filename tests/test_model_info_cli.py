"""``prima-sim model-info``: GGUF files and catalog ids, text and JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prima_sim.cli.main import main
from prima_sim.devices.gguf_file import read_gguf


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["model-info", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_gguf_json_matches_the_files_tensor_bytes_exactly(
    capsys: pytest.CaptureFixture[str], smollm2: Path
) -> None:
    rc, out, err = _run(capsys, str(smollm2), "--json")
    assert rc == 0 and err == ""
    s = json.loads(out)
    g = read_gguf(smollm2)
    assert s["total_bytes"] == sum(t.n_bytes for t in g.tensors) == 96_576_768
    assert [(t["name"], t["ggml_type"], tuple(t["shape"]), t["n_bytes"]) for t in s["tensors"]] == [
        (t.name, t.ggml_type, t.shape, t.n_bytes) for t in g.tensors
    ]
    assert s["quant"] == "Q4_1"
    assert s["arch"]["n_layer"] == 30 and s["arch"]["tied_embeddings"] is True
    assert len(s["layer_bytes"]) == 30
    assert s["min_layer_bytes"] <= s["mean_layer_bytes"] <= s["max_layer_bytes"]
    # 49152 x 576 embedding in Q8_0 (34 bytes per 32), the 30 layers' matrices in Q4_1 (20 bytes per 32)
    q4_1 = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) // 32 * 20
    assert s["bytes_by_type"] == {"f32": 4 * 576 * 61, "q4_1": q4_1, "q8_0": 49152 * 576 // 32 * 34}


def test_gguf_text(capsys: pytest.CaptureFixture[str], gemma3: Path) -> None:
    rc, out, _ = _run(capsys, str(gemma3), "--tensors")
    assert rc == 0
    assert "gemma3: 18 layers, n_embd 640" in out
    assert "246.59 MB" in out  # 246,587,904 bytes, the sum of the file's tensors
    assert "sliding window 512 tokens on 15 of 18 layers" in out
    assert "blk.17.post_ffw_norm.weight" in out


def test_catalog_id_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "llama3-70b")
    assert rc == 0
    assert "llama3-70b-q4_k_m" in out and "catalog:llama3-70b" in out
    assert "42.513 GB" in out
    assert "q5_k" in out  # the 70B attn_v bump
    rc, out, _ = _run(capsys, "qwen2.5-72b-q6_k", "--json")
    s = json.loads(out)
    assert rc == 0 and s["id"] == "qwen2.5-72b-q6_k" and s["quant"] == "Q6_K"
    assert s["bytes_by_type"]["q8_0"] > 0  # ffn_down falls back from Q6_K to Q8_0


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "--list")
    assert rc == 0
    for entry in ("llama3-8b", "llama3-70b", "qwq-32b", "deepseek-r1-distill-llama-70b"):
        assert entry in out
    rc, out, _ = _run(capsys, "--list", "--json")
    rows = {r["id"]: r for r in json.loads(out)["models"]}
    assert rows["llama3-70b"]["bytes"]["q4_k_m"] == 42_512_531_456


def _assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("prima-sim model-info: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in err


def test_not_a_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "notes.gguf"
    p.write_text("hello, I am text\n")
    _assert_one_line_error(*_run(capsys, str(p)), str(p), "is not a GGUF file", "expected b'GGUF'")


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path, smollm2: Path, cut: str) -> None:
    g = read_gguf(smollm2)
    n = 300 if cut == "header" else g.data_offset + 4096
    p = tmp_path / "cut.gguf"
    with smollm2.open("rb") as src:
        p.write_bytes(src.read(n))
    _assert_one_line_error(*_run(capsys, str(p)), str(p), "truncated GGUF", "re-download")


def test_missing_file_and_unknown_id(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _assert_one_line_error(*_run(capsys, str(tmp_path / "absent.gguf")), "absent.gguf", "file not found")
    _assert_one_line_error(*_run(capsys, "llama3-71b"), "llama3-71b", "not a catalog model", "llama3-70b")
    _assert_one_line_error(*_run(capsys), "MODEL", "is required")


def test_console_error_has_no_traceback(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00")
    r = subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "model-info", str(p)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "truncated GGUF" in r.stderr and "Traceback" not in r.stderr
