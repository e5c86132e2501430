"""A plan as the command lines of peer systems: prima.cpp's ``llama-cli`` / ``llama-server`` per device.

prima.cpp (github.com/Lizonghang/prima.cpp) runs the same piped ring as this project: rank 0 is the head, and
inside every round the windows run in the order rank 1, rank 2, ..., rank M-1, rank 0 (``this_layer_is_mine``
in its src/llama.cpp), exactly a :class:`~prima_sim.plan.Plan`'s ring order. So a plan maps one to one:

* ``--world M``, ``--rank r``: the plan's devices in ring order, the head rank 0;
* ``-lw w0,w1,...`` (rank 0 only; broadcast to the others): the windows in ring order. With manual windows
  prima.cpp neither profiles nor solves (no HiGHS, no fio needed) and sends no GPU layer counts, so every
  rank gives its own ``-ngl`` (the plan's GPU layers per window, the last ones of each window as in the plan);
* ``--master IP`` (rank 0's address) and ``--next IP`` (the next rank's; the last rank's is the master's);
* ports: rank r listens on ``--data-port`` + r and ``--signal-port`` + r, the same bases on every rank, so
  ranks on one host do not collide;
* ``-c`` (rank 0's context is broadcast), ``-t`` (the profile's threads), ``--prefetch`` (and ``--force``).

prima.cpp refuses a window of 0 (``-lw`` takes positive integers only): such a plan has no prima.cpp command.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from prima_sim.errors import InputError
from prima_sim.plan import LayerRange, Plan

DEFAULT_DATA_PORT = 9000
"""prima.cpp's default ``--data-port`` (rank r listens on it + r)."""
DEFAULT_SIGNAL_PORT = 10000
"""prima.cpp's default ``--signal-port`` (rank r listens on it + r)."""
DEFAULT_SERVER_PORT = 8080
"""``llama-server``'s default HTTP port."""
MAX_WORLD = 32
"""prima.cpp's fixed arrays hold at most 32 ranks."""


@dataclass(frozen=True)
class PrimaCommand:
    """What one device runs."""

    device: str
    rank: int
    host: str
    window: int
    gpu_layers: int
    layers: tuple[LayerRange, ...]
    cli: list[str] = field(default_factory=list)
    server: list[str] = field(default_factory=list)
    data_port: int = DEFAULT_DATA_PORT
    signal_port: int = DEFAULT_SIGNAL_PORT

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"device": self.device, "rank": self.rank, "host": self.host, "window": self.window,
                "gpu_layers": self.gpu_layers, "layers": [list(r) for r in self.layers],
                "data_port": self.data_port, "signal_port": self.signal_port,
                "llama_cli": self.cli, "llama_server": self.server,
                "llama_cli_line": shlex.join(self.cli), "llama_server_line": shlex.join(self.server)}  # fmt: skip


def primacpp_layers(windows: list[int] | tuple[int, ...], n_layer: int) -> list[list[int]]:
    """The layers each rank runs under prima.cpp's ``-lw windows`` (its ``this_layer_is_mine``: cumulative
    windows walked from rank 1, wrapping to rank 0, cycle after cycle; a partial last cycle is allowed)."""
    n = len(windows)
    out: list[list[int]] = [[] for _ in range(n)]
    cycle = sum(windows)
    if cycle <= 0:
        return out
    for layer in range(n_layer):
        pos = layer % cycle
        rank, cum = 1 % n, 0
        while True:
            cum += windows[rank]
            if pos < cum:
                out[rank].append(layer)
                break
            rank = (rank + 1) % n
    return out


def primacpp_commands(plan: Plan, model_path: str, hosts: dict[str, str] | None = None, *,
                      data_port: int = DEFAULT_DATA_PORT, signal_port: int = DEFAULT_SIGNAL_PORT,
                      prompt: str = "Hello", n_predict: int = 128, prefetch: bool = True, force: bool = False,
                      threads: dict[str, int] | None = None, server_host: str = "0.0.0.0",
                      server_port: int = DEFAULT_SERVER_PORT, binary_dir: str = "") -> list[PrimaCommand]:  # fmt: skip
    """The ``llama-cli`` (and, for rank 0, ``llama-server``) argv of every device of ``plan``, in rank order.

    Args:
        plan: the plan (ring order = rank order, head = rank 0).
        model_path: the GGUF every rank loads (prima.cpp maps the whole file and keeps its own layers).
        hosts: device -> address; a device not listed is 127.0.0.1.
        data_port, signal_port: the port bases (the same on every rank).
        prompt, n_predict: rank 0's ``-p`` and ``-n``.
        prefetch, force: add ``--prefetch`` (and ``--force``) on every rank.
        threads: device -> ``-t``; a device not listed gets none (llama.cpp's default).
        server_host, server_port: ``llama-server``'s HTTP address (rank 0).
        binary_dir: prefix of the binaries (a build directory), "" for the PATH.

    Raises:
        InputError: a window of 0, more than 32 devices, ports out of range or overlapping.
    """
    hosts = hosts or {}
    threads = threads or {}
    unknown = sorted(set(hosts) - {d.name for d in plan.devices} - {d.name for d in plan.dropped})
    if unknown:
        raise InputError("--hosts", f"devices.{unknown[0]}", "is not a device of the plan")
    m = len(plan.devices)
    if m > MAX_WORLD:
        raise InputError("--emit", "", f"prima.cpp runs at most {MAX_WORLD} ranks, the plan has {m} devices")
    zero = [d.name for d in plan.devices if d.window <= 0]
    if zero:
        raise InputError(
            "--emit",
            "",
            f"prima.cpp's -lw takes positive windows only; the plan gives {zero[0]} a window of 0",
        )
    for flag, base in (("--data-port", data_port), ("--signal-port", signal_port)):
        if base < 1 or base + m - 1 > 65535:
            raise InputError(flag, "", f"ports {base}..{base + m - 1} (one per rank) must lie in 1..65535")
    if data_port < signal_port + m and signal_port < data_port + m:
        raise InputError("--signal-port", "", f"ports {signal_port}..{signal_port + m - 1} overlap the data ports "
                         f"{data_port}..{data_port + m - 1}")  # fmt: skip
    if not 1 <= server_port <= 65535:
        raise InputError("--server-port", "", f"must be in 1..65535, got {server_port}")
    addr = [hosts.get(d.name, "127.0.0.1") for d in plan.devices]
    on_head_host = {p for r in range(m) if addr[r] == addr[0] for p in (data_port + r, signal_port + r)}
    if server_port in on_head_host:
        raise InputError("--server-port", "", f"{server_port} is a ring port of a rank on {addr[0]}")
    lw = ",".join(str(d.window) for d in plan.devices)
    prefix = binary_dir.rstrip("/") + "/" if binary_dir else ""
    out = []
    for r, d in enumerate(plan.devices):
        ring = ["--world", str(m), "--rank", str(r), "--master", addr[0], "--next", addr[(r + 1) % m],
                "--data-port", str(data_port), "--signal-port", str(signal_port)]  # fmt: skip
        common = ["-m", model_path, *ring]
        if r == 0:
            common += ["-lw", lw, "-c", str(plan.n_ctx)]
        common += ["-ngl", str(d.gpu_layers)]
        if d.name in threads:
            common += ["-t", str(threads[d.name])]
        if prefetch:
            common.append("--prefetch")
            if force:
                common.append("--force")
        cli = [f"{prefix}llama-cli", *common]
        server: list[str] = []
        if r == 0:
            cli += ["-n", str(n_predict), "-p", prompt]
            server = [f"{prefix}llama-server", *common, "--host", server_host, "--port", str(server_port)]
        out.append(PrimaCommand(d.name, r, addr[r], d.window, d.gpu_layers, d.layers, cli, server, data_port,
                                signal_port))  # fmt: skip
    return out


def format_commands(cmds: list[PrimaCommand]) -> str:
    """The commands as a shell-ready text: one block per device, workers first (start them before rank 0)."""
    lines = ["# prima.cpp, one process per device; start ranks 1..M-1 first, then rank 0 (llama-cli, or",
             "# llama-server for an OpenAI-compatible API: the other ranks run llama-cli either way)."]  # fmt: skip
    for c in [*cmds[1:], cmds[0]]:
        spans = " ".join(f"[{a},{b})" for a, b in c.layers)
        lines.append(f"\n# {c.device}: rank {c.rank} on {c.host} (ports {c.data_port + c.rank}, "
                     f"{c.signal_port + c.rank}); window {c.window}, {c.gpu_layers} on GPU; layers {spans}")  # fmt: skip
        lines.append(shlex.join(c.cli))
        if c.server:
            lines.append("# or, as a server:")
            lines.append(shlex.join(c.server))
    return "\n".join(lines)
