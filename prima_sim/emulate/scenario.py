"""Scenario files: the emulated devices, the model, the request and the schedulers to compare (TOML).

Example (``datasets/scenarios/*.toml`` has the suite)::

    name = "fits-in-memory"
    description = "Three devices whose shares of a 0.7 GB model all fit in memory."

    [model]                       # one of: like = "<catalog id>", an explicit shape, or gguf = "path"
    layers = 16
    embd = 2048
    ff = 8192
    heads = 32
    kv_heads = 8
    quant = "Q4_0"

    [workload]
    prompt = "Tell me about the history of the bicycle."
    decode_tokens = 32            # timed decode steps (TPOT is their median); one more token comes from prefill
    n_ctx = 512
    repetitions = 3               # fresh, cold-cache runs per plan

    [run]
    schedulers = ["halda", "memsched"]
    prefetch = true
    single = ["D0"]               # also run the whole model alone on these devices: prima-sim's one-device
                                  # executor (single-D0) and stock llama.cpp over the original GGUF (llama.cpp-D0)

    [network]                     # defaults for every device's access link
    bandwidth = "1 Gbit/s"
    latency = "0.5 ms"

    [[devices]]                   # ring order; the first device is the head unless 'head' says otherwise
    name = "D0"
    memory = "1.5 GiB"            # memory cgroup limit (page cache included)
    threads = 1                   # llama.cpp threads; a whole core needs no quota
    # cpus = 0.5                  # a CFS quota in CPUs for a slower device (or cpuset = "0")
    disk_read = "300 MB/s"        # blkio read limit on the disk holding the model
    bandwidth = "300 Mbit/s"      # its access link (a pair's bandwidth is the smaller of the two ends)
    latency = "2 ms"              # its access link's one-way latency (a pair's latency is the sum)
    os = "linux"                  # OS behaviour the planner assumes (disk bandwidth and memory budget rules)
    # swap = "256 MiB"            # swap space (Linux): a swap file on the emulated disk, behind the same read limit

A pair of devices communicates at the smaller of their access bandwidths and the sum of their access
latencies (a path through the home router), unless ``[[network.links]]`` gives the pair explicitly.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from prima_sim.devices.cluster import check_device_names
from prima_sim.devices.profile import NAME_PATTERN, OSFamily, check_name, lower_name
from prima_sim.errors import InputError
from prima_sim.schema import FrozenModel, load_model
from prima_sim.units import Bandwidth, Bytes, MiB, Seconds
from prima_sim.workload import DEFAULT_UBATCH


def _upper(v: object) -> object:
    return v.upper() if isinstance(v, str) else v


def _lower_all(v: object) -> object:
    return [lower_name(x) for x in v] if isinstance(v, (list, tuple)) else v


_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
MIN_MEMORY_BYTES = 128 * MiB
MIN_SWAP_BYTES = 16 * MiB
"""Smallest swap a device may have (mkswap needs a few pages; less would change nothing measurable)."""
MAX_SWAP_BYTES = 16 << 30
"""Largest swap a device may have (the swap file lives on the run's sparse disk image, written in full)."""


class DeviceSpec(FrozenModel):
    """One emulated device: its cgroup limits, its access link and the OS behaviour to assume."""

    name: str = Field(description="device name (letters, digits, '_', '.', '-'; at most 40)")
    memory: Bytes = Field(description="memory cgroup limit, page cache included (at least 128 MiB)")
    cpus: float | None = Field(
        default=None, gt=0, description="CPU time quota in CPUs (CFS bandwidth control)"
    )
    cpuset: str | None = Field(default=None, description="CPUs the device may run on, e.g. '0' or '0-1'")
    threads: int | None = Field(
        default=None, gt=0, description="llama.cpp threads (default: what the profile finds)"
    )
    disk_read: Bandwidth | None = Field(
        default=None, description="read limit on the disk holding the model, bytes/s"
    )
    bandwidth: Bandwidth | None = Field(
        default=None, description="access link bandwidth (default: [network])"
    )
    latency: Seconds | None = Field(
        default=None, description="access link one-way latency (default: [network])"
    )
    os: OSFamily = Field(default="linux", description="OS behaviour the planner assumes")
    swap: Bytes = Field(
        default=0,
        description="swap space of the device (0: none); Linux only: a swap file on the emulated disk, the "
        "memory cgroup's memory+swap limit raised by this much and its swappiness 60 (docs/emulation.md)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_PATTERN.match(v) or len(v) > 40:
            raise ValueError(
                "must start with a letter or digit, use only letters, digits, '_', '.', '-' (<= 40)"
            )
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        if v < MIN_MEMORY_BYTES:
            raise ValueError(
                f"must be at least 128 MiB (a llama.cpp process alone needs about 100 MiB), got {v} B"
            )
        return v

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, v: str | None) -> str | None:
        if v is not None and not _CPUSET.match(v.replace(" ", "")):
            raise ValueError("must be a CPU list such as '0', '0-1' or '0,2'")
        return v.replace(" ", "") if v else v

    @field_validator("swap")
    @classmethod
    def _swap(cls, v: int) -> int:
        if v and not MIN_SWAP_BYTES <= v <= MAX_SWAP_BYTES:
            raise ValueError(f"must be 0 (no swap) or between 16 MiB and 16 GiB, got {v} B")
        return v

    @model_validator(mode="after")
    def _swap_os(self) -> DeviceSpec:
        if self.swap and self.os != "linux":
            raise ValueError(
                f"swap is emulated for os = 'linux' only (got os = {self.os!r}): the planner's {self.os} rules "
                f"assume their own swap (Android swaps other apps out first; macOS compresses memory), which a "
                f"Linux swap file does not reproduce"
            )
        return self


class LinkOverride(FrozenModel):
    """An explicit pair of devices: its bandwidth and one-way latency."""

    a: str = Field(description="one device")
    b: str = Field(description="the other device")
    bandwidth: Bandwidth = Field(gt=0, description="the pair's bandwidth")
    latency: Seconds = Field(default=0.0, description="the pair's one-way latency")


class NetworkSpec(FrozenModel):
    """Defaults of the access links and explicit pairs."""

    bandwidth: Bandwidth = Field(default=125e6, gt=0, description="default access bandwidth (1 Gbit/s)")
    latency: Seconds = Field(default=0.0, description="default access one-way latency")
    links: tuple[LinkOverride, ...] = Field(default=(), description="explicit pairs ([[network.links]])")
    measure: bool = Field(default=True, description="measure every pair with netprobe for the cluster file")


class DiskSpec(FrozenModel):
    """The emulated devices' disk (docs/emulation.md)."""

    emulated: bool = Field(
        default=True, description="a loop device of the run's own (False: the host's file system)"
    )
    readahead: Bytes = Field(
        default=128 * 1024, description="the disk's read_ahead_kb (kernel default 128 KiB)"
    )


class ModelSpec(FrozenModel):
    """The model: a catalog shape (``like``), an explicit shape, or an existing GGUF (``gguf``)."""

    gguf: str | None = Field(default=None, description="path of a GGUF (relative to the scenario file)")
    like: str | None = Field(default=None, description="catalog id whose shape to generate")
    arch: Annotated[Literal["llama", "qwen2", "gemma3"] | None, BeforeValidator(lower_name)] = Field(
        default=None, description="architecture of an explicit shape (default llama)"
    )
    layers: int | None = Field(default=None, gt=0, description="explicit shape: transformer blocks")
    embd: int | None = Field(default=None, gt=0, description="explicit shape: hidden width")
    ff: int | None = Field(default=None, gt=0, description="explicit shape: feed-forward width")
    heads: int | None = Field(default=None, gt=0, description="explicit shape: attention heads")
    kv_heads: int | None = Field(default=None, gt=0, description="explicit shape: key/value heads")
    head_dim: int | None = Field(
        default=None, gt=0, description="explicit shape: per-head width (default embd/heads)"
    )
    quant: Annotated[Literal["Q4_0", "Q4_K", "Q8_0", "F16"], BeforeValidator(_upper)] = Field(
        default="Q4_0", description="quantization of a generated model"
    )
    seed: int = Field(default=0, ge=0, description="seed of a generated model's random weights")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        shape = [self.layers, self.embd, self.ff, self.heads, self.kv_heads]
        given = sum(x is not None for x in (self.gguf, self.like)) + (any(v is not None for v in shape))
        if given != 1:
            raise ValueError(
                "give exactly one of: gguf = PATH, like = CATALOG_ID, or a shape (layers, embd, ff, heads, kv_heads)"
            )
        if any(v is not None for v in shape) and not all(v is not None for v in shape):
            raise ValueError("an explicit shape needs all of layers, embd, ff, heads, kv_heads")
        return self

    def synth_args(self) -> list[str]:
        """Arguments of ``prima-sim synth-model`` for a generated model (empty for a GGUF)."""
        if self.gguf:
            return []
        args = ["--quant", self.quant, "--seed", str(self.seed)]
        if self.like:
            return ["--like", self.like, *args]
        out = ["--layers", str(self.layers), "--embd", str(self.embd), "--ff", str(self.ff), "--heads",
               str(self.heads), "--kv-heads", str(self.kv_heads)]  # fmt: skip
        if self.arch:
            out += ["--arch", self.arch]
        if self.head_dim:
            out += ["--head-dim", str(self.head_dim)]
        return out + args

    def key(self) -> str:
        """Short hash of a generated model's spec (its cache file name)."""
        return hashlib.sha256(json.dumps(self.synth_args()).encode()).hexdigest()[:12]

    def label(self) -> str:
        """Human name: the GGUF's file name, the catalog id, or the shape."""
        if self.gguf:
            return Path(self.gguf).stem
        if self.like:
            return f"{self.like}-{self.quant.lower()}"
        return f"{self.arch or 'llama'}-{self.layers}L-{self.embd}-{self.quant.lower()}"


class WorkloadSpec(FrozenModel):
    """The request: prompt, tokens to generate, context, repetitions."""

    prompt: str = Field(
        default="Write a short story about a lighthouse keeper who finds a message in a bottle.",
        description="the prompt of every run",
    )
    decode_tokens: int = Field(default=24, ge=2, description="timed decode steps after the first token")
    n_ctx: int = Field(default=512, ge=16, description="context length of the plans")
    repetitions: int = Field(default=3, ge=1, description="fresh, cold-cache runs per plan")
    batch: int = Field(default=DEFAULT_UBATCH, ge=1, description="prefill batch (tokens per message)")


class ManualPlan(FrozenModel):
    """Explicit windows in ring order (prima.cpp's ``-lw``)."""

    label: str = Field(default="", description="scheduler name in the report (default 'manual-<windows>')")
    windows: tuple[int, ...] = Field(description="one window per device, ring order")

    @property
    def name(self) -> str:
        """Scheduler label."""
        return self.label or "manual-" + ",".join(map(str, self.windows))


class RunSpec(FrozenModel):
    """What to plan and run."""

    schedulers: Annotated[tuple[str, ...], BeforeValidator(_lower_all)] = Field(
        default=("halda",),
        description="schedulers to plan, simulate and run: halda, memsched, perfsched, even, freemem",
    )
    k: int | None = Field(default=None, gt=0, description="force Halda's number of rounds")
    allow_drop: bool = Field(default=True, description="Halda may drop devices")
    manual: tuple[ManualPlan, ...] = Field(default=(), description="manual plans to run too ([[run.manual]])")
    single: tuple[str, ...] = Field(default=(), description="devices that also run the whole model alone")
    prefetch: bool = Field(default=True, description="devices advise the kernel to read their next window")
    cold: bool = Field(default=True, description="drop the page cache before every run")
    omp_wait_policy: Annotated[Literal["passive", "active", "default"], BeforeValidator(lower_name)] = Field(
        default="passive", description="OMP_WAIT_POLICY of every llama.cpp process"
    )


class Scenario(FrozenModel):
    """One emulation scenario."""

    schema_version: Literal[1] = Field(default=1, description="scenario format version")
    name: str = Field(description="scenario name (letters, digits, '_', '.', '-')")
    description: str = Field(default="", description="a line for people")
    head: str = Field(default="", description="head device (default: the first)")
    devices: tuple[DeviceSpec, ...] = Field(
        min_length=1, description="the emulated devices ([[devices]]), ring order"
    )
    model: ModelSpec = Field(description="the model ([model])")
    workload: WorkloadSpec = Field(default=WorkloadSpec(), description="the request ([workload])")
    network: NetworkSpec = Field(default=NetworkSpec(), description="access links ([network])")
    disk: DiskSpec = Field(default=DiskSpec(), description="the emulated disk ([disk])")
    run: RunSpec = Field(default=RunSpec(), description="what to plan and run ([run])")
    expect: dict[str, str] = Field(
        default_factory=dict, description="what the scenario is meant to show (notes)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [d.name for d in self.devices]
        check_device_names(names, self.head)
        for i, lk in enumerate(self.network.links):
            for end in (lk.a, lk.b):
                if end not in names:
                    raise ValueError(f"network.links[{i}] names unknown device {end!r}; devices are {names}")
        for s in self.run.single:
            if s not in names:
                raise ValueError(f"run.single names unknown device {s!r}; devices are {names}")
        for m in self.run.manual:
            if len(m.windows) != len(names):
                raise ValueError(
                    f"run.manual windows {list(m.windows)} must give one window per device ({len(names)})"
                )
        from prima_sim.halda.planner import SCHEDULERS

        bad = [s for s in self.run.schedulers if s not in SCHEDULERS]
        if bad:
            raise ValueError(f"unknown scheduler(s) {bad}; choose from {', '.join(SCHEDULERS)}")
        if self.workload.decode_tokens + 8 > self.workload.n_ctx:
            raise ValueError("workload.n_ctx must leave room for the prompt and decode_tokens")
        for d in self.devices:
            if d.cpus is not None and d.cpuset is not None:
                raise ValueError(f"device {d.name}: give cpus or cpuset, not both")
        swapping = [d.name for d in self.devices if d.swap]
        if swapping and not self.disk.emulated:
            raise ValueError(
                f"device(s) {', '.join(swapping)} have swap: it needs [disk] emulated = true (the swap file lives on "
                f"the run's own disk, behind the devices' read limits, and goes away with it)"
            )
        return self

    @property
    def head_name(self) -> str:
        """The head device."""
        return self.head or self.devices[0].name

    @property
    def ring(self) -> list[DeviceSpec]:
        """Devices in ring order, head first."""
        names = [d.name for d in self.devices]
        i = names.index(self.head_name)
        return list(self.devices[i:] + self.devices[:i])

    def device(self, name: str) -> DeviceSpec:
        """The device called ``name``."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def pair(self, a: str, b: str) -> tuple[float, float]:
        """(bandwidth bytes/s, one-way latency s) between two devices."""
        for lk in self.network.links:
            if {lk.a, lk.b} == {a, b}:
                return lk.bandwidth, lk.latency
        da, db = self.device(a), self.device(b)
        bw = min(da.bandwidth or self.network.bandwidth, db.bandwidth or self.network.bandwidth)
        lat = (da.latency if da.latency is not None else self.network.latency) + (
            db.latency if db.latency is not None else self.network.latency
        )
        return bw, lat

    def controllers(self) -> list[str]:
        """cgroup controllers this scenario needs."""
        need = ["memory"]
        if any(d.cpus is not None for d in self.devices):
            need.append("cpu")
        if any(d.cpuset is not None for d in self.devices):
            need.append("cpuset")
        if any(d.disk_read is not None for d in self.devices):
            need.append("io")
        return need

    @property
    def swap_bytes(self) -> int:
        """Swap of all devices together (the size of the run's one swap file)."""
        return sum(d.swap for d in self.devices)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file (a bundled name such as ``fits-in-memory`` also works).

    Raises:
        InputError: the file is missing or invalid (one line naming the field).
    """
    from prima_sim.devices.cluster import resolve_dataset

    p = resolve_dataset("scenarios", str(path))
    sc = load_model(Scenario, p)
    if sc.model.gguf and not Path(sc.model.gguf).is_absolute():
        gguf = (p.parent / sc.model.gguf).resolve()
        if not gguf.exists():
            raise InputError(str(p), "model.gguf", f"file {gguf} not found")
        sc = sc.model_copy(update={"model": sc.model.model_copy(update={"gguf": str(gguf)})})
    return sc


def scenario_source(path: str | Path) -> Path:
    """The file a scenario reference resolves to."""
    from prima_sim.devices.cluster import resolve_dataset

    return resolve_dataset("scenarios", str(path))
