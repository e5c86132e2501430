"""``run --local``: every worker of the ring as a subprocess of this host, over loopback.

All workers share one new process group. The group is killed on every way out of the ``with`` block (normal
end, an error of the head, Ctrl-C), and each worker also asks the kernel to kill it if the head process dies
(``PR_SET_PDEATHSIG``), so no worker outlives the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prima_sim
from prima_sim.errors import WorkerError
from prima_sim.exec.llamacpp import flash_attn_enabled
from prima_sim.workload import DEFAULT_UBATCH

GRACEFUL_EXIT_S = 5.0  # after 'stop', how long workers get to exit on their own
TERM_GRACE_S = 2.0  # after SIGTERM, how long before SIGKILL
LOG_TAIL_CHARS = 600  # how much of a dead worker's log an error message quotes
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the process-group kill still applies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalWorkers:
    """The worker processes of a loopback ring.

    Args:
        devices: (name, shard directory, threads) of every non-head device.
        hosts_file: the hosts.toml every worker reads.
        log_dir: where each worker's stderr goes (``<device>.log``).
        prefetch: pass ``--no-prefetch`` when False.
        n_batch: prefill batch, same as the head's.
        n_seq: sequences each window's KV cache holds (``--parallel``).
        omp_wait_policy: ``OMP_WAIT_POLICY`` of the workers: "passive" (idle OpenMP threads sleep at once),
            "active" (they spin), or None (libgomp's default: spin a while, then sleep).
        link_latency: emulated link latencies, passed as ``--link-latency``.
        flash_attn: the workers' contexts use flash attention (``--flash-attn``); None: as this process's
            (:func:`prima_sim.exec.llamacpp.flash_attn_enabled`, what ``--flash-attn`` set).
    """

    def __init__(
        self, devices: list[tuple[str, Path, int]], hosts_file: Path, log_dir: Path, prefetch: bool = True,
        n_batch: int = DEFAULT_UBATCH, omp_wait_policy: str | None = "passive", n_seq: int = 1,
        link_latency: dict[str, dict[str, float]] | None = None, flash_attn: bool | None = None,
    ) -> None:  # fmt: skip
        self.devices, self.hosts_file, self.log_dir = devices, hosts_file, log_dir
        self.prefetch, self.n_batch, self.omp_wait_policy = prefetch, n_batch, omp_wait_policy
        self.n_seq = n_seq
        self.link_latency = link_latency
        self.flash_attn = flash_attn
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None

    def start(self) -> None:
        """Spawn every worker (returns at once; the head's barrier waits for them)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        root = str(Path(prima_sim.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("OMP_WAIT_POLICY", None)
        if self.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = self.omp_wait_policy
        flash = flash_attn_enabled() if self.flash_attn is None else self.flash_attn
        for name, shards, threads in self.devices:
            cmd = [sys.executable, "-m", "prima_sim.cli.main", "worker", "--hosts", str(self.hosts_file),
                   "--device", name, "--shards", str(shards), "--threads", str(threads), "--batch", str(self.n_batch),
                   "--no-verify"]  # fmt: skip
            if not self.prefetch:
                cmd.append("--no-prefetch")
            if self.n_seq > 1:
                cmd += ["--parallel", str(self.n_seq)]
            if self.link_latency:
                cmd += ["--link-latency", json.dumps(self.link_latency, sort_keys=True)]
            if flash:
                cmd.append("--flash-attn")
            with (self.log_dir / f"{name}.log").open("wb") as logf:
                group = {"process_group": 0 if self.pgid is None else self.pgid}
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent, **group)  # type: ignore[call-overload]  # fmt: skip
            if self.pgid is None:
                self.pgid = p.pid
            self.procs[name] = p

    def log_tail(self, name: str) -> str:
        """The end of a worker's log, on one line."""
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-LOG_TAIL_CHARS:]

    def check_alive(self) -> None:
        """Raise if a worker process has exited.

        Raises:
            WorkerError: naming the device, its exit status and the end of its log.
        """
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
                tail = self.log_tail(name)
                raise WorkerError(f"worker {name} (pid {p.pid}) {how}" + (f": {tail}" if tail else ""))

    def stop(self, graceful: bool = True) -> None:
        """Wait for the workers to exit (after the head's ``stop``), then kill whatever is left of the group."""
        if graceful:
            deadline = time.monotonic() + GRACEFUL_EXIT_S
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
                time.sleep(0.02)
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.02)
        self._signal_group(signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (D state): nothing more to do
                p.wait(timeout=TERM_GRACE_S)

    def _signal_group(self, sig: int) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
                os.killpg(self.pgid, sig)
        for p in self.procs.values():  # a worker that left the group (cannot happen here, but be sure)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def __enter__(self) -> LocalWorkers:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(graceful=exc_type is None)
