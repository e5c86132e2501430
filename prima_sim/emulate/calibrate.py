"""What every emulated device can do, measured inside its limits: profiles, decode streaming rates, the
executor's own memory.

:class:`Calibrator` runs, inside a :class:`~prima_sim.emulate.testbed.Testbed`:

- ``prima-sim profile`` in every distinct device, repeated (the median of every rate kept: :func:`median_profile`);
  devices with identical limits share one measurement (:func:`profile_key`), optionally cached across runs;
- the decode calibration (:meth:`Calibrator.calibrate_decode`): llama.cpp's own streaming rates on two small
  shards of the model (:class:`ProbeShards`), measured by :mod:`prima_sim.exec.stream_probe` in a cgroup with
  the device's CPU limits, written into the profiles (:func:`with_rates`), and the rate its prompt's
  micro-batches compute at (:func:`with_prefill_times`);
- the executor's footprint (:meth:`Calibrator.runtime_footprint`, :mod:`prima_sim.exec.footprint_probe`),
  which :func:`with_executor_overhead` subtracts from the memory a device has for the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import prima_sim
from prima_sim.devices.model import ModelProfile
from prima_sim.devices.profile import DeviceProfile
from prima_sim.emulate import cgroups as cg
from prima_sim.emulate.scenario import DeviceSpec
from prima_sim.emulate.spawn import cli_command, log_tail, module_command, stop
from prima_sim.emulate.testbed import Testbed
from prima_sim.errors import EmulationError
from prima_sim.schema import dump_model, load_model

log = logging.getLogger(__name__)

_MEDIAN_FIELDS = ("memory_bandwidth_bps", "kv_copy_s_per_layer", "decode_overhead_s", "disk_seq_read_bps",
                  "disk_rand_read_bps")  # fmt: skip


def profile_key(dev: DeviceSpec, model: ModelProfile, quick: bool, repeats: int = 1) -> str:
    """What makes two profiles of this host interchangeable: the device's limits, the model's weight types and
    width, the profiler's mode and version."""
    key = {
        "host": socket.gethostname(), "memory": dev.memory, "cpus": dev.cpus, "cpuset": dev.cpuset,
        "threads": dev.threads, "disk_read": dev.disk_read, "types": sorted(model.weight_types()),
        "n_embd": model.arch.n_embd, "quick": quick, "version": prima_sim.__version__, "repeats": repeats,
    }  # fmt: skip
    if dev.swap:  # only when set, so that the keys of devices without swap stay what they were
        key["swap"] = dev.swap
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def median_profile(runs: list[DeviceProfile]) -> DeviceProfile:
    """One profile from repeated measurements of a device: the median of every rate and time (CPU throughput
    per type included); memory and everything else from the first run. One run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    base = runs[0]
    upd: dict[str, Any] = {f: statistics.median(getattr(r, f) for r in runs) for f in _MEDIAN_FIELDS}
    upd["cpu_flops"] = {
        t: statistics.median(r.cpu_flops.get(t, v) for r in runs) for t, v in base.cpu_flops.items()
    }
    spread = ", ".join(f"{r.memory_bandwidth_bps / 1e9:.2f}" for r in runs)
    upd["sources"] = {
        **base.sources,
        "repeats": f"median of {len(runs)} profiler runs (memory_bandwidth GB/s: {spread})",
    }
    return base.model_copy(update=upd)


@dataclass(frozen=True)
class ProbeShards:
    """The decode calibration's shards of a model and what they hold.

    Attributes:
        layers: a vocabulary-free shard of the model's first :attr:`n_layers` layers (what a worker runs).
        head: a logits shard of the last layer and the output head (what the head runs).
        n_layers: layers in :attr:`layers`.
        layer_bytes: weight bytes of those layers.
        out_bytes: weight bytes of the output head.
        extra_types: ggml types of the output head's matrices that no layer uses (their rate is the head's).
        model: the model's id.
    """

    layers: Path
    head: Path
    n_layers: int
    layer_bytes: int
    out_bytes: int
    extra_types: tuple[str, ...]
    model: str


def write_probe_shards(model_path: Path, model: ModelProfile, dest: Path) -> ProbeShards | None:
    """Write the calibration shards of ``model`` under ``dest`` (None: the model has fewer than 3 layers)."""
    from prima_sim.exec.shard import write_shards
    from prima_sim.halda.costmodel import output_tensors
    from prima_sim.plan import Plan, make_assignments

    L = model.arch.n_layer
    if L < 3:
        return None
    n = max(1, min(8, L - 2, -(-(256 << 20) // max(1, int(model.mean_layer_bytes)))))
    probe_plan = Plan(model_id=model.id, n_layers=L, cluster_name="calibration", k=1, n_ctx=256,
                      devices=make_assignments(["h", "w", "m"], [1, n, L - 1 - n], [0, 0, 0], L),
                      scheduler="manual")  # fmt: skip
    mans = write_shards(model_path, probe_plan, dest, ["w", "h"])
    out_t = output_tensors(model)
    layer_types = {t.ggml_type for i in range(L) for t in model.layer_tensors(i) if len(t.shape) > 1}
    return ProbeShards(
        layers=dest / "w" / mans["w"].shards[0].file,
        head=dest / "h" / next(sh.file for sh in mans["h"].shards if sh.kind == "logits"),
        n_layers=n,
        layer_bytes=sum(model.layer_bytes[i] for i in range(n)),
        out_bytes=sum(t.n_bytes for t in out_t),
        extra_types=tuple(sorted({t.ggml_type for t in out_t if len(t.shape) > 1} - layer_types)),
        model=model.id,
    )


def with_rates(
    prof: DeviceProfile, probe: ProbeShards | None, layer_bps: float, out_bps: float, note: str
) -> DeviceProfile:
    """``prof`` with llama.cpp's measured streaming rates (layers; the output head's type if the layers
    do not use it)."""
    upd: dict[str, Any] = {"memory_bandwidth_bps": layer_bps,
                           "sources": {**prof.sources, "memory_bandwidth_bps": note}}  # fmt: skip
    if probe is not None and probe.extra_types:
        upd["matvec_bps"] = {**prof.matvec_bps, **dict.fromkeys(probe.extra_types, out_bps)}
        upd["sources"]["matvec_bps"] = (
            f"{', '.join(probe.extra_types)}: {out_bps / 1e9:.2f} GB/s: the output head "
            f"({probe.out_bytes / 2**20:.0f} MiB) decoded by llama.cpp inside the device (a logits shard "
            f"of the last layer and the output head: bytes / (time per token - one layer - decode overhead))"
        )  # fmt: skip
    return prof.model_copy(update=upd)


def with_prefill_times(prof: DeviceProfile, model: ModelProfile, n_layers: int, measured: dict[int, float],
                       note: str) -> DeviceProfile:  # fmt: skip
    """``prof`` whose ``cpu_batch_efficiency`` makes the cost model's prefill of layers ``[0, n_layers)`` of
    ``model`` take the ``measured`` seconds ({tokens: seconds of one prefill of that many tokens from position 0,
    one llama_decode}).

    A measured size where the cost model's layers are compute-bound gets the efficiency that matches it
    (``old x predicted compute / (measured - decode overhead - KV copies)``); the profile's other sizes are
    scaled by the ratio of the nearest measured size (in log tokens), so the curve keeps its shape. Sizes below
    2 tokens (a decode, bound by memory) and sizes that are not compute-bound are left alone."""
    from prima_sim.halda.costmodel import DeviceCosts
    from prima_sim.workload import Workload

    costs = DeviceCosts(prof, model, Workload())
    new: dict[int, float] = {}
    ratio: dict[int, float] = {}
    notes = []
    for n, t in sorted(measured.items()):
        lts = [costs.layer_time(i, False, n, n) for i in range(n_layers)]
        comp, mem = sum(x.compute_s for x in lts), sum(x.memory_s for x in lts)
        work = t - prof.decode_overhead_s - sum(x.kv_copy_s for x in lts)
        if n < 2 or comp <= mem or work <= 0:
            notes.append(f"{n} tokens: {t * 1e3:.1f} ms, not compute-bound, not used")
            continue
        old = prof.batch_efficiency(n)
        new[n] = round(old * comp / work, 4)
        ratio[n] = new[n] / old
        notes.append(f"{n} tokens: {t * 1e3:.1f} ms where the profile predicted {comp * 1e3:.1f} ms of compute "
                     f"({old:.3f} -> {new[n]:.3f})")  # fmt: skip
    if not new:
        return prof
    for k, e in prof.cpu_batch_efficiency.items():
        if k not in new:
            near = min(ratio, key=lambda m: abs(math.log(m) - math.log(k)))
            new[k] = round(e * ratio[near], 4)
    sources = {**prof.sources, "cpu_batch_efficiency": f"{note}: " + "; ".join(notes)}
    return prof.model_copy(update={"cpu_batch_efficiency": dict(sorted(new.items())), "sources": sources})


class ProbeResult(NamedTuple):
    """One run of :mod:`prima_sim.exec.stream_probe` in a device (:meth:`Calibrator.probe_rates`)."""

    layer_bps: float
    """bytes per second the layers' window streams at in a one-token decode"""
    out_bps: float
    """the output head's rate likewise"""
    prefill_s: dict[int, float]
    """{tokens: seconds of one prefill of that many tokens by the layers' window} (empty: not asked for)"""


def median_rates(probes: list[ProbeResult]) -> ProbeResult:
    """One device's ``probes`` as one: the median of every rate, and of every prefill size all of them timed."""
    sizes = [n for n in probes[0].prefill_s if all(n in x.prefill_s for x in probes)]
    return ProbeResult(
        statistics.median(x.layer_bps for x in probes),
        statistics.median(x.out_bps for x in probes),
        {n: statistics.median(x.prefill_s[n] for x in probes) for n in sizes},
    )


class Footprint(NamedTuple):
    """The executor's own anonymous memory, measured in a device (:meth:`Calibrator.runtime_footprint`); none of
    it is in the cost model's pinned memory (KV cache, compute buffers). Zero: not measured."""

    worker: int
    """a ``prima-sim worker`` process before it loads a shard: interpreter, imports, llama.cpp initialised"""
    head: int
    """the head's process (``prima-sim run --real``) likewise"""
    vocab: int
    """what loading the model's tokenizer adds (llama.cpp's vocabulary structures): the head holds one copy (its
    logits window's shard carries it and embeds too; a head that does not run the last layer has ``embed.gguf``)"""


NOT_MEASURED = Footprint(0, 0, 0)


def executor_overhead(fp: Footprint, is_head: bool) -> int:
    """Anonymous memory the executor's process holds on a device beyond the cost model's pinned memory: its
    runtime, and on the head the tokenizer."""
    return fp.head + fp.vocab if is_head else fp.worker


def with_executor_overhead(prof: DeviceProfile, limit: int, overhead: int, is_head: bool) -> DeviceProfile:
    """``prof`` with the memory the model may use once the executor runs: the cgroup limit minus the executor's
    own footprint (the profiler measured the limit minus *its* footprint, a different process).

    A device with swap (``prof.swap_total_bytes`` > 0, the profiler saw the group's memory+swap limit) also gets
    ``swappable_bytes`` = that footprint: anonymous memory no decode step touches, which Linux swaps out to make
    page-cache room (docs/pagecache.md, "Swap")."""
    avail = max(0, min(prof.ram_total_bytes, limit) - overhead)
    note = (f"{avail / 2**20:.1f} MiB: the device's memory limit {limit / 2**20:.0f} MiB minus the executor's own "
            f"anonymous memory {overhead / 2**20:.1f} MiB (Python runtime" + (" and the tokenizer" if is_head else "")
            + f", measured by prima-sim emulate); the profiler measured {prof.ram_available_bytes / 2**20:.1f} MiB "
            f"with its own process resident")  # fmt: skip
    sources = {**prof.sources, "ram_available_bytes": note}
    update: dict[str, object] = {"ram_available_bytes": avail, "sources": sources}
    if prof.swap_total_bytes > 0:
        update["swappable_bytes"] = overhead
        sources["swappable_bytes"] = (
            f"{overhead / 2**20:.1f} MiB: the executor's own anonymous memory (cold: no decode step touches it), "
            f"which the kernel can swap out to this device's {prof.swap_total_bytes / 2**20:.0f} MiB of swap"
        )
    return prof.model_copy(update=update)


class Calibrator:
    """Measurements of the devices of ``tb`` (see the module doc).

    Args:
        tb: the set-up testbed.
        out: the run's output directory (``profiles/`` and ``logs/`` go there).
        quick: ``prima-sim profile --quick``.
        repeats: profiler runs per distinct device.
        cache: reuse profiles measured under identical limits on this host (None = always profile).
        say: called with one line per step.
    """

    def __init__(self, tb: Testbed, out: Path, *, quick: bool = False, repeats: int = 3,
                 cache: Path | None = None, say: Callable[[str], None] = log.info) -> None:  # fmt: skip
        self.tb = tb
        self.out = out
        self.quick = quick
        self.repeats = repeats
        self.cache = cache
        self.say = say
        self.probe: ProbeShards | None = None
        self.key_of: dict[str, str] = {}  # device -> the device whose rates it shares (calibrate_decode)
        self.prefill_sizes: tuple[int, ...] = ()  # the prompt micro-batch sizes calibrate_decode timed

    def key(self, dev: DeviceSpec, model: ModelProfile) -> str:
        """:func:`profile_key` of ``dev`` with this calibrator's profiler settings."""
        return profile_key(dev, model, self.quick, self.repeats)

    # --- profiles --------------------------------------------------------------------------------------------
    def profile_devices(self, model_path: Path, model: ModelProfile) -> dict[str, DeviceProfile]:
        """Profile every device inside its limits: ``prima-sim profile`` as a process in the device's cgroup and
        namespace. Devices with identical limits share one measurement (taken in the first of them), so that
        equal devices get equal profiles; each distinct device is profiled ``repeats`` times, the rounds
        interleaved across devices, and the median of every rate is kept (this host's memory bandwidth
        drifts by tens of percent within seconds: one 0.5 s sample is not the device's typical speed)."""
        ring = self.tb.ring
        pdir = self.out / "profiles"
        pdir.mkdir(parents=True, exist_ok=True)
        keys = {d.name: self.key(d, model) for d in ring}
        first: dict[str, DeviceSpec] = {}
        for d in ring:
            first.setdefault(keys[d.name], d)
        measured: dict[str, DeviceProfile] = {}
        todo: list[str] = []
        for key, d in first.items():
            cached = self.cache / f"{key}.json" if self.cache is not None else None
            if cached is not None and cached.is_file():
                measured[key] = load_model(DeviceProfile, cached)
                self.say(f"profile {d.name}: reused {cached} (measured earlier under the same limits)")
            else:
                todo.append(key)
        runs: dict[str, list[DeviceProfile]] = {k: [] for k in todo}
        for r in range(self.repeats if todo else 0):
            for key in todo:
                d = first[key]
                dest = pdir / f"{d.name}.run{r}.json"
                cg.drop_caches()
                cmd = cli_command("profile", "--model", str(model_path), "--out", str(dest), "--name", d.name,
                                  "--no-progress", "--disk-dir", str(self.tb.work))  # fmt: skip
                if self.quick:
                    cmd.append("--quick")
                if d.threads:
                    cmd += ["--threads", str(d.threads)]
                t0 = time.monotonic()
                logf = self.out / "logs" / f"profile-{d.name}.run{r}.log"
                rc = self.tb.spawn_in(d.name, cmd, logf, {"OMP_WAIT_POLICY": "passive"}).wait()
                if rc != 0 or not dest.is_file():
                    raise EmulationError(f"profiling {d.name} failed (exit {rc}): {log_tail(logf)}")
                runs[key].append(load_model(DeviceProfile, dest))
                self.say(f"profile {d.name} ({r + 1}/{self.repeats}): measured inside its limits in "
                         f"{time.monotonic() - t0:.0f} s")  # fmt: skip
        for key in todo:
            measured[key] = median_profile(runs[key])
            if self.cache is not None:
                self.cache.mkdir(parents=True, exist_ok=True)
                dump_model(measured[key], self.cache / f"{key}.json")
        out: dict[str, DeviceProfile] = {}
        for d in ring:
            prof = measured[keys[d.name]]
            upd: dict[str, Any] = {"name": d.name, "os": d.os}
            if d.threads:
                upd["threads"] = d.threads
            if first[keys[d.name]].name != d.name:
                upd["sources"] = {
                    **prof.sources,
                    "emulation": f"measured in {first[keys[d.name]].name}, whose limits are identical",
                }
            if d.os != "linux":
                upd["sources"] = {**upd.get("sources", prof.sources),
                                  "os": f"{d.os}: assumed by the scenario (the emulating host runs Linux)"}  # fmt: skip
            out[d.name] = prof.model_copy(update=upd)
            dump_model(out[d.name], pdir / f"{d.name}.json")
        return out

    # --- decode calibration ----------------------------------------------------------------------------------
    def probe_rates(
        self, name: str, prof: DeviceProfile, tokens: int = 40, tag: str = "", prefill: tuple[int, ...] = ()
    ) -> ProbeResult:
        """Layer rate and output-head rate in bytes per second: llama.cpp decoding the calibration shards token by
        token with device ``name``'s CPU limits: ``bytes / (median time per token - decode overhead)``; and the
        seconds the layers' shard takes to prefill each of the ``prefill`` sizes.

        The probe runs in a calibration cgroup that has the device's CPU quota or cpuset but neither its memory
        nor its disk limit: it measures how fast the device streams weights that are in memory (a device too
        small to hold the probe's shards would otherwise measure its disk)."""
        pb = self.probe
        assert pb is not None, "no calibration shards (calibrate_decode writes them)"
        group = self.tb.calibration_group(name)
        logf = self.out / "logs" / f"calibrate-{name}{tag}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        cmd = module_command("prima_sim.exec.stream_probe", str(pb.layers), str(pb.head), "--threads",
                             str(prof.n_threads), "--tokens", str(tokens))  # fmt: skip
        if prefill:
            cmd += ["--prefill", ",".join(map(str, prefill))]
        with logf.open("wb") as err:
            proc = self.tb.spawn(name, cmd, group, env={"OMP_WAIT_POLICY": "passive"}, stdout=subprocess.PIPE,
                                 stderr=err)  # fmt: skip
            out, _ = proc.communicate(timeout=600)
        try:
            res = json.loads(out.decode().strip().splitlines()[-1])
            layers_s, head_s = float(res["layers_s"]), float(res["head_s"])
            pre = {int(n): float(t) for n, t in res.get("prefill_s", {}).items()}
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            raise EmulationError(f"decode calibration in {name} failed: {log_tail(logf)}") from None
        t_layers = max(1e-6, layers_s - prof.decode_overhead_s)
        t_out = max(1e-6, head_s - prof.decode_overhead_s - t_layers / pb.n_layers)
        return ProbeResult(pb.layer_bytes / t_layers, pb.out_bytes / t_out, pre)

    def with_rates(self, prof: DeviceProfile, layer_bps: float, out_bps: float, note: str) -> DeviceProfile:
        """:func:`with_rates` with this calibration's shards."""
        return with_rates(prof, self.probe, layer_bps, out_bps, note)

    def with_prefill(self, prof: DeviceProfile, model: ModelProfile, prefill_s: dict[int, float],
                     note: str) -> DeviceProfile:  # fmt: skip
        """:func:`with_prefill_times` for this calibration's layers shard (``prof`` as it is without a shard or
        times)."""
        if self.probe is None or not prefill_s:
            return prof
        return with_prefill_times(prof, model, self.probe.n_layers, prefill_s, note)

    def calibrate_decode(self, model_path: Path, model: ModelProfile, profiles: dict[str, DeviceProfile],
                         repeats: int = 3, prefill: tuple[int, ...] = ()) -> dict[str, DeviceProfile]:  # fmt: skip
        """Measure, inside every distinct device, the rates at which llama.cpp's decode streams this model's
        weights, and put them in the profile: ``memory_bandwidth_bps`` (the layers) and ``matvec_bps`` for the
        output head's type when the layers do not use it; with ``prefill`` (the prompt's micro-batch sizes),
        also the rate its prefill computes at (``cpu_batch_efficiency``, :func:`with_prefill_times`).

        The profiler measures the layer rate with a ggml micro-benchmark (decode-shaped matrix-vector products
        of the model's layer-0 matrices), which on this project's hosts streams about a tenth slower than
        llama.cpp's own decode, and it has one rate for every type, while with one thread a Q6_K output head
        streams about twice as fast as Q4_0 layers (dequantization, not memory, bounds them). So the emulation
        measures the executor itself on the calibration shards (:meth:`probe_rates`). The prefill rate is the
        profiler's ggml matrix products at a few batch sizes, which agree with llama.cpp when measured together;
        but a prompt is compute-bound, and this host's compute rate drifts by ~10% within an hour while its
        memory bandwidth does not, and profiles are reused from a cache across hours: measured here, beside the
        decode, a prediction's TTFT rests on the rate of the hour it runs in.
        """
        self.probe = write_probe_shards(model_path, model, self.tb.work / "calibration")
        if self.probe is None:
            return profiles
        pb = self.probe
        ring = self.tb.ring
        keys: dict[str, str] = {}
        for d in ring:
            keys.setdefault(self.key(d, model), d.name)
        # stream_probe times sizes up to its context (N_CTX, 256); one token is a decode, not a prefill
        sizes = self.prefill_sizes = tuple(sorted({n for n in prefill if 2 <= n <= 256}))
        rates: dict[str, list[ProbeResult]] = {name: [] for name in keys.values()}
        for r in range(repeats):
            for name in keys.values():
                cg.drop_caches()
                rates[name].append(self.probe_rates(name, profiles[name], 40, f".run{r}", sizes))
        out_profiles = dict(profiles)
        self.key_of = {d.name: keys[self.key(d, model)] for d in ring}
        for d in ring:
            src = self.key_of[d.name]
            lay, outr, pre = median_rates(rates[src])
            prof = profiles[d.name]
            note = (f"{lay / 1e9:.2f} GB/s: llama.cpp decoding a vocabulary-free shard of layers 0-{pb.n_layers - 1}"
                    f" of {model.id} ({pb.layer_bytes / 2**20:.0f} MiB) token by token inside the emulated "
                    f"device: bytes / (median time per token - decode overhead), median of {len(rates[src])} runs "
                    f"({', '.join(f'{x.layer_bps / 1e9:.2f}' for x in rates[src])} GB/s); the profiler's ggml "
                    f"benchmark measured {prof.memory_bandwidth_bps / 1e9:.2f} GB/s")  # fmt: skip
            cal = self.with_rates(prof, lay, outr, note)
            cal = self.with_prefill(cal, model, pre, f"llama.cpp prefilling the same shard inside the emulated "
                                    f"device, median of {len(rates[src])} runs")  # fmt: skip
            out_profiles[d.name] = cal
            eff = ", ".join(
                f"{n} tokens {prof.batch_efficiency(n):.3f} -> {cal.batch_efficiency(n):.3f}" for n in pre
            )
            self.say(f"calibration {d.name}: llama.cpp streams the layers at {lay / 1e9:.2f} GB/s (profiler: "
                     f"{prof.memory_bandwidth_bps / 1e9:.2f} GB/s)"
                     + (f", the {'/'.join(pb.extra_types)} output head at {outr / 1e9:.2f} GB/s"
                        if pb.extra_types else "")
                     + (f"; prefill efficiency {eff}" if eff else ""))  # fmt: skip
        return out_profiles

    # --- the executor's footprint ----------------------------------------------------------------------------
    def runtime_footprint(self, model_path: Path) -> Footprint:
        """The executor's :class:`Footprint`, measured in the first device's cgroup: a worker's and the head's
        runtime (each role's process as its command imports it, llama.cpp initialised, before any model) and what
        the model's vocabulary adds. On a device of a few hundred MiB they decide whether a window fits: see
        :func:`executor_overhead`. The process is :mod:`prima_sim.exec.footprint_probe`; :data:`NOT_MEASURED`
        when the worker's probe fails."""
        worker, _ = self._probe_footprint(model_path, "worker", vocab=False)
        if not worker:
            return NOT_MEASURED
        head, vocab = self._probe_footprint(model_path, "head", vocab=True)
        return Footprint(worker, head or worker, vocab)

    def _probe_footprint(self, model_path: Path, role: str, vocab: bool) -> tuple[int, int]:
        """(runtime, vocabulary) anonymous bytes of ``role``'s probe process in the first device's cgroup."""
        tb = self.tb
        d = tb.ring[0].name
        g = tb.groups[d]
        logf = self.out / "logs" / f"runtime-footprint-{role}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        cg.drop_caches()
        with logf.open("wb") as err:
            cmd = module_command("prima_sim.exec.footprint_probe", "--role", role, str(model_path))
            proc = tb.spawn(d, cmd, g, netns=tb.net.nodes[d].ns if tb.net else None, stdout=subprocess.PIPE,
                            stderr=err, stdin=subprocess.PIPE)  # fmt: skip
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != b"runtime":
                return 0, 0
            time.sleep(0.2)
            runtime = int(g.memory_stat().get("anon", 0))
            if not vocab:
                return runtime, 0
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != b"vocab":
                return runtime, 0
            time.sleep(0.2)
            return runtime, max(0, int(g.memory_stat().get("anon", 0)) - runtime)
        except (OSError, BrokenPipeError):
            return 0, 0
        finally:
            stop(proc, 1.0)
