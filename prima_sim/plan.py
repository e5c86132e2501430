"""The Plan: the one contract between planner, simulator and executor.

A plan says which device runs which layers. Devices are listed in ring order with the head first. The model's
L layers are processed in k rounds of the ring; in every round each device runs one contiguous *window* of
layers, in the order ring[1], ring[2], ..., ring[M-1], ring[0] (the head runs the last window of each round,
as in prima.cpp, so it also holds the final layers and computes the logits without another hop). Within a
window, the last ``gpu_layers`` layers run on the device's GPU.

The head tokenizes, looks up the input embedding, runs the output norm and the output head, and samples. Per
token the hidden state crosses k*M links (or fewer when the head's window is empty).

Layer ranges are half-open ``[start, end)`` pairs, stored explicitly, so a plan's meaning never depends on
re-deriving the ordering. A plan round-trips through JSON exactly (:meth:`Plan.to_json`,
:meth:`Plan.from_json`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field, model_validator

from prima_sim.errors import InputError
from prima_sim.schema import FrozenModel, atomic_write_text, read_structured, validate_model
from prima_sim.solver import SolverInfo

if TYPE_CHECKING:
    from prima_sim.devices.cluster import Cluster
    from prima_sim.devices.model import ModelProfile
    from prima_sim.workload import Workload

PLAN_SCHEMA_VERSION: Final = 2
"""Version of the plan format this prima-sim writes. Version 2 added ``cluster_source``, ``model_source`` and
``cpu_only``; version 1 plans are read as version 2 with those at their defaults."""
READABLE_PLAN_VERSIONS: Final = (1, 2)

LayerRange = tuple[int, int]
"""A half-open range of layer indices ``[start, end)``."""


class DeviceAssignment(FrozenModel):
    """What one device runs."""

    name: str = Field(description="device name, as in the cluster")
    window: int = Field(ge=0, description="layers per round (w_m)")
    gpu_layers: int = Field(
        ge=0, description="of each window, how many of its last layers run on the GPU (n_m)"
    )
    layers: tuple[LayerRange, ...] = Field(description="half-open layer ranges, in execution order")
    streamed_layers: int | None = Field(
        default=None,
        ge=1,
        description="of its one window (k = 1), how many of its last CPU layers are read from disk for every "
        "token and dropped right after use, so that the rest stays resident (drop-behind streaming: "
        "docs/exec.md); absent: the operating system's page cache decides what stays",
    )

    @model_validator(mode="after")
    def _check(self) -> DeviceAssignment:
        if self.gpu_layers > self.window:
            raise ValueError(f"device {self.name}: gpu_layers {self.gpu_layers} exceeds window {self.window}")
        if self.streamed_layers is not None:
            if len(self.layers) != 1:
                raise ValueError(f"device {self.name}: streamed_layers needs exactly one window (k = 1), it has "
                                 f"{len(self.layers)}")  # fmt: skip
            if self.streamed_layers > self.window - self.gpu_layers:
                raise ValueError(f"device {self.name}: streamed_layers {self.streamed_layers} exceeds its "
                                 f"{self.window - self.gpu_layers} CPU layers")  # fmt: skip
        for a, b in self.layers:
            if not 0 <= a < b:
                raise ValueError(f"device {self.name}: bad layer range [{a}, {b})")
            if b - a > self.window:
                raise ValueError(
                    f"device {self.name}: range [{a}, {b}) is longer than its window {self.window}"
                )
        return self

    @property
    def n_layers(self) -> int:
        """Layers this device runs per token (l_m)."""
        return sum(b - a for a, b in self.layers)

    def gpu_layers_in(self, rng: LayerRange) -> int:
        """How many layers of ``rng`` (one of this device's windows) run on the GPU: its last ones."""
        return min(self.gpu_layers, rng[1] - rng[0])

    @property
    def n_gpu_layers_total(self) -> int:
        """GPU layers this device runs per token (l_m^gpu)."""
        return sum(self.gpu_layers_in(r) for r in self.layers)


class Dropped(FrozenModel):
    """A device of the cluster that the plan does not use, and why."""

    name: str = Field(description="device name, as in the cluster")
    reason: str = Field(description="why the planner left it out")


class DeviceTimes(FrozenModel):
    """Predicted per-token time of one device, split by cause (seconds).

    ``disk_s`` is the part of the device's disk reads the ring waits for *in this device's windows* (a page
    fault stalls its compute); reads hidden behind other devices' work by prefetch are in ``read_s`` only.
    """

    name: str = Field(description="device name")
    compute_s: float = Field(default=0.0, description="compute-bound time of its layers")
    memory_s: float = Field(default=0.0, description="time to stream its weights from RAM/VRAM")
    disk_s: float = Field(default=0.0, description="the part of its disk reads the ring waits for")
    comm_s: float = Field(default=0.0, description="time to send its activations on")
    overhead_s: float = Field(default=0.0, description="fixed costs (decode calls, KV copies)")
    read_bytes: float = Field(default=0.0, ge=0, description="weight bytes re-read from disk per token")
    read_s: float = Field(default=0.0, ge=0, description="disk time of those reads, hidden or not")
    prefetch: bool = Field(default=False, description="reads of its next window overlap other devices' work")

    @property
    def total_s(self) -> float:
        """Sum of the components on the ring's critical path."""
        return self.compute_s + self.memory_s + self.disk_s + self.comm_s + self.overhead_s


class Prediction(FrozenModel):
    """The analytic prediction attached to a plan by the planner."""

    method: str = Field(description="which model produced it, e.g. 'halda-analytic'")
    tpot_s: float = Field(ge=0, description="predicted time per output token")
    ttft_s: float = Field(ge=0, description="predicted time to the first token")
    prompt_tokens: int = Field(ge=0, description="prompt length the TTFT refers to")
    per_device: tuple[DeviceTimes, ...] = Field(
        default=(), description="per-token time of each device, by cause"
    )
    head_s: float = Field(default=0.0, ge=0, description="per-token work of the head outside windows")
    disk_wait_s: float = Field(
        default=0.0,
        ge=0,
        description="time per token the ring waits, beyond its compute chain, for the slowest prefetching disk",
    )
    bound: str = Field(
        default="", description="what limits TPOT: 'ring' (compute and hops) or 'disk of <device>'"
    )
    prefetch: bool = Field(
        default=True, description="devices prefetch their next window (the executor's default)"
    )


class Plan(FrozenModel):
    """Which device runs which layers, for one model on one cluster."""

    schema_version: Literal[2] = Field(default=2, description="plan format version (1 is read as 2)")
    model_id: str = Field(description="the model's id (catalog id with quantization, or the GGUF's name)")
    model_fingerprint: str = Field(default="", description="hash of the model's tensor table")
    model_source: str = Field(
        default="", description="the --model it was made from: a GGUF path or a catalog id"
    )
    n_layers: int = Field(gt=0, description="the model's layer count")
    cluster_name: str = Field(description="the cluster's name")
    cluster_fingerprint: str = Field(default="", description="hash of the cluster's devices and links")
    cluster_source: str = Field(
        default="", description="the --cluster it was made from: a file or a bundled name"
    )
    cpu_only: bool = Field(
        default=False,
        description="made with every GPU of the cluster ignored (plan --cpu-only, or run on a CPU build)",
    )
    k: int = Field(gt=0, description="rounds of the ring per token")
    n_ctx: int = Field(gt=0, description="context length the plan reserves KV cache for")
    n_seq: int = Field(
        default=1,
        ge=1,
        description="sequences every window's KV cache holds, each of n_ctx tokens (prima-sim serve --parallel)",
    )
    devices: tuple[DeviceAssignment, ...] = Field(min_length=1, description="ring order, head first")
    dropped: tuple[Dropped, ...] = Field(default=(), description="devices of the cluster left out")
    scheduler: str = Field(description="halda, a baseline's name, or manual")
    solver: SolverInfo = Field(default=SolverInfo(), description="how the plan was made")
    prediction: Prediction | None = Field(default=None, description="the planner's analytic prediction")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A version 1 plan is a version 2 plan without the fields version 2 added."""
        if isinstance(data, dict) and data.get("schema_version") == 1:
            return {**data, "schema_version": PLAN_SCHEMA_VERSION}
        return data

    @model_validator(mode="after")
    def _check(self) -> Plan:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names repeat: {names}")
        if {d.name for d in self.dropped} & set(names):
            raise ValueError("a device is both in the ring and dropped")
        covered = sorted(r for d in self.devices for r in d.layers)
        pos = 0
        for a, b in covered:
            if a != pos:
                what = "overlap" if a < pos else "gap"
                raise ValueError(
                    f"layer ranges {what} at layer {min(a, pos)}: every layer must run exactly once"
                )
            pos = b
        if pos != self.n_layers:
            raise ValueError(f"layer ranges cover [0, {pos}) but the model has {self.n_layers} layers")
        for d in self.devices[1:]:
            if d.window == 0 or not d.layers:
                raise ValueError(f"device {d.name} has no layers: list it under 'dropped' instead")
        return self

    # --- the contract ----------------------------------------------------------------------------------
    def check_against(
        self, cluster: Cluster, model: ModelProfile, workload: Workload | None = None, source: str = "plan"
    ) -> None:
        """That this plan was made for ``cluster``, ``model`` and ``workload``: the simulator, the executor's head,
        workers and shard writer, and the CLI check every plan they are given with it.

        Raises:
            InputError: naming the field that disagrees and what to do (``source``: the plan's file).
        """
        self.check_model(model, source)
        self.check_cluster(cluster, source)
        if workload is not None and workload.n_ctx != self.n_ctx:
            raise InputError(source, "n_ctx", f"the plan reserves KV cache for {self.n_ctx} tokens but the workload "
                             f"asks for a context of {workload.n_ctx}: use the plan's n_ctx")  # fmt: skip
        if workload is not None and workload.n_seq != self.n_seq:
            raise InputError(source, "n_seq", f"the plan reserves KV cache for {self.n_seq} sequence(s) but the "
                             f"workload asks for {workload.n_seq}: re-plan with --parallel {workload.n_seq}")  # fmt: skip

    def check_model(self, model: ModelProfile, source: str = "plan", model_ref: str = "") -> None:
        """That this plan was made for ``model`` (``model_ref``: how the user named it, for the advice).

        Raises:
            InputError: another layer count or tensor table.
        """
        if self.n_layers != model.arch.n_layer:
            raise InputError(source, "n_layers", f"the plan covers {self.n_layers} layers but model {model.id} has "
                             f"{model.arch.n_layer}: plan it for this model")  # fmt: skip
        if self.model_fingerprint and self.model_fingerprint != model.fingerprint:
            replan = f"with 'prima-sim plan --model {model_ref}'" if model_ref else "for this model"
            raise InputError(source, "model_fingerprint", f"the plan was made for {self.model_id}, not for "
                             f"{model_ref or model.id} ({model.id}; their tensor tables differ): re-plan {replan}")  # fmt: skip

    def check_cluster(self, cluster: Cluster, source: str = "plan", cluster_ref: str = "") -> None:
        """That this plan was made on ``cluster`` (with its GPUs removed for a CPU-only plan; ``cluster_ref``: how
        the user named it, for the advice).

        Raises:
            InputError: devices it does not have, or other profiles or links.
        """
        names = {d.name for d in cluster.devices}
        planned = [d.name for d in self.devices]
        missing = [n for n in planned if n not in names]
        if missing:
            raise InputError(source, "devices", f"devices {missing} are not in cluster {cluster.name} (it has "
                             f"{sorted(names)}): plan it for this cluster")  # fmt: skip
        seen = cluster.without_gpus() if self.cpu_only else cluster
        if self.cluster_fingerprint and self.cluster_fingerprint != seen.fingerprint():
            everything = sorted(planned + [d.name for d in self.dropped])
            given = cluster_ref or cluster.name
            how = (f"the plan's devices are {', '.join(everything)}; {given} has {', '.join(sorted(names))}"
                   if everything != sorted(names) else
                   f"{given} has the same devices, but their profiles or links changed since the plan was made")  # fmt: skip
            replan = f"with 'prima-sim plan --cluster {cluster_ref}'" if cluster_ref else "for this cluster"
            raise InputError(source, "cluster_fingerprint", f"the plan was made on cluster {self.cluster_name!r} "
                             f"({self.cluster_source or 'bundled'}) and {how}: re-plan {replan}, or give the plan's "
                             "cluster with --cluster")  # fmt: skip

    # --- views ---------------------------------------------------------------------------------------
    @property
    def head(self) -> str:
        """The head device (first in ring order)."""
        return self.devices[0].name

    @property
    def windows(self) -> tuple[int, ...]:
        """Window sizes in ring order (head first), as prima.cpp's ``-lw`` lists them."""
        return tuple(d.window for d in self.devices)

    def device(self, name: str) -> DeviceAssignment:
        """The assignment of the device called ``name``."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def execution_order(self) -> list[tuple[str, LayerRange]]:
        """Every window of one token in the order it runs: (device, [start, end))."""
        return sorted(((d.name, r) for d in self.devices for r in d.layers), key=lambda x: x[1][0])

    def fingerprint(self) -> str:
        """Hash of what the executor must agree on: model, cluster, layer ranges and GPU layers."""
        core = {
            "model": self.model_fingerprint or self.model_id,
            "n_layers": self.n_layers,
            "devices": [(d.name, d.gpu_layers, d.layers) for d in self.devices],
            "n_ctx": self.n_ctx,
        }
        if self.n_seq != 1:  # left out at 1: plans made before the field keep their fingerprint (and shards)
            core["n_seq"] = self.n_seq
        streamed = {d.name: d.streamed_layers for d in self.devices if d.streamed_layers}
        if streamed:  # every device must stream what the plan says (left out when none does, as n_seq)
            core["streamed"] = streamed
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def without_streaming(self) -> Plan:
        """The same windows with every device leaving its window to the page cache (no ``streamed_layers``), as
        prima.cpp and stock llama.cpp run; without a prediction (the planner's was for the streaming)."""
        devices = tuple(d.model_copy(update={"streamed_layers": None}) for d in self.devices)
        return self.model_copy(update={"devices": devices, "prediction": None})

    def on_cpus(self) -> Plan:
        """The same windows with every layer on the CPU (what a llama.cpp build without a GPU backend can run).

        The result is marked ``cpu_only``; it has no prediction (the planner's was for the GPU layers) and no
        cluster fingerprint (it was not planned on the CPU-only cluster).
        """
        devices = tuple(d.model_copy(update={"gpu_layers": 0}) for d in self.devices)
        return self.model_copy(update={"devices": devices, "cpu_only": True, "prediction": None,
                                       "cluster_fingerprint": ""})  # fmt: skip

    # --- JSON round trip -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Serialize exactly (``Plan.from_json(p.to_json()) == p``)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<plan>") -> Plan:
        """Parse and validate a plan.

        Raises:
            InputError: the text is not a valid plan.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, "", f"is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return _validate_plan(data, source)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (atomically)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file."""
        return _validate_plan(read_structured(path), str(path))


def _validate_plan(data: Any, source: str) -> Plan:
    if (
        isinstance(data, dict)
        and data.get("schema_version", PLAN_SCHEMA_VERSION) not in READABLE_PLAN_VERSIONS
    ):
        raise InputError(
            source, "schema_version",
            f"plan schema {data.get('schema_version')} is not supported by this prima-sim (reads "
            f"{', '.join(map(str, READABLE_PLAN_VERSIONS))}); re-create the plan with 'prima-sim plan'",
        )  # fmt: skip
    return validate_model(Plan, data, source)


def layer_ranges(windows: list[int] | tuple[int, ...], n_layers: int) -> list[list[LayerRange]]:
    """Layer ranges of each device for windows given in ring order (head first).

    Rounds repeat until all ``n_layers`` are placed; within a round the order is ring[1], ..., ring[M-1],
    ring[0] (prima.cpp's ``this_layer_is_mine``). When the windows do not divide ``n_layers`` the last round
    is partial, exactly as prima.cpp's manual ``-lw`` path handles it.

    Raises:
        ValueError: windows are negative or all zero.
    """
    if any(w < 0 for w in windows) or sum(windows) == 0:
        raise ValueError(f"windows must be >= 0 and not all zero, got {list(windows)}")
    m = len(windows)
    order = [*list(range(1, m)), 0]
    out: list[list[LayerRange]] = [[] for _ in range(m)]
    pos = 0
    while pos < n_layers:
        for i in order:
            if pos >= n_layers:
                break
            w = min(windows[i], n_layers - pos)
            if w:
                out[i].append((pos, pos + w))
                pos += w
    return out


def rounds_for(windows: list[int] | tuple[int, ...], n_layers: int) -> int:
    """Number of rounds k needed to place ``n_layers`` with these windows (a partial last round counts)."""
    w = sum(windows)
    return -(-n_layers // w)


def make_assignments(
    names: list[str] | tuple[str, ...],
    windows: list[int] | tuple[int, ...],
    gpu_layers: list[int] | tuple[int, ...],
    n_layers: int,
) -> tuple[DeviceAssignment, ...]:
    """Device assignments (ring order, head first) from window sizes and GPU layers per window."""
    ranges = layer_ranges(windows, n_layers)
    return tuple(
        DeviceAssignment(name=n, window=w, gpu_layers=min(g, w), layers=tuple(r))
        for n, w, g, r in zip(names, windows, gpu_layers, ranges, strict=True)
    )


# --- the ring's windows, shared by the simulator and the executor ---------------------------------------------
def next_own_window(mine: Sequence[int], after: int) -> int | None:
    """The window a device runs next after window ``after`` (wrapping to the next token), or None.

    Args:
        mine: the indices of the windows the device runs, in execution order.
        after: a window index (-1: the start of a token).
    """
    for j in mine:
        if j > after:
            return j
    return mine[0] if mine else None


def prefetch_window(
    mine: Sequence[int], after: int, ran: Collection[int], own_window_again: bool = False
) -> int | None:
    """The window a device advises the kernel to load after sending the output of window ``after``: its next
    own window, except, for a device with one window, once it has run it (``ran``: the windows it has run).

    prima.cpp prefetches sub-graph (i+1) mod n even then (``own_window_again=True`` keeps that rule). Advising
    the window a device runs again reads nothing when that window is resident, and when it is not, re-reads the
    evicted tail at once and so evicts the start the next token needs (the prefetch-release conflict inside one
    window): measured in the emulation (fits-in-memory, a near-fit head), 88 ms per token without that
    self-prefetch, 1.6 s with it. Before its first run (a cold start) the window is read once either way and
    prefetching it overlaps the read with the other devices' work, so it is kept.
    """
    if len(mine) == 1 and mine[0] in ran and not own_window_again:
        return None
    return next_own_window(mine, after)
