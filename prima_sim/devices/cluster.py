"""A home cluster: devices in ring order, a head device, and the links between them.

Cluster files (TOML or JSON) name their devices either by a bundled profile name (``"D1"`` resolves to
``datasets/devices/D1.toml``), by a path relative to the cluster file, or inline as a table. Links default to
``default_link`` for every pair and may be overridden per pair; links that name the same ``medium`` share its
airtime (one Wi-Fi network), which the simulator models as contention.

The ring order is the order of ``devices`` rotated so that the head comes first. As in prima.cpp, within one
round of the ring the head runs the *last* window: device order in a round is ring[1], ..., ring[M-1],
ring[0].
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from prima_sim.devices.profile import DeviceProfile
from prima_sim.errors import InputError
from prima_sim.schema import FrozenModel, read_structured, validate_model
from prima_sim.units import PositiveBandwidth, Seconds, fmt_bitrate, fmt_seconds

notes = logging.getLogger("prima_sim.notes")
"""Things a user should know about how an input was read (defaults used); the CLI prints them on stderr."""


class LinkSpec(FrozenModel):
    """Bandwidth and latency of a network path."""

    bandwidth_bps: PositiveBandwidth = Field(
        description="throughput of one transfer, bytes/s ('450 Mbps' works)"
    )
    latency_s: Seconds = Field(description="one-way latency ('5 ms' works)")
    medium: str | None = Field(
        default=None, description="shared medium (e.g. 'wifi', declared in media) whose airtime it uses"
    )


class Link(LinkSpec):
    """A link between two named devices (symmetric)."""

    a: str = Field(description="one end: a device name")
    b: str = Field(description="the other end: a device name")


class Medium(FrozenModel):
    """A shared medium (one Wi-Fi network): transfers on it at the same time share its capacity."""

    name: str = Field(description="the name links give as their medium")
    capacity_bps: PositiveBandwidth = Field(description="total throughput shared by concurrent transfers")


def check_device_names(names: list[str], head: str) -> None:
    """Device names are unique and the head (if named) is one of them (clusters and emulation scenarios).

    Raises:
        ValueError: naming the repeated names or the unknown head.
    """
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"device names must be unique, repeated: {dup}")
    if head and head not in names:
        raise ValueError(f"head {head!r} is not one of the devices {names}")


FINGERPRINT_NEUTRAL: dict[str, object] = {"cpu_row_flops": {}}
"""Device profile fields added after plans were written, left out of the cluster's fingerprint at these values (a
profile without the measurement), so a plan made before a field existed still matches its cluster."""
FINGERPRINT_SIM_ONLY = ("disk_throttle_slice_s",)
"""Device profile fields that only the simulator reads (the planner and the cost model do not): left out of the
fingerprint whatever their value, so a plan still matches its cluster when they are added afterwards (re-predicting
an emulation run made before they existed)."""


class Cluster(FrozenModel):
    """Devices in ring order, the head device, and the network."""

    schema_version: Literal[1] = Field(default=1, description="cluster format version")
    name: str = Field(description="the cluster's name (default: the file name without .toml)")
    description: str = Field(default="", description="a line for people")
    devices: tuple[DeviceProfile, ...] = Field(
        min_length=1,
        description="ring order; in a file each entry is a device name (a file beside the cluster file or a "
        "bundled profile), a path, or an inline table",
    )
    head: str = Field(
        default="", description="device that tokenizes, embeds, runs the output head; default first"
    )
    default_link: LinkSpec = Field(
        default=LinkSpec(bandwidth_bps=1.25e8, latency_s=0.0002),
        description="link of every pair not listed in links (default: wired gigabit Ethernet, 1 Gbit/s and "
        "0.2 ms, noted on stderr when used; Wi-Fi is slower, e.g. 400 Mbps and 5 ms)",
    )
    links: tuple[Link, ...] = Field(default=(), description="per-pair links (override default_link)")
    media: tuple[Medium, ...] = Field(default=(), description="shared media (a Wi-Fi network's airtime)")

    @model_validator(mode="after")
    def _consistent(self) -> Cluster:
        names = [d.name for d in self.devices]
        check_device_names(names, self.head)
        media = {m.name for m in self.media}
        for i, link in enumerate(self.links):
            for end in (link.a, link.b):
                if end not in names:
                    raise ValueError(f"links[{i}] names unknown device {end!r}; devices are {names}")
            if link.medium and link.medium not in media:
                raise ValueError(f"links[{i}] uses medium {link.medium!r} not declared in [[media]]")
        if self.default_link.medium and self.default_link.medium not in media:
            raise ValueError(
                f"default_link uses medium {self.default_link.medium!r} not declared in [[media]]"
            )
        return self

    @property
    def head_name(self) -> str:
        """Name of the head device."""
        return self.head or self.devices[0].name

    def device(self, name: str) -> DeviceProfile:
        """The device called ``name``.

        Raises:
            KeyError: no such device.
        """
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def ring_order(self) -> tuple[str, ...]:
        """Device names in ring order, head first."""
        names = [d.name for d in self.devices]
        i = names.index(self.head_name)
        return tuple(names[i:] + names[:i])

    def link(self, src: str, dst: str) -> LinkSpec:
        """The link between two devices (explicit override, else the default link)."""
        for lk in self.links:
            if {lk.a, lk.b} == {src, dst}:
                return lk
        return self.default_link

    def medium(self, name: str | None) -> Medium | None:
        """The shared medium called ``name``."""
        return next((m for m in self.media if m.name == name), None) if name else None

    def fingerprint(self) -> str:
        """Short hash of everything that affects a plan (devices, head, links): plans record it."""
        data = self.model_dump(mode="json", exclude={"name", "description"})
        for d in data["devices"]:
            for key, neutral in FINGERPRINT_NEUTRAL.items():
                if d.get(key) == neutral:
                    del d[key]
            for key in FINGERPRINT_SIM_ONLY:
                d.pop(key, None)
        blob = json.dumps(data, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def without_gpus(self) -> Cluster:
        """The same cluster with every GPU removed (what a CPU-only plan is made on)."""
        return self.model_copy(
            update={"devices": tuple(d.model_copy(update={"gpu": None}) for d in self.devices)}
        )

    def alone(self, device: DeviceProfile) -> Cluster:
        """The cluster reduced to ``device`` (one of its devices, possibly re-profiled), its head, without links:
        what a one-device baseline is planned and predicted on."""
        return self.model_copy(update={"devices": (device,), "head": device.name, "links": ()})

    def subset(self, names: list[str] | tuple[str, ...]) -> Cluster:
        """The same cluster with only the named devices, in the given (ring) order; the head must stay."""
        keep = [self.device(n) for n in names]
        links = tuple(lk for lk in self.links if lk.a in names and lk.b in names)
        return self.model_copy(update={"devices": tuple(keep), "links": links})


# --- loading ---------------------------------------------------------------------------------------------
def datasets_root() -> Path:
    """The bundled ``datasets/`` directory (override with the PRIMA_SIM_DATASETS environment variable).

    An installed package carries it as ``prima_sim/_datasets`` (setup.py maps the repository's ``datasets/``
    there); a source checkout (editable install, PYTHONPATH) uses the repository's ``datasets/`` itself. The
    checkout is recognised by its pyproject.toml, so an unrelated ``datasets`` folder beside an installed
    package (site-packages/datasets of another distribution) is never taken for ours.
    """
    import os

    env = os.environ.get("PRIMA_SIM_DATASETS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "_datasets"
    if installed.is_dir():
        return installed
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "datasets").is_dir():
        return checkout / "datasets"
    return installed


def _is_path_like(ref: str) -> bool:
    return "/" in ref or ref.endswith((".toml", ".json"))


def bundled_names(kind: str) -> list[str]:
    """Names of the bundled entries of ``datasets/<kind>/`` (devices, clusters, models, scenarios)."""
    d = datasets_root() / kind
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def example_clusters() -> list[str]:
    """The bundled example clusters, as ``--cluster`` takes them (``examples/home``)."""
    out = []
    for p in sorted((datasets_root() / "examples").glob("*.toml")):
        try:
            if isinstance(tomllib.loads(p.read_text(encoding="utf-8")).get("devices"), list):
                out.append(f"examples/{p.stem}")
        except (OSError, ValueError):
            continue
    return out


def resolve_dataset(kind: str, ref: str, relative_to: Path | None = None) -> Path:
    """Turn a bundled name or a path into a file path.

    A path is taken as given, then relative to ``relative_to`` (a cluster file's folder), then inside the bundled
    datasets (``examples/home.toml`` works from any folder, also without its ``.toml``). A name without a folder or
    suffix is a bundled entry of ``datasets/<kind>/``.

    Raises:
        InputError: neither a file nor a bundled name.
    """
    if _is_path_like(ref) or Path(ref).exists():
        p = Path(ref)
        candidates = [p]
        if not p.is_absolute():
            if relative_to is not None:
                candidates.append(relative_to / p)
            root = datasets_root()
            candidates += [root / p, root / f"{ref}.toml"]
        for c in candidates:
            if c.is_file():
                return c
        raise InputError(ref, "", f"file not found (and not a bundled {kind[:-1]} name)")
    p = datasets_root() / kind / f"{ref}.toml"
    if not p.exists():
        known = ", ".join(bundled_names(kind)) or "none"
        examples = example_clusters() if kind == "clusters" else []
        hint = f"; examples: {', '.join(examples)}" if examples else ""
        raise InputError(
            ref, "", f"no such file and no bundled {kind[:-1]} of that name; bundled: {known}{hint}"
        )
    return p


def load_device(ref: str, relative_to: Path | None = None) -> DeviceProfile:
    """Load a device profile by bundled name or path."""
    path = resolve_dataset("devices", ref, relative_to)
    return validate_model(DeviceProfile, read_structured(path), str(path))


def load_cluster(ref: str) -> Cluster:
    """Load a cluster by bundled name or path, resolving its device references.

    Raises:
        InputError: the file, a device it names, or a link is invalid.
    """
    path = resolve_dataset("clusters", ref)
    data: dict[str, Any] = dict(read_structured(path))
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices:
        raise InputError(str(path), "devices", "must be a non-empty list of device names, paths or tables")
    resolved: list[Any] = []
    for i, ref_i in enumerate(devices):
        if isinstance(ref_i, str):
            local = path.parent / f"{ref_i}.toml"
            if not _is_path_like(ref_i) and local.exists() and path.parent != datasets_root() / "clusters":
                resolved.append(load_device(str(local)))
            else:
                try:
                    resolved.append(load_device(ref_i, relative_to=path.parent))
                except InputError as exc:
                    raise InputError(
                        str(path), f"devices[{i}]", f"names unknown device {ref_i!r}: {exc.problem}"
                    ) from None
        elif isinstance(ref_i, dict):
            resolved.append(validate_model(DeviceProfile, ref_i, f"{path} devices[{i}]"))
        else:
            raise InputError(str(path), f"devices[{i}]", "must be a device name, a path, or an inline table")
    data["devices"] = resolved
    data.setdefault("name", path.stem)
    cluster = validate_model(Cluster, data, str(path))
    if "default_link" not in data:
        names = [d.name for d in cluster.devices]
        listed = {frozenset((lk.a, lk.b)) for lk in cluster.links}
        missing = [
            (a, b) for i, a in enumerate(names) for b in names[i + 1 :] if frozenset((a, b)) not in listed
        ]
        if missing:
            dl = cluster.default_link
            notes.info(
                "%s has no [default_link]: %d device pair(s) without a [[links]] entry (%s) get %s and %s "
                "(wired gigabit Ethernet); for Wi-Fi give e.g. [default_link] bandwidth_bps = \"400 Mbps\", "
                "latency_s = \"5 ms\", or measure with 'prima-sim netprobe'",
                path, len(missing), ", ".join(f"{a}-{b}" for a, b in missing[:3]) + (", ..." if len(missing) > 3 else ""),
                fmt_bitrate(dl.bandwidth_bps), fmt_seconds(dl.latency_s),
            )  # fmt: skip
    return cluster
