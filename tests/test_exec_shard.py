"""Layer-window shards: what each file holds, the manifest, checksums, and the ``shard`` command."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from prima_sim.devices.gguf_file import read_gguf
from prima_sim.errors import InputError
from prima_sim.exec import shard as shard_mod
from prima_sim.exec.shard import (
    MANIFEST_NAME,
    DeviceManifest,
    device_shard_specs,
    file_sha256,
    load_manifest,
    write_shards,
)
from prima_sim.plan import Plan, make_assignments


def make_plan(windows: tuple[int, ...], n_layers: int = 30, gpu: tuple[int, ...] | None = None) -> Plan:
    names = [f"D{i}" for i in range(len(windows))]
    return Plan(model_id="m", n_layers=n_layers, cluster_name="c", k=-(-n_layers // sum(windows)), n_ctx=256,
                devices=make_assignments(names, windows, list(gpu or [0] * len(windows)), n_layers),
                scheduler="manual")  # fmt: skip


@pytest.fixture(scope="module")
def smol_shards(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    plan = make_plan((6, 5, 4))  # k = 2: D1 [0,5) [15,20), D2 [5,9) [20,24), D0 [9,15) [24,30)
    out = tmp_path_factory.mktemp("shards")
    write_shards(smollm2, plan, out)
    return plan, out


def test_specs_follow_the_plan() -> None:
    plan = make_plan((6, 5, 4))
    # the head runs the last layer: its logits window's shard embeds too (no embed.gguf, one token table mapped)
    assert [(s.file, s.kind) for s in device_shard_specs(plan, "D0")] == [
        ("w2_L9-15.gguf", "middle"), ("w5_L24-30.gguf", "logits")]  # fmt: skip
    assert [(s.file, s.kind) for s in device_shard_specs(plan, "D1")] == [
        ("w0_L0-5.gguf", "middle"), ("w3_L15-20.gguf", "middle")]  # fmt: skip
    zero = make_plan((0, 6, 4))
    specs = device_shard_specs(zero, "D0")
    assert [(s.kind, s.output_head) for s in specs] == [("embed", True)]
    gpu = make_plan((6, 5, 4), gpu=(0, 3, 0))
    assert [s.gpu_layers for s in device_shard_specs(gpu, "D1")] == [3, 3]


def test_manifest_lists_every_file_with_checksum(smol_shards) -> None:
    plan, out = smol_shards
    for dev in ("D0", "D1", "D2"):
        man = load_manifest(out / dev, dev, verify=True)
        assert man.plan_fingerprint == plan.fingerprint() and man.plan == plan
        for s in man.shards:
            assert (
                file_sha256(out / dev / s.file) == s.sha256
                and (out / dev / s.file).stat().st_size == s.n_bytes
            )
    assert sorted(p.name for p in (out / "D1").iterdir()) == [MANIFEST_NAME, "w0_L0-5.gguf", "w3_L15-20.gguf"]


def test_manifest_gives_each_layers_data_range_as_the_tensor_table_does(smol_shards) -> None:
    """Drop-behind streaming releases these ranges (exec/stream.py) without reading the GGUF in the worker."""
    from prima_sim.exec.stream import layer_ranges

    _, out = smol_shards
    for dev in ("D0", "D1", "D2"):
        for s in load_manifest(out / dev, dev).shards:
            if s.kind == "embed":
                assert s.layer_data is None
                continue
            n = s.layers[1] - s.layers[0]
            assert s.layer_data is not None and len(s.layer_data) == n
            assert [[r] for r in s.layer_data] == layer_ranges(out / dev / s.file, n)


def test_manifest_plan_is_typed_and_its_json_unchanged(smol_shards) -> None:
    """The manifest's plan is a Plan (validated once, on reading), stored as the plan's own JSON, as before."""
    plan, out = smol_shards
    raw = json.loads((out / "D1" / MANIFEST_NAME).read_text())
    assert raw["plan"] == plan.model_dump(mode="json")
    assert isinstance(load_manifest(out / "D1", "D1").plan, Plan)
    old = {**raw, "plan": {**raw["plan"], "schema_version": 1}}  # a manifest cut by a version writing plan v1
    assert DeviceManifest.model_validate(old).plan == plan
    broken = {**raw, "plan": {**raw["plan"], "n_layers": 31}}
    (out / "bad").mkdir()
    (out / "bad" / MANIFEST_NAME).write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"manifest\.json.*plan"):
        load_manifest(out / "bad")


def test_middle_window_is_vocabulary_free_with_renamed_layers(smol_shards, smollm2) -> None:
    _, out = smol_shards
    g = read_gguf(out / "D2" / "w4_L20-24.gguf")
    src = read_gguf(smollm2)
    assert g.metadata["llama.block_count"] == 4 and g.metadata["llama.vocab_size"] == 1
    assert g.metadata["tokenizer.ggml.model"] == "none" and "tokenizer.ggml.tokens" not in g.metadata
    emb = g.tensor("token_embd.weight")
    assert emb is not None and emb.shape == (576, 1) and emb.ggml_type == "f32"
    assert {t.name.split(".")[1] for t in g.tensors if t.name.startswith("blk.")} == {"0", "1", "2", "3"}
    with open(smollm2, "rb") as a, open(g.path, "rb") as b:  # blk.2 of the shard is blk.22 of the model
        ta, tb = src.tensor("blk.22.ffn_down.weight"), g.tensor("blk.2.ffn_down.weight")
        assert ta and tb and ta.n_bytes == tb.n_bytes
        a.seek(ta.offset)
        b.seek(tb.offset)
        assert a.read(ta.n_bytes) == b.read(tb.n_bytes)
    assert g.metadata["prima.shard.layer_start"] == 20 and g.metadata["prima.shard.kind"] == "middle"


def test_logits_and_embedding_windows_keep_the_vocabulary(smol_shards, smollm2, tmp_path) -> None:
    _, out = smol_shards
    logits = read_gguf(out / "D0" / "w5_L24-30.gguf")
    assert logits.metadata["tokenizer.ggml.model"] == "gpt2" and logits.tensor("token_embd.weight").shape == (
        576,
        49152,
    )
    assert not (out / "D0" / "embed.gguf").exists()
    write_shards(smollm2, make_plan((0, 6, 4)), tmp_path, ["D0"])  # a head without layers: embed.gguf
    emb_path = tmp_path / "D0" / "embed.gguf"
    emb = read_gguf(emb_path)
    assert emb.metadata["llama.block_count"] == 1 and emb.tensor("token_embd.weight").shape == (576, 49152)
    layer = [t for t in emb.tensors if t.name.startswith("blk.0.")]
    with open(emb_path, "rb") as fh:  # the one layer is all zeros ...
        for t in layer:
            fh.seek(t.offset)
            assert not any(fh.read(t.n_bytes))
    st = os.stat(emb_path)  # ... stored as holes: the file takes less disk than its size
    assert st.st_blocks * 512 < st.st_size - sum(t.n_bytes for t in layer) // 2


def test_the_manifest_says_where_each_token_table_lies(smol_shards, smollm2, tmp_path) -> None:
    """The head reads token rows where the manifest says (exec/token_table.py): the logits shard's table and the
    embedding shard's, exactly as the shard's own tensor table has them; middle windows hold none."""
    _, out = smol_shards
    write_shards(smollm2, make_plan((0, 6, 4)), tmp_path, ["D0"])  # with an embed.gguf
    seen = set()
    for d in (out, tmp_path):
        for dev in ("D0", "D1", "D2") if d is out else ("D0",):
            man = load_manifest(d / dev)
            for sh in man.shards:
                t = read_gguf(d / dev / sh.file).tensor("token_embd.weight")
                if sh.kind == "middle":
                    assert sh.token_table is None
                    continue
                assert t is not None and sh.token_table is not None
                assert (sh.token_table.offset, sh.token_table.ggml_type) == (t.offset, t.ggml_type)
                assert (sh.token_table.n_embd, sh.token_table.n_vocab) == (576, 49152)
                seen.add(sh.kind)
    assert seen == {"logits", "embed"}


def test_gemma3_sliding_pattern_follows_global_layer_index(gemma3, tmp_path) -> None:
    plan = make_plan((7, 5, 6), n_layers=18)  # D1 [0,5), D2 [5,11), D0 [11,18)
    write_shards(gemma3, plan, tmp_path, ["D2"])
    g = read_gguf(tmp_path / "D2" / "w1_L5-11.gguf")
    assert g.metadata["gemma3.attention.sliding_window_pattern"] == [i % 6 < 5 for i in range(5, 11)]
    assert g.metadata["gemma3.block_count"] == 6
    assert not (tmp_path / "D0").exists() and not (tmp_path / "D1").exists()


def test_manifest_problems_are_one_line_input_errors(smol_shards, tmp_path) -> None:
    _, out = smol_shards
    import shutil

    d = tmp_path / "D1"
    shutil.copytree(out / "D1", d)
    with pytest.raises(InputError, match="shards are for device 'D1', not 'D2'"):
        load_manifest(d, "D2")
    f = d / "w0_L0-5.gguf"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    load_manifest(d, "D1")  # same size: only the checksum can tell
    with pytest.raises(InputError, match="SHA-256 does not match"):
        load_manifest(d, "D1", verify=True)
    f.write_bytes(bytes(data[:-10]))
    with pytest.raises(InputError, match=r"has .* bytes\), the manifest says"):
        load_manifest(d, "D1")
    f.unlink()
    with pytest.raises(InputError, match="missing"):
        load_manifest(d, "D1")
    with pytest.raises(InputError, match="shard folder not found"):
        load_manifest(tmp_path / "nowhere", "D1")
    with pytest.raises(InputError, match=r"has no shards of D9 \(it holds the shards of D1\): cut them"):
        load_manifest(tmp_path, "D9")


def test_model_that_does_not_fit_the_plan_is_refused(smollm2, tmp_path) -> None:
    with pytest.raises(InputError, match="has 30 layers but the plan was made for 32"):
        write_shards(smollm2, make_plan((16, 16), n_layers=32), tmp_path)
    other = make_plan((10, 20)).model_copy(update={"model_fingerprint": "0123456789abcdef"})
    with pytest.raises(
        InputError,
        match=r"^plan: field 'model_fingerprint': the plan was made for m, not for .*tensor tables differ",
    ):
        write_shards(smollm2, other, tmp_path)  # another quantization of the same architecture, say
    with pytest.raises(InputError, match=r"device 'D7' is not in the plan"):
        write_shards(smollm2, make_plan((10, 20)), tmp_path, ["D7"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match=r"bad\.gguf"):
        write_shards(bad, make_plan((10, 20)), tmp_path)


def test_copy_is_streamed_in_bounded_chunks(smollm2, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shard_mod, "COPY_CHUNK_BYTES", 1 << 20)
    calls: list[int] = []
    tracemalloc.start()
    write_shards(
        smollm2, make_plan((10, 20)), tmp_path, ["D1"], progress=lambda n, total, _l: calls.append(n)
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert max(calls) <= 1 << 20 and sum(calls) > 32 << 20  # many 1 MiB pieces, never a whole tensor
    assert peak < 64 << 20  # the vocabulary's metadata only: Python never holds the 82 MB of tensor data


def test_shard_command(smollm2, tmp_path, capsys) -> None:
    from prima_sim.cli.main import main

    make_plan((10, 20)).save(tmp_path / "plan.json")
    rc = main(["shard", "--plan", str(tmp_path / "plan.json"), "--model", str(smollm2), "--out", str(tmp_path / "o"),
               "--device", "D1", "--quiet", "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res) == ["D1"] and [s["file"] for s in res["D1"]["shards"]] == ["w0_L0-20.gguf"]
    rc = main(
        [
            "shard",
            "--plan",
            str(tmp_path / "nope.json"),
            "--model",
            str(smollm2),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "prima-sim shard: error:" in capsys.readouterr().err


def test_a_separate_token_table_leads_the_logits_shard_and_prefetch_skips_it(tmp_path) -> None:
    """A token reads one row of the table: advising the whole logits window would read it all back into a
    page cache the window needs (measured: the head's first step re-read its window under memory pressure)."""
    from prima_sim.devices.synth import synth_architecture, write_synth_model

    model = tmp_path / "untied.gguf"
    write_synth_model(model, synth_architecture(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=2), "Q4_0",
                      seed=1, progress=False)  # fmt: skip
    src = read_gguf(model)
    assert src.tensor("output.weight") is not None  # separate output head
    plan = make_plan((2, 2), n_layers=4)  # D0 (the head) runs the last window
    write_shards(model, plan, tmp_path / "s", ["D0", "D1"])
    man = load_manifest(tmp_path / "s" / "D0", "D0")
    (logits,) = man.shards
    g = read_gguf(tmp_path / "s" / "D0" / logits.file)
    first = min(g.tensors, key=lambda t: t.offset)
    assert first.name == "token_embd.weight" and first.offset == logits.data_offset
    table_end = first.offset + first.n_bytes
    assert logits.prefetch_offset is not None and table_end <= logits.advise_from < table_end + g.alignment
    assert all(t.offset >= logits.advise_from for t in g.tensors if t.name != "token_embd.weight")
    (middle,) = load_manifest(tmp_path / "s" / "D1", "D1").shards  # a vocabulary-free window: nothing to skip
    assert middle.prefetch_offset is None and middle.advise_from == middle.data_offset
