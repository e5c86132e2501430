"""Layer-window shards: one small GGUF per window a device runs, plus a manifest with checksums.

A device needs only its own shards (a phone never stores the 40 GB model). For every device of a plan,
:func:`write_shards` writes ``OUT/<device>/``:

* ``embed.gguf`` (head only, and only when the head does not run the model's last layer; otherwise its logits
  window's shard, which holds the token table anyway, embeds the tokens too, so the head maps one copy of the
  table and no zero layer: llama.cpp populates every mapped page at load, and an unused copy displaced the
  window's own pages): the *token-embedding window*. llama.cpp refuses a 0-layer model
  (``GGML_ASSERT(n_layer_all > 0)`` aborts the process), so it is a 1-layer GGUF whose layer is all zeros,
  stored as file holes (no disk blocks), plus the tokenizer and ``token_embd.weight``. The head runs it on
  token ids and captures the input of the first norm, the exact layer-0 input (after any architecture's
  scaling, e.g. Gemma's ``sqrt(n_embd)``), then stops the graph: the zero layer is never computed.
* ``w<j>_L<a>-<b>.gguf``: one per window ``[a, b)`` (``j`` = its index in the execution order). Windows that
  feed another window are *vocabulary-free* (``tokenizer.ggml.model = "none"``, ``<arch>.vocab_size = 1``,
  ``token_embd.weight`` an F32 zero tensor of shape [n_embd, 1]); the head's final window is the *logits
  window* and keeps the tokenizer and the output head (``output.weight``, or the tied ``token_embd.weight``).
  When the head does not run the model's last layer (a manual plan with head window 0), ``embed.gguf``
  also keeps ``output.weight`` and doubles as the output head: an all-zero pre-norm residual layer is exactly
  the identity (``x + 0 + 0``), so running it on the final hidden state gives llama.cpp's own output norm
  and logits, bit for bit, at the price of one (zero) layer of compute.
* ``manifest.json``: the plan, its fingerprint, and per file its kind, layer range, GPU layers, size,
  SHA-256 and the offset of its tensor data (the range the worker prefetches).

Layer tensors ``blk.<a+i>.*`` are renamed ``blk.<i>.*``. Per-layer metadata arrays (one entry per layer)
are sliced by *global* layer index; for Gemma 2/3 and Cohere 2, whose sliding-window pattern llama.cpp
derives from the local layer index, the explicit per-layer ``sliding_window_pattern`` array is written.
Tensor data is streamed with ``os.sendfile`` in fixed chunks: memory use does not grow with the model.

Why one module of this size: the shard writer is one half of the on-disk format; the other, the manifest a worker
reads, is :mod:`prima_sim.exec.manifest` (so that a worker does not import ``gguf``), and this module re-exports it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from prima_sim.devices.ggml_types import TYPE_BY_NAME
from prima_sim.devices.gguf_file import read_gguf
from prima_sim.devices.model import model_profile_from_gguf
from prima_sim.errors import InputError
from prima_sim.exec.manifest import (  # noqa: F401  (callers import the reader from here too)
    MANIFEST_NAME,
    DeviceManifest,
    ShardFile,
    ShardKind,
    TokenTableRef,
    file_sha256,
    load_manifest,
    shard_path,
)
from prima_sim.plan import LayerRange, Plan
from prima_sim.schema import atomic_write_text

COPY_CHUNK_BYTES = 64 << 20  # bytes per sendfile call: bounds memory and sets progress granularity
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Architectures whose sliding-window layers llama.cpp derives from a period over the *local* layer index
# (llama-model.cpp: set_swa_pattern(n)): layer il is a sliding-window layer iff il % n < n - 1.
SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}
# Architectures with an input-embedding norm: the 0-layer embedding capture would take the wrong tensor.
_UNSUPPORTED_INPUT_NORM = ("token_embd_norm.weight",)


@dataclass(frozen=True)
class _Spec:
    """What one shard file contains before it is written."""

    file: str
    kind: ShardKind
    layers: LayerRange
    window: int
    gpu_layers: int
    output_head: bool = False


def device_shard_specs(plan: Plan, device: str) -> list[_Spec]:
    """The shards ``device`` needs under ``plan`` (pure function of the plan)."""
    order = plan.execution_order()
    final_owner = order[-1][0]
    dev = plan.device(device)
    specs: list[_Spec] = []
    is_head = device == plan.head
    if is_head and final_owner != device:  # else the logits window's shard embeds (it holds the token table)
        specs.append(_Spec("embed.gguf", "embed", (0, 0), -1, 0, output_head=True))
    for j, (name, rng) in enumerate(order):
        if name != device:
            continue
        kind: ShardKind = "logits" if (is_head and j == len(order) - 1) else "middle"
        specs.append(_Spec(f"w{j}_L{rng[0]}-{rng[1]}.gguf", kind, rng, j, dev.gpu_layers_in(rng)))
    return specs


_SCALAR_FMT = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
               12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path, data_offset: int | None = None) -> dict[str, tuple[Any, Any, Any]]:
    """Every metadata key of a GGUF file with its full value: ``key -> (value, type, element type)``.

    ``gguf.GGUFReader`` builds one numpy view per vocabulary string (seconds and ~200 MB for a 49k-token
    vocabulary); this walks the header once with ``struct``/``numpy`` instead.

    Raises:
        InputError: the file is not GGUF or its header is truncated.
    """
    import struct

    with path.open("rb") as fh:
        buf = fh.read(
            data_offset or read_gguf(path).data_offset
        )  # the header: metadata and tensor table, never weights
        if buf[:4] != b"GGUF":
            raise InputError(str(path), "", "is not a GGUF file")
        pos = 24
        n_kv = struct.unpack_from("<Q", buf, 16)[0]

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            raw = buf[pos + 8 : pos + 8 + n]
            pos += 8 + n
            return raw.decode("utf-8", "replace")

        def value(vt: int) -> Any:
            nonlocal pos
            if vt in _SCALAR_FMT:
                dt = np.dtype(_SCALAR_FMT[vt])
                v = np.frombuffer(buf, dt, 1, pos)[0].item()
                pos += dt.itemsize
                return bool(v) if vt == 7 else v
            if vt == _STRING:
                return string()
            raise InputError(str(path), "", f"corrupt GGUF metadata: unknown value type {vt}")

        out: dict[str, tuple[Any, Any, Any]] = {}
        try:
            for _ in range(n_kv):
                key = string()
                (vt,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if vt == _ARRAY:
                    et, n = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if et in _SCALAR_FMT:
                        dt = np.dtype(_SCALAR_FMT[et])
                        arr = np.frombuffer(buf, dt, n, pos)
                        pos += dt.itemsize * n
                        val: Any = [bool(x) for x in arr] if et == 7 else arr.tolist()
                    else:
                        val = [value(et) for _ in range(n)]
                    out[key] = (val, gguf.GGUFValueType(vt), gguf.GGUFValueType(et))
                else:
                    out[key] = (value(vt), gguf.GGUFValueType(vt), None)
        except (struct.error, ValueError, IndexError) as exc:
            raise InputError(str(path), "", f"truncated or corrupt GGUF metadata: {exc}") from None
    return out


def _swa_array(arch: str, meta: dict[str, Any], rng: LayerRange) -> list[bool] | None:
    """Explicit per-layer sliding-window flags for the shard's layers, by global index."""
    key = f"{arch}.attention.sliding_window_pattern"
    src = meta.get(key)
    if src is not None and isinstance(src[0], list):
        return [bool(x) for x in src[0][rng[0] : rng[1]]]
    period = src[0] if src is not None else SWA_PERIOD.get(arch)
    if period is None or f"{arch}.attention.sliding_window" not in meta:
        return None
    p = int(period)
    return [(i % p) < (p - 1) if p > 0 else False for i in range(rng[0], rng[1])]


class ShardWriter:
    """Writes the shards of one model for one plan.

    Args:
        model: path of the source GGUF.
        plan: the plan the shards are for.
        progress: called with (bytes done, bytes total, label) while data is copied.

    Raises:
        InputError: the model is not a GGUF file, does not match the plan (its layer count, and its tensor table
            where the plan records one: :meth:`Plan.check_model`), or has an unsupported layout.
    """

    def __init__(
        self, model: str | Path, plan: Plan, progress: Callable[[int, int, str], None] | None = None
    ) -> None:
        self.path = Path(model)
        if not self.path.is_file():
            raise InputError(str(model), "", "model file not found")
        self.gguf = read_gguf(self.path)  # validated tensor table (every tensor inside the file)
        self.plan = plan
        self.progress = progress
        self.meta = read_metadata(self.path, self.gguf.data_offset)
        self.arch = str(self.meta.get("general.architecture", ("",))[0])
        if not self.arch:
            raise InputError(str(model), "general.architecture", "is missing: not a llama.cpp model file")
        n_layer = int(self.meta.get(f"{self.arch}.block_count", (0,))[0])
        if n_layer != plan.n_layers:
            raise InputError(
                str(model),
                f"{self.arch}.block_count",
                f"the model has {n_layer} layers but the plan was made for {plan.n_layers}; re-plan for this model",
            )
        # a plan made from a model's tensor table (Plan.check_model): this file must have the same one
        if plan.model_fingerprint:
            plan.check_model(model_profile_from_gguf(self.path), model_ref=str(model))
        self.n_layer = n_layer
        self.tensors = {t.name: t for t in self.gguf.tensors}
        for bad in _UNSUPPORTED_INPUT_NORM:
            if bad in self.tensors:
                raise InputError(
                    str(model),
                    "",
                    f"architecture {self.arch!r} has {bad}: its embedding window is not supported",
                )
        if "token_embd.weight" not in self.tensors:
            raise InputError(str(model), "", "has no token_embd.weight tensor")
        self.n_embd = int(self.meta[f"{self.arch}.embedding_length"][0])
        self.alignment = int(self.meta.get("general.alignment", (gguf.GGUF_DEFAULT_ALIGNMENT,))[0])

    # --- metadata ----------------------------------------------------------------------------------------
    def _kv(self, spec: _Spec) -> dict[str, tuple[Any, Any, Any]]:
        a, b = (0, 1) if spec.kind == "embed" else spec.layers  # the embedding shard's one zero layer
        n = b - a
        out: dict[str, tuple[Any, Any, Any]] = {}
        vocab_free = spec.kind == "middle"
        for key, (val, vtype, sub) in self.meta.items():
            if key == "general.architecture":
                continue
            if vocab_free and key.startswith("tokenizer."):
                continue
            if (
                key.startswith(f"{self.arch}.")
                and vtype == gguf.GGUFValueType.ARRAY
                and len(val) == self.n_layer
            ):
                val = val[a:b]  # per-layer hyperparameters follow the global layer index
            out[key] = (val, vtype, sub)
        out[f"{self.arch}.block_count"] = (n, gguf.GGUFValueType.UINT32, None)
        swa = _swa_array(self.arch, self.meta, (a, b))
        if swa is not None:
            out[f"{self.arch}.attention.sliding_window_pattern"] = (
                swa,
                gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.BOOL,
            )
        if vocab_free:
            out["tokenizer.ggml.model"] = ("none", gguf.GGUFValueType.STRING, None)
            out[f"{self.arch}.vocab_size"] = (1, gguf.GGUFValueType.UINT32, None)
        out["prima.shard.kind"] = (spec.kind, gguf.GGUFValueType.STRING, None)
        out["prima.shard.layer_start"] = (a, gguf.GGUFValueType.UINT32, None)
        out["prima.shard.layer_end"] = (b, gguf.GGUFValueType.UINT32, None)
        out["prima.plan_fingerprint"] = (self.plan.fingerprint(), gguf.GGUFValueType.STRING, None)
        return out

    # --- tensors ---------------------------------------------------------------------------------------
    def _tensor_list(self, spec: _Spec) -> list[tuple[str, Any, str]]:
        """(name in shard, source tensor, how its data is written), in file order.

        The data is ``"copy"`` (bytes of the source tensor), ``"hole"`` (all zeros, left as a file hole: the
        embedding shard's zero layer) or ``"stub"`` (the F32 zero [n_embd, 1] vocabulary stub).
        """
        embed = spec.kind == "embed"
        a, b = (0, 1) if embed else spec.layers
        out: list[tuple[str, Any, str]] = []
        for name, t in self.tensors.items():
            m = _BLK.match(name)
            if m:
                i = int(m.group(1))
                if a <= i < b:
                    out.append((f"blk.{i - a}.{m.group(2)}", t, "hole" if embed else "copy"))
                continue
            if name == "token_embd.weight":
                out.append((name, t, "stub" if spec.kind == "middle" else "copy"))
            elif name == "output.weight":
                if spec.kind == "logits" or spec.output_head:
                    out.append((name, t, "copy"))
            else:
                out.append((name, t, "copy"))  # output_norm, rope_freqs, ...: small, needed by every window
        names = [n for n, _, _ in out]
        if "output.weight" in names and "token_embd.weight" in names:  # a separate table: first, out of the
            i = names.index("token_embd.weight")  # range prefetch advises (a token reads one row of it)
            out.insert(0, out.pop(i))
        return out

    def write(self, spec: _Spec, dest: Path) -> ShardFile:
        """Write one shard file (atomically) and return its manifest entry."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        w = gguf.GGUFWriter(tmp, self.arch)
        w.data_alignment = self.alignment
        for key, (val, vtype, sub) in self._kv(spec).items():
            w.add_key_value(key, val, vtype, sub)
        tensors = self._tensor_list(spec)
        for name, t, how in tensors:
            if how == "stub":
                w.add_tensor_info(name, (1, self.n_embd), np.dtype(np.float32), 4 * self.n_embd)
            else:
                shape = tuple(int(x) for x in reversed(t.shape))
                w.add_tensor_info(
                    name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=TYPE_BY_NAME[t.ggml_type]
                )
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            assert w.fout is not None
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            data_offset = fout.tell()
            fout.flush()
            names = {name for name, _, _ in tensors}
            skip_table = (
                "output.weight" in names and tensors[0][0] == "token_embd.weight" and tensors[0][2] == "copy"
            )
            prefetch_offset: int | None = None
            table: TokenTableRef | None = None
            layer_data: dict[int, tuple[int, int]] = {}
            with self.path.open("rb") as src:
                for i, (name, t, how) in enumerate(tensors):
                    if i == 1 and skip_table:  # the token table leads the file: prefetch starts after it
                        prefetch_offset = fout.tell()
                    if how == "stub":
                        nbytes = 4 * self.n_embd
                        fout.write(b"\0" * nbytes)
                    elif how == "hole":
                        nbytes = int(t.n_bytes)
                        fout.seek(nbytes, os.SEEK_CUR)
                    else:
                        nbytes = int(t.n_bytes)
                        fout.flush()
                        at = fout.tell()
                        _copy_range(src.fileno(), fout.fileno(), int(t.offset), at, nbytes,
                                    functools.partial(self._tick, label=name))  # fmt: skip
                        fout.seek(at + nbytes)
                        if name == "token_embd.weight" and len(t.shape) == 2:  # ggml order: n_embd first
                            table = TokenTableRef(offset=at, ggml_type=t.ggml_type, n_embd=int(t.shape[0]),
                                                  n_vocab=int(t.shape[1]))  # fmt: skip
                        if (m := _BLK.match(name)) is not None:  # the shard's own layer numbers
                            j = int(m.group(1))
                            lo, hi = layer_data.get(j, (at, at + nbytes))
                            layer_data[j] = (min(lo, at), max(hi, at + nbytes))
                    w.write_padding(fout, nbytes)
                fout.truncate()  # a trailing hole still counts in the file's size
            w.close()
            os.replace(tmp, dest)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
        return ShardFile(
            file=dest.name, kind=spec.kind, layers=spec.layers, window=spec.window, gpu_layers=spec.gpu_layers,
            output_head=spec.output_head, n_bytes=dest.stat().st_size, sha256=file_sha256(dest), data_offset=data_offset,
            prefetch_offset=prefetch_offset, token_table=table,
            layer_data=tuple(layer_data[j] for j in sorted(layer_data)) if spec.kind != "embed" else None,
        )  # fmt: skip

    def _tick(self, n: int, label: str) -> None:
        if self.progress:
            self.progress(n, 0, label)

    def shard_bytes(self, spec: _Spec) -> int:
        """Bytes of tensor data the shard copies from the model (for progress totals)."""
        return sum(int(t.n_bytes) for _, t, how in self._tensor_list(spec) if how == "copy")


def _copy_range(
    src_fd: int, dst_fd: int, offset: int, at: int, nbytes: int, tick: Callable[[int], None]
) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``offset`` to ``dst_fd`` at ``at``, in fixed-size chunks."""
    os.lseek(dst_fd, at, os.SEEK_SET)
    done = 0
    while done < nbytes:
        n = os.sendfile(dst_fd, src_fd, offset + done, min(COPY_CHUNK_BYTES, nbytes - done))
        if n <= 0:
            raise OSError(f"short read copying tensor data at byte {offset + done}")
        done += n
        tick(n)


def write_shards(
    model: str | Path,
    plan: Plan,
    out_dir: str | Path,
    devices: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, DeviceManifest]:
    """Write the shards and manifest of every device (or only ``devices``) under ``out_dir/<device>/``.

    Args:
        model: source GGUF.
        plan: the plan (its layer ranges decide the windows).
        out_dir: destination directory.
        devices: device names to write; default all devices of the plan.
        progress: called as ``progress(bytes_just_copied, total_bytes, label)``.

    Returns:
        The manifest of every device written.

    Raises:
        InputError: the model does not fit the plan, or a device name is not in the plan.
    """
    names = [d.name for d in plan.devices]
    for d in devices or []:
        if d not in names:
            raise InputError("--device", "", f"device {d!r} is not in the plan (devices: {', '.join(names)})")
    writer = ShardWriter(model, plan)
    todo = {d: device_shard_specs(plan, d) for d in (devices or names)}
    total = sum(writer.shard_bytes(s) for specs in todo.values() for s in specs)
    if progress:
        writer.progress = lambda n, _t, label: progress(n, total, label)
    out: dict[str, DeviceManifest] = {}
    for dev, specs in todo.items():
        ddir = Path(out_dir) / dev
        files = tuple(writer.write(s, ddir / s.file) for s in specs)
        man = DeviceManifest(
            device=dev, plan_fingerprint=plan.fingerprint(), model_file=str(Path(model).resolve()),
            model_bytes=Path(model).stat().st_size, shards=files, plan=plan,
        )  # fmt: skip
        atomic_write_text(ddir / MANIFEST_NAME, json.dumps(man.model_dump(mode="json"), indent=2) + "\n")
        out[dev] = man
    return out
