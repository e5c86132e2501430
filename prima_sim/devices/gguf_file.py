"""Read a GGUF file's metadata and tensor table without reading its weights.

A small, strict reader of the GGUF container (versions 2 and 3): it walks the header, the key/value
metadata and the tensor-info table, and checks that every tensor lies inside the file. Weights are never
touched, so a 40 GB model is read in milliseconds. Every defect (not GGUF, an unsupported version, a
truncated table, a tensor past the end of the file) raises one :class:`~prima_sim.errors.InputError` that
says what was found where.

Large metadata arrays (the tokenizer's vocabulary and merges) are skipped and recorded by length only
(:class:`ArrayInfo`); small arrays (per-layer hyperparameters) are kept as lists.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prima_sim.devices.ggml_types import tensor_nbytes, type_name
from prima_sim.errors import InputError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SMALL_ARRAY_MAX = 4096  # arrays longer than this are recorded by length only

# GGUF value types: id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep (for example the vocabulary): its element type and length."""

    element_type: int
    length: int


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table: ggml shape (ne0 first), type name, byte offset and size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    offset: int  # absolute offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT
    _by_name: dict[str, GGUFTensor] = field(default_factory=dict, repr=False, compare=False)

    def tensor(self, name: str) -> GGUFTensor | None:
        """The tensor called ``name``, or None."""
        if not self._by_name:
            self._by_name.update({t.name: t for t in self.tensors})
        return self._by_name.get(name)

    @property
    def architecture(self) -> str:
        """``general.architecture`` (for example "llama", "qwen2", "gemma3")."""
        return str(self.metadata.get("general.architecture", ""))


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise InputError(
                self.path,
                "",
                f"truncated GGUF: needed {n} bytes for {what} at byte {self.pos}, "
                f"but the file has {self.size} bytes (re-download or re-copy the file)",
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", 8, f"length of {what}")
        if n > self.size:
            raise InputError(self.path, "", f"corrupt GGUF: {what} claims {n} bytes at byte {self.pos}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.scalar(fmt, size, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", 4, f"element type of {what}")
            n = self.scalar("<Q", 8, f"length of {what}")
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                raw = self.take(size * n, what)
                if n > SMALL_ARRAY_MAX:
                    return ArrayInfo(etype, n)
                return [v[0] for v in struct.iter_unpack(fmt, raw)]
            if etype == _STRING:
                if n > SMALL_ARRAY_MAX:
                    for _ in range(n):  # walk without decoding
                        ln = self.scalar("<Q", 8, f"string in {what}")
                        self.take(ln, f"string in {what}")
                    return ArrayInfo(etype, n)
                return [self.string(what) for _ in range(n)]
            raise InputError(self.path, "", f"corrupt GGUF: {what} has unsupported element type {etype}")
        raise InputError(self.path, "", f"corrupt GGUF: {what} has unknown value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF file.

    Raises:
        InputError: the file is missing, is not GGUF, has an unsupported version, is truncated or corrupt.
    """
    p = Path(path)
    spath = str(p)
    if not p.exists():
        raise InputError(spath, "", "file not found")
    if p.is_dir():
        raise InputError(spath, "", "is a directory, expected a GGUF file")
    size = p.stat().st_size
    if size < 4:
        raise InputError(spath, "", f"is not a GGUF file ({size} bytes; a GGUF file starts with 'GGUF')")
    with p.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC:
            raise InputError(
                spath, "", f"is not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')"
            )
        cur = _Cursor(buf, spath)
        cur.pos = 4
        version = cur.scalar("<I", 4, "version")
        if version not in (2, 3):
            raise InputError(spath, "", f"GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors = cur.scalar("<Q", 8, "tensor count")
        n_kv = cur.scalar("<Q", 8, "metadata count")
        if n_tensors > size or n_kv > size:
            raise InputError(spath, "", f"corrupt GGUF header: {n_tensors} tensors, {n_kv} metadata entries")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<I", 4, f"type of metadata '{key}'")
            metadata[key] = cur.value(vtype, f"metadata '{key}'")
        infos: list[tuple[str, tuple[int, ...], str, int]] = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.scalar("<I", 4, f"dimensions of tensor '{name}'")
            if n_dims > 4:
                raise InputError(spath, "", f"corrupt GGUF: tensor '{name}' has {n_dims} dimensions (max 4)")
            shape = tuple(cur.scalar("<Q", 8, f"shape of tensor '{name}'") for _ in range(n_dims))
            tid = cur.scalar("<I", 4, f"type of tensor '{name}'")
            try:
                tname = type_name(tid)
            except ValueError:
                raise InputError(spath, "", f"tensor '{name}' has unknown ggml type id {tid}") from None
            rel = cur.scalar("<Q", 8, f"offset of tensor '{name}'")
            infos.append((name, shape, tname, rel))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise InputError(spath, "general.alignment", f"must be a power of two, got {alignment}")
        data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors: list[GGUFTensor] = []
    for name, shape, tname, rel in infos:
        try:
            nbytes = tensor_nbytes(tname, shape)
        except ValueError as exc:
            raise InputError(spath, "", f"tensor '{name}': {exc}") from None
        start = data_offset + rel
        if start + nbytes > size:
            raise InputError(
                spath,
                "",
                f"truncated GGUF: tensor '{name}' needs bytes {start}..{start + nbytes} "
                f"but the file ends at {size} (re-download or re-copy the file)",
            )
        tensors.append(GGUFTensor(name, shape, tname, start, nbytes))
    return GGUFFile(spath, version, metadata, tuple(tensors), data_offset, size, alignment)
