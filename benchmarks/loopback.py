"""What bench_serve and bench_spec share: this host's device profile and a loopback cluster of copies of it.

The cost model predicts a loopback ring from one profile of this host given to every process, with links of
``--hop-ms`` one way. The profile is ``--profile FILE`` (a device TOML from ``prima-sim profile``) or measured now by
``prima-sim profile --model`` (``--quick-profile``: a quick one; a busy host is measured once more).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from prima_sim.devices.cluster import Cluster, LinkSpec
from prima_sim.devices.profile import DeviceProfile
from prima_sim.schema import load_model

HOP_MS = 0.5
"""bench_ring's measured hop of the executor, one thread per process, OMP passive, unpinned (505 us, wire v3)."""


def add_host_args(ap: argparse.ArgumentParser) -> None:
    """``--profile``, ``--quick-profile`` and ``--hop-ms``."""
    ap.add_argument(
        "--profile", default=None, help="this host's device profile (default: measure one first, ~20 s)"
    )
    ap.add_argument(
        "--quick-profile", action="store_true", help="measure a quick profile (a few seconds, noisier)"
    )
    ap.add_argument("--hop-ms", type=float, default=HOP_MS,
                    help="one-way loopback hop the cost model uses (default: bench_ring's measured hop of the executor "
                         "with one thread per process, OMP passive, unpinned, as here: 505 us with wire v3)")  # fmt: skip


def host_profile(args: argparse.Namespace, model: Path, work_dir: Path) -> DeviceProfile:
    """``--profile``, else this host measured now with ``model``'s matrices; ``args.threads`` threads."""
    prof_file = Path(args.profile) if args.profile else work_dir / "host.toml"
    if not args.profile:
        print("measuring a profile of this host ...", file=sys.stderr, flush=True)
        quick = ["--quick"] if args.quick_profile else []
        subprocess.run([sys.executable, "-m", "prima_sim.cli.main", "profile", *quick, "--name", "host", "--threads",
                        str(args.threads), "--model", str(model), "--disk-dir", str(work_dir), "--out",
                        str(prof_file), "--no-progress", "--busy-retries", "1"], check=True, capture_output=True)  # fmt: skip
    return load_model(DeviceProfile, prof_file).model_copy(update={"threads": args.threads})


def loopback_cluster(host: DeviceProfile, n: int, hop_ms: float) -> Cluster:
    """``n`` copies of ``host`` named D0 (the head) .. D(n-1), joined by 1 Gbit/s links of ``hop_ms`` one way."""
    devs = tuple(host.model_copy(update={"name": f"D{i}"}) for i in range(n))
    return Cluster(name="loopback", devices=devs, head="D0",
                   default_link=LinkSpec(bandwidth_bps=1e9, latency_s=hop_ms * 1e-3))  # fmt: skip
