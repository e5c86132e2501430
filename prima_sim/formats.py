"""The file formats a user writes or reads, as JSON Schema from their pydantic models, and docs/formats.md.

``prima-sim schema KIND`` prints :func:`json_schema` of a kind; ``prima-sim schema --markdown`` prints
:func:`markdown`, which is docs/formats.md (a test fails when the page is stale). Both come from the models
themselves, so the documentation lists exactly the fields the loaders accept, with their units and defaults.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

FORMATS: dict[str, str] = {
    "device": "a device profile (datasets/devices/*.toml, `prima-sim profile --out`)",
    "cluster": "a home cluster: devices in ring order and the network (datasets/clusters/*.toml, `--cluster`)",
    "hosts": "where each device of a real run listens (hosts.toml, `run --real --hosts`, `worker --hosts`)",
    "scenario": "a one-host emulation scenario (datasets/scenarios/*.toml, `emulate --scenario`)",
    "plan": "a plan: which device runs which layers (`plan --out`, read by simulate, shard and run)",
}
"""Every format, with a line saying what it is and where it is used."""

_INTRO: dict[str, str] = {
    "device": (
        "A device profile says what one machine can do. Write it by hand from spec sheets (start from "
        "`datasets/examples/desktop.toml`) or measure it with `prima-sim profile --out NAME.toml` on the machine. "
        'Quantities take a plain number in the unit shown or a string with a unit: `"16 GiB"`, `"41 GB/s"`, '
        '`"610 Mbps"`, `"720 GFLOPS"`, `"5 ms"`. Names of closed sets (`os`, `gpu.kind`, weight types) are '
        "case-insensitive."
    ),
    "cluster": (
        "A cluster lists devices in ring order and the network between them (start from "
        "`datasets/examples/home.toml`, or copy the example home with `prima-sim init DIR`). In the file, each "
        "entry of `devices` is a device name (a `NAME.toml` beside the cluster file, else a bundled profile), a "
        "path, or an inline table of the device format. A pair of devices without a `[[links]]` entry uses "
        "`default_link`; when the file has no `[default_link]`, the CLI says so on stderr, because the default "
        "(1 Gbit/s, 0.2 ms: wired Ethernet) is optimistic for Wi-Fi. `prima-sim netprobe` measures a pair and "
        "prints a `[[links]]` table to paste."
    ),
    "hosts": (
        "`hosts.toml` tells the head (`prima-sim run --real`) and every worker (`prima-sim worker`) where each "
        "device listens (start from `datasets/examples/hosts.toml`). Every field is optional: a device not "
        "listed listens on 127.0.0.1, and a device without a port on `base_port` + its index in ring order "
        "(the head is 0). The head also listens on `control_port` for heartbeats and measurements."
    ),
    "scenario": (
        "An emulation scenario describes emulated devices as cgroup limits and network namespaces on one Linux "
        "host, the model, the request and the schedulers to compare (docs/emulation.md). Bundled scenarios are "
        "in `datasets/scenarios/`."
    ),
    "plan": (
        "A plan is written by `prima-sim plan --out plan.json` and read by `simulate`, `shard`, `run` and "
        "`worker` (inside each shard manifest). You rarely write one by hand (`plan --windows` makes manual "
        "plans); it is listed here so that its fields are documented. A plan records the cluster and model it "
        "was made from (`cluster_source`, `model_source`), so `simulate --plan` and `run --plan` find them "
        "again. Version 1 plans (without those fields) are still read."
    ),
}


def _models() -> dict[str, type[BaseModel]]:
    from prima_sim.devices.cluster import Cluster
    from prima_sim.devices.profile import DeviceProfile
    from prima_sim.emulate.scenario import Scenario
    from prima_sim.exec.hosts import HostsFile
    from prima_sim.plan import Plan

    return {
        "device": DeviceProfile,
        "cluster": Cluster,
        "hosts": HostsFile,
        "scenario": Scenario,
        "plan": Plan,
    }


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of the files of ``kind`` (one of :data:`FORMATS`), as a user writes them.

    Raises:
        KeyError: unknown kind.
    """
    model = _models()[kind]
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = FORMATS[kind]
    if (
        kind == "cluster"
    ):  # in a file: device names or paths, or inline tables; the name defaults to the file's
        props = schema["properties"]
        props["devices"]["items"] = {"anyOf": [
            {"type": "string", "description": "a device name (NAME.toml beside the cluster file, or bundled) or a path"},
            {"$ref": "#/$defs/DeviceProfile"},
        ]}  # fmt: skip
        schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if kind == "device":
        schema["properties"]["name"]["description"] = "identifier used in cluster files and plans"
    return schema


# --- markdown --------------------------------------------------------------------------------------------
_SUFFIX_UNITS = (("_bytes", "bytes"), ("_bps", "bytes/s"), ("_s", "s"))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-{name}".lower().replace(" ", "-")


def _type(s: dict[str, Any], kind: str) -> str:
    """A short, readable type of a schema node."""
    if "x-unit" in s:
        return "quantity"
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return f"[{name}](#{_anchor(kind, name)})"
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    if "enum" in s:
        return "one of " + ", ".join(f"`{v}`" for v in s["enum"])
    if "anyOf" in s:
        parts = [p for p in s["anyOf"] if p.get("type") != "null"]
        text = " or ".join(_type(p, kind) for p in parts)
        return text + (" or none" if len(parts) < len(s["anyOf"]) else "")
    t = s.get("type")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(p, kind) for p in s["prefixItems"]) + "]"
        return "list of " + _type(s.get("items", {}), kind)
    if t == "object":
        extra = s.get("additionalProperties")
        if isinstance(extra, dict):
            return "table of name = " + _type(extra, kind)
        return "table"
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}.get(
        t or "", "any"
    )


def _unit(name: str, s: dict[str, Any]) -> str:
    nodes = [s, *s.get("anyOf", []), s.get("additionalProperties") or {}]
    for node in nodes:
        if isinstance(node, dict) and "x-unit" in node:
            return str(node["x-unit"])
    for suffix, unit in _SUFFIX_UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def _bounds(s: dict[str, Any]) -> str:
    """Limits on a value (minimum, maximum, length), from the node and the alternatives it allows."""
    out: list[str] = []

    def add(text: str) -> None:
        if text not in out:
            out.append(text)

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<=")):
            if key in node:
                add(f"{sign} {node[key]}")
        if "minLength" in node:
            add(f"at least {node['minLength']} character(s)")
        if "minItems" in node and "prefixItems" not in node:
            add(f"at least {node['minItems']} entr{'y' if node['minItems'] == 1 else 'ies'}")
        for child in node.get("anyOf", []):
            walk(child)

    walk(s)
    return ", ".join(out)


def _default(name: str, s: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in s:
        return "empty"
    d = s["default"]
    if d is None:
        return "none"
    if d in ({}, []):
        return "empty"
    if isinstance(d, dict):  # a nested record: what is not empty, or a pointer to its fields' defaults
        d = {k: v for k, v in d.items() if v not in ("", [], {}, None)}
        if len(json.dumps(d)) > 40:
            return "its fields' defaults"
    text = json.dumps(d)
    return f"`{text}`" if len(text) <= 40 else f"`{text[:37]}...`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(kind: str, title: str, s: dict[str, Any]) -> list[str]:
    lines = [f'<a id="{_anchor(kind, title)}"></a>', "", f"#### {title}", ""]
    if s.get("description") and title != "top level":
        lines += [_cell(str(s["description"])).replace("``", "`"), ""]
    lines += ["| field | type | unit | default | description |", "|---|---|---|---|---|"]
    required = set(s.get("required", []))
    for name, p in s.get("properties", {}).items():
        desc = str(p.get("description", ""))
        bounds = _bounds(p)
        if bounds:
            desc = f"{desc} ({bounds})" if desc else bounds
        lines.append(f"| `{name}` | {_cell(_type(p, kind))} | {_unit(name, p)} | {_cell(_default(name, p, name in required))} "
                     f"| {_cell(desc)} |")  # fmt: skip
    return [*lines, ""]


def markdown() -> str:
    """docs/formats.md: every format's fields, types, units and defaults, generated from the models."""
    out = [
        "# File formats",
        "",
        "<!-- Generated by `prima-sim schema --markdown > docs/formats.md` from the pydantic models; "
        "tests/test_formats.py fails when this page is stale. Edit the models' field descriptions, not this page. -->",
        "",
        "Every file prima-sim reads is validated where it enters: an unknown key is named (with the closest known "
        "field), a missing required field is named, and a value of the wrong kind or unit is named with what "
        "was expected, in one line. `prima-sim schema KIND` prints the JSON Schema of a format (for editors "
        "and validators). Files are TOML (`.toml`) or JSON (anything else).",
        "",
        "**Quantities** (type *quantity* below) take a plain number in the unit shown or a string with a unit: "
        'sizes `"8 GiB"`, `"512 MB"`; bandwidths `"2 GB/s"`, `"610 Mbps"`, `"1 Gbit/s"`; durations `"5 ms"`, '
        '`"20 us"`; throughputs `"350 GFLOPS"`, `"1.2 TFLOPS"`. Units are case-insensitive; a unit of the wrong '
        'kind (`"2 GB"` for a bandwidth) is an error.',
        "",
        "| format | what | schema |",
        "|---|---|---|",
        *(f"| [{k}](#{k}) | {_cell(v)} | `prima-sim schema {k}` |" for k, v in FORMATS.items()),
        "",
    ]
    for kind in FORMATS:
        s = json_schema(kind)
        out += [f"## {kind}", "", _INTRO[kind], ""]
        out += _table(kind, "top level", s)
        for name, sub in s.get("$defs", {}).items():
            out += _table(kind, name, sub)
    return "\n".join(out).rstrip() + "\n"
