"""Builders of small but real inputs for planner and simulator tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile, model_profile_from_gguf
from prima_sim.devices.profile import DeviceProfile
from prima_sim.testing import smollm2_path

_LAYER = re.compile(r"^blk\.(\d+)\.")


def smollm2_model(n_layer: int | None = None) -> ModelProfile:
    """SmolLM2-135M's real profile, optionally cut to its first ``n_layer`` layers."""
    m = model_profile_from_gguf(smollm2_path())
    if n_layer is None or n_layer == m.arch.n_layer:
        return m
    return cut_model(m, n_layer).model_copy(update={"id": f"smollm2-{n_layer}l"})


def device(name: str, **over: Any) -> DeviceProfile:
    """A valid Linux CPU device with round numbers; override any field."""
    base: dict[str, Any] = {
        "name": name, "os": "linux", "cores": 8,
        "cpu_flops": {"f32": 1e11, "f16": 2e11, "q4_1": 3e11, "q8_0": 2.5e11, "q4_k": 3e11, "q6_k": 2.5e11},
        "memory_bandwidth_bps": 20e9, "ram_total_bytes": 16 * 2**30, "ram_available_bytes": 8 * 2**30,
        "disk_seq_read_bps": 2e9, "disk_rand_read_bps": 5e8, "provenance": {"kind": "spec"},
    }  # fmt: skip
    base.update(over)
    return DeviceProfile.model_validate(base)


def cluster(
    devices: list[DeviceProfile], bandwidth: float = 50e6, latency: float = 0.005, **over: Any
) -> Cluster:
    """A cluster of ``devices`` (head first) joined by one kind of link."""
    return Cluster.model_validate({"name": "test", "devices": devices,
                                   "default_link": {"bandwidth_bps": bandwidth, "latency_s": latency}, **over})  # fmt: skip


def cut_model(m: ModelProfile, n_layer: int) -> ModelProfile:
    """``m`` with only its first ``n_layer`` layers (embedding and output head kept)."""
    keep = tuple(t for t in m.tensors if not (x := _LAYER.match(t.name)) or int(x.group(1)) < n_layer)
    return m.model_copy(update={"id": f"{m.id}-{n_layer}l", "arch": m.arch.model_copy(update={"n_layer": n_layer}),
                                "tensors": keep})  # fmt: skip


def crashed_run_disk(tmp_path: Path, run_id: str, nbytes: int) -> tuple[Path, str]:
    """An emulated disk a crashed run left behind: a sparse ``prima-<run_id>-disk.img`` of ``nbytes`` attached to a
    loop device (root); (image, loop device)."""
    img = tmp_path / f"prima-{run_id}-disk.img"
    with img.open("wb") as fh:
        fh.truncate(nbytes)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    return img, dev
