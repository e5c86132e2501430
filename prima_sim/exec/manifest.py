"""The manifest of a device's shard directory: which shard files it holds, for which plan, and their checksums.

The reading half of the on-disk format :mod:`prima_sim.exec.shard` writes, in a module of its own so that a worker
(which only reads its manifest) does not import the GGUF writer (``gguf`` and yaml: 2.6 MiB of a worker's
anonymous memory; docs/exec.md, "Memory of the executor's processes").
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, Literal

from pydantic import Field

from prima_sim.errors import InputError
from prima_sim.plan import LayerRange, Plan
from prima_sim.schema import FrozenModel, read_structured, validate_model
from prima_sim.units import fmt_bytes

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION: Final = 1
HASH_CHUNK_BYTES = 8 << 20

ShardKind = Literal["embed", "middle", "logits"]


class TokenTableRef(FrozenModel):
    """Where a shard's ``token_embd.weight`` lies (the head reads its rows: exec/token_table.py)."""

    offset: int = Field(ge=0, description="byte offset of the table's data in the shard")
    ggml_type: str = Field(description="the table's ggml type name, e.g. q8_0")
    n_embd: int = Field(ge=1)
    n_vocab: int = Field(ge=1)


class ShardFile(FrozenModel):
    """One shard file of a device."""

    file: str = Field(description="file name inside the device's shard directory")
    kind: ShardKind
    layers: LayerRange = Field(description="global half-open layer range; (0, 0) for the embedding shard")
    window: int = Field(ge=-1, description="index in the plan's execution order; -1 for the embedding shard")
    output_head: bool = Field(default=False, description="also computes logits from the final hidden state")
    gpu_layers: int = Field(ge=0)
    n_bytes: int = Field(ge=0)
    sha256: str
    data_offset: int = Field(ge=0, description="byte offset of the tensor data")
    layer_data: tuple[tuple[int, int], ...] | None = Field(
        default=None,
        description="per layer of the shard, the [start, end) byte offsets of its tensors' data (what drop-behind "
        "streaming releases, exec/stream.py); absent in manifests written before it (the GGUF is read then)",
    )
    prefetch_offset: int | None = Field(
        default=None, ge=0,
        description="byte offset from which prefetch advises (default data_offset): a logits window of a model with "
        "a separate output head starts after its token table, of which a token reads one row",
    )  # fmt: skip
    token_table: TokenTableRef | None = Field(
        default=None,
        description="the shard's token table, if it holds one (absent in manifests written before it: the head then "
        "embeds with llama.cpp)",
    )

    @property
    def advise_from(self) -> int:
        """Where the range ``WILLNEED`` covers begins (it ends at the end of the file)."""
        return self.data_offset if self.prefetch_offset is None else self.prefetch_offset


class DeviceManifest(FrozenModel):
    """What one device's shard directory holds, and for which plan."""

    schema_version: Literal[1] = MANIFEST_VERSION
    device: str
    plan_fingerprint: str
    model_file: str
    model_bytes: int
    shards: tuple[ShardFile, ...]
    plan: Plan = Field(
        description="the plan the shards were cut for (validated once, when the manifest is read)"
    )

    def shard_for_window(self, window: int) -> ShardFile:
        """The shard that runs window ``window`` of the execution order."""
        for s in self.shards:
            if s.window == window:
                return s
        raise KeyError(window)

    def shard_of_kind(self, kind: ShardKind) -> ShardFile | None:
        """The first shard of ``kind``, or None."""
        for s in self.shards:
            if s.kind == kind:
                return s
        return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in fixed-size chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(shard_dir: str | Path, device: str | None = None, verify: bool = False) -> DeviceManifest:
    """Read ``shard_dir/manifest.json`` (or ``shard_dir/<device>/manifest.json``) and check its files.

    Args:
        shard_dir: a device's shard directory, or the directory holding one per device.
        device: the expected device name.
        verify: also recompute every file's SHA-256.

    Raises:
        InputError: the manifest is missing or malformed, belongs to another device, or a file is missing,
            has the wrong size or (with ``verify``) the wrong checksum.
    """
    d = Path(shard_dir)
    if device and not (d / MANIFEST_NAME).exists() and (d / device / MANIFEST_NAME).exists():
        d = d / device
    path = d / MANIFEST_NAME
    if not path.is_file():
        if not Path(shard_dir).is_dir():
            raise InputError(str(shard_dir), "", "shard folder not found (cut shards with 'prima-sim shard')")
        others = sorted(x.parent.name for x in Path(shard_dir).glob(f"*/{MANIFEST_NAME}"))
        whose = f"of {device} " if device else ""
        held = f"it holds the shards of {', '.join(others)}" if others else "it holds no manifest.json"
        raise InputError(str(shard_dir), "", f"has no shards {whose}({held}): cut them with 'prima-sim shard --plan "
                         f"PLAN --model MODEL --out DIR{' --device ' + device if device else ''}' and copy "
                         f"DIR/{device or '<device>'} here")  # fmt: skip
    man = validate_model(DeviceManifest, read_structured(path), str(path))
    if device and man.device != device:
        raise InputError(str(path), "device", f"shards are for device {man.device!r}, not {device!r}")
    for s in man.shards:
        f = d / s.file
        if not f.is_file():
            raise InputError(str(f), "", "shard listed in the manifest is missing (re-run 'prima-sim shard')")
        if f.stat().st_size != s.n_bytes:
            raise InputError(str(f), "", f"has {fmt_bytes(f.stat().st_size)} ({f.stat().st_size} bytes), the manifest "
                             f"says {fmt_bytes(s.n_bytes)} ({s.n_bytes} bytes): re-copy it")  # fmt: skip
        if verify and file_sha256(f) != s.sha256:
            raise InputError(
                str(f), "", "SHA-256 does not match the manifest: the file is corrupt, re-copy it"
            )
    return man


def shard_path(shard_dir: str | Path, man: DeviceManifest, shard: ShardFile) -> Path:
    """Absolute path of ``shard`` given the directory :func:`load_manifest` was called with."""
    d = Path(shard_dir)
    if not (d / MANIFEST_NAME).exists():
        d = d / man.device
    return d / shard.file
