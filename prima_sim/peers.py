"""A plan as the command lines of peer systems: prima.cpp's ``llama-cli`` / ``llama-server`` per device, and
llama.cpp's own RPC split (``ggml-rpc-server`` per device, one ``llama-completion`` on the head).

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

llama.cpp's RPC split (``GGML_RPC=ON``; :func:`llamacpp_rpc_commands`) is a star, not a ring: the head's process
keeps the layers it does not offload (always the *first* ones, mapped from the GGUF, with the token embeddings)
and offloads the rest to the RPC devices, split by ``--tensor-split`` proportions in ``--rpc`` order.
``-ngl N`` counts the output layer as one more layer (``src/llama-model.cpp``: ``i_gpu_start = n_layer + 1 -
N``; layer ``il >= i_gpu_start``, the output being ``il = n_layer``, goes to the first device whose cumulative
share exceeds ``(il - i_gpu_start) / N``), so offloading n layers takes ``-ngl n+1`` and the last device's
share one more, and ``-ot output.weight=CPU`` keeps the output matrix on the head as the plan has it (the
final norm runs on the last device). Every
``ggml-rpc-server`` receives its layers over the network into its own CPU buffers (anonymous memory, never
mapped, so a device whose window does not fit is killed, not paged). Per token the head sends each device its
inputs (the hidden state, positions, mask), has it compute its graph (``GRAPH_COMPUTE``, or ``GRAPH_RECOMPUTE``
when the graph is unchanged) and reads its output back: activations go head -> D1 -> head -> D2 -> head. A plan
maps when it has one round (k = 1) and no GPU layers: the head's window becomes the CPU layers (moved to the
front: the windows' sizes are the plan's, their positions are llama.cpp's), the other devices' windows the
split, in ring order.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field

import numpy as np

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
DEFAULT_RPC_PORT = 50052
"""``ggml-rpc-server``'s default port."""
OUTPUT_ON_HEAD = r"^output\.weight$=CPU,^token_embd\.weight$=CPU"
"""``-ot`` value keeping the output matrix (or the tied embedding table it is a copy of) on the head's CPU
(anchored: llama.cpp matches with ``regex_search``, and ``blk.N.attn_output.weight`` contains ``output.weight``)."""


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


# --- llama.cpp's RPC split ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RpcServer:
    """One ``ggml-rpc-server``: the device it runs in and the layers llama.cpp will give it."""

    device: str
    host: str
    port: int
    layers: LayerRange
    argv: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        """``host:port`` as ``--rpc`` takes it."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RpcCommands:
    """llama.cpp's RPC split of a plan: the servers (start them first) and the head's client."""

    head: str
    head_layers: LayerRange  # the layers the head's own process runs (CPU, mapped from the GGUF)
    n_gpu_layers: int  # repeating layers offloaded to the servers (-ngl is one more: the output layer)
    tensor_split: list[int]  # -ts, in --rpc order (the last one counts the output layer)
    servers: list[RpcServer]
    client: list[str]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"head": self.head, "head_layers": list(self.head_layers), "n_gpu_layers": self.n_gpu_layers,
                "tensor_split": self.tensor_split,
                "servers": [{"device": s.device, "endpoint": s.endpoint, "layers": list(s.layers),
                             "argv": s.argv, "line": shlex.join(s.argv)} for s in self.servers],
                "client": self.client, "client_line": shlex.join(self.client)}  # fmt: skip


def llamacpp_rpc_layers(n_layer: int, n_gpu_layers: int, tensor_split: list[int] | list[float]) -> list[int]:
    """The device of every layer under llama.cpp's layer split, the output layer last (``n_layer + 1`` entries):
    -1 for the CPU (the head's process), else the index in ``--rpc`` order. Mirrors ``llama_model::load_tensors`` (``get_layer_buft_list``) including its
    32-bit float arithmetic, so a test can check that integer proportions give every device exactly its window."""
    n_dev = len(tensor_split)
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act = 0 if n_dev == 0 else min(n_gpu_layers, n_layer + 1)
    splits = np.zeros(n_dev, dtype=np.float32)
    acc = np.float32(0.0)
    for i, x in enumerate(tensor_split):
        acc = np.float32(acc + np.float32(x))
        splits[i] = acc
    if n_dev and acc > 0:
        splits = (splits / acc).astype(np.float32)
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(-1)
            continue
        frac = np.float32(np.float32(il - i_gpu_start) / np.float32(act))
        out.append(int(np.searchsorted(splits, frac, side="right")))
    return out


def llamacpp_rpc_commands(plan: Plan, model_path: str, hosts: dict[str, str] | None = None, *,
                          port: int = DEFAULT_RPC_PORT, prompt: str = "Hello", n_predict: int = 128,
                          threads: dict[str, int] | None = None, binary_dir: str = "",
                          extra: list[str] | None = None) -> RpcCommands:  # fmt: skip
    """llama.cpp's RPC split of ``plan`` (see the module doc): a ``ggml-rpc-server`` per device but the head,
    and the head's ``llama-completion`` with ``--rpc``, ``-ngl``, ``--tensor-split``.

    The client is pinned to what the plan means: ``-sm layer``, ``-fit off`` (llama.cpp would otherwise refit
    the split to the devices' free memory), ``--no-repack`` and ``--load-mode mmap`` (the head's layers stay
    file-backed, as the stock baseline runs them), ``-no-cnv``. ``extra`` is appended. Every server listens on
    ``port``; servers sharing an address (one host, or no ``hosts``: 127.0.0.1) take ``port`` + 1, + 2, ...

    Raises:
        InputError: k >= 2 (llama.cpp runs each device once per token), GPU layers, a port out of range.
    """
    hosts = hosts or {}
    threads = threads or {}
    if plan.k != 1:
        raise InputError("--emit", "", f"llama.cpp's RPC split runs every device once per token (k = 1); the plan "
                         f"has k = {plan.k}")  # fmt: skip
    gpu = [d.name for d in plan.devices if d.gpu_layers > 0]
    if gpu:
        raise InputError(
            "--emit", "", f"the RPC split is mapped for CPU devices only; {gpu[0]} has GPU layers"
        )
    if not 1 <= port <= 65535:
        raise InputError("--rpc-port", "", f"must be in 1..65535, got {port}")
    head, rest = plan.devices[0], [d for d in plan.devices[1:] if d.window > 0]
    n_gpu = sum(d.window for d in rest)
    prefix = binary_dir.rstrip("/") + "/" if binary_dir else ""
    servers = []
    start = head.window
    on_host: dict[str, int] = {}
    for d in rest:
        host = hosts.get(d.name, "127.0.0.1")
        p = port + on_host.get(host, 0)  # servers sharing an address take the next ports
        on_host[host] = on_host.get(host, 0) + 1
        if p > 65535:
            raise InputError("--rpc-port", "", f"{port} + {on_host[host] - 1} servers on {host} passes 65535")
        argv = [f"{prefix}ggml-rpc-server", "-H", host, "-p", str(p)]
        if d.name in threads:
            argv += ["-t", str(threads[d.name])]
        servers.append(RpcServer(d.name, host, p, (start, start + d.window), argv))
        start += d.window
    # -ngl counts the output layer: n layers offloaded = -ngl n+1, the last share one more (the output layer's,
    # whose matrix -ot keeps on the head)
    split = [d.window + (1 if i == len(rest) - 1 else 0) for i, d in enumerate(rest)]
    client = [f"{prefix}llama-completion", "-m", model_path, "-c", str(plan.n_ctx), "-n", str(n_predict),
              "-p", prompt, "-no-cnv", "-sm", "layer", "-fit", "off", "--no-repack", "--load-mode", "mmap",
              "-ngl", str(n_gpu + 1 if servers else 0)]  # fmt: skip
    if servers:
        client += ["--rpc", ",".join(s.endpoint for s in servers), "-ts", ",".join(map(str, split)),
                   "-ot", OUTPUT_ON_HEAD]  # fmt: skip
    if head.name in threads:
        client += ["-t", str(threads[head.name])]
    client += list(extra or [])
    return RpcCommands(head.name, (0, head.window), n_gpu, split, servers, client)


def format_rpc_commands(rc: RpcCommands) -> str:
    """llama.cpp's RPC split as a shell-ready text: the servers first, then the head's client."""
    lines = ["# llama.cpp's RPC split (GGML_RPC=ON): start every ggml-rpc-server first, then the head's client.",
             "# The servers receive their layers over the network into memory (not mapped): each must fit its window."]  # fmt: skip
    for s in rc.servers:
        lines.append(f"\n# {s.device}: ggml-rpc-server on {s.endpoint}; layers [{s.layers[0]},{s.layers[1]})")
        lines.append(shlex.join(s.argv))
    a, b = rc.head_layers
    lines.append(
        f"\n# {rc.head}: llama-completion, layers [{a},{b}) on its own CPU (mapped), embeddings and output head"
    )
    lines.append(shlex.join(rc.client))
    return "\n".join(lines)


_PERF = re.compile(r"(prompt eval|\beval) time =\s*([\d.]+) ms /\s*(\d+) (tokens|runs)")


def parse_llama_perf(log_text: str) -> tuple[float, float]:
    """(TPOT, TTFT) in seconds from llama.cpp's ``llama_perf_context_print`` lines (prima.cpp's ``llama-cli``
    and stock ``llama-completion`` print the same): ``eval time`` over its runs (a mean of the decode steps),
    ``prompt eval time``. NaN where a line is missing (the last of each kind counts)."""
    tpot = ttft = math.nan
    for m in _PERF.finditer(log_text):
        ms, n = float(m.group(2)), int(m.group(3))
        if m.group(1) == "prompt eval":
            ttft = ms / 1e3
        elif n > 0:
            tpot = ms / 1e3 / n
    return tpot, ttft
