"""The emulated links as the cluster sees them: ``prima-sim netprobe`` between every pair of devices.

The shaped bandwidth and the kernel's latency are measured; the user-space latency (which the workers add
themselves, ``--link-latency``, and netprobe does not go through) is added on top.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prima_sim.devices.cluster import Link
from prima_sim.emulate.spawn import cli_command, log_tail, stop
from prima_sim.emulate.testbed import Testbed
from prima_sim.errors import EmulationError

log = logging.getLogger(__name__)

NETPROBE_PORT = 5590


def measure_links(
    tb: Testbed, out: Path, say: Callable[[str], None] = log.info
) -> tuple[list[Link], list[dict[str, Any]]]:
    """Every pair's link (measured when the scenario says so, else as configured) and one record per pair of
    what was configured and measured (``links.json``). Logs go to ``out / "logs"``.

    Raises:
        EmulationError: a netprobe failed.
    """
    assert tb.net is not None, "the testbed is not set up"
    sc = tb.sc
    names = [d.name for d in tb.ring]
    links: list[Link] = []
    checks: list[dict[str, Any]] = []
    servers: dict[str, subprocess.Popen[bytes]] = {}
    if sc.network.measure and len(names) > 1:
        for n in names:
            servers[n] = tb.spawn_in(n, cli_command("netprobe", "--serve", "--bind", f"{tb.ip(n)}:{NETPROBE_PORT}"),
                                     out / "logs" / f"netprobe-serve-{n}.log")  # fmt: skip
        time.sleep(1.5)
    try:
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                bw, lat = sc.pair(a, b)
                rec: dict[str, Any] = {"a": a, "b": b, "configured_bps": bw, "configured_latency_s": lat}
                meas_bw, meas_lat = bw, 0.0
                if servers:
                    size = max(64 << 10, min(1 << 20, int(bw * 0.05)))
                    logf = out / "logs" / f"netprobe-{a}-{b}.log"
                    cmd = cli_command("netprobe", f"{tb.ip(b)}:{NETPROBE_PORT}", "--json", "--size", str(size),
                                      "--count", "3", "--pings", "30", "--timeout", "20")  # fmt: skip
                    p = tb.spawn_in(a, cmd, logf)
                    if p.wait() != 0:
                        raise EmulationError(f"netprobe {a} -> {b} failed: {log_tail(logf)}")
                    text = logf.read_text()
                    res = json.loads(text[text.index("{") :])
                    meas_bw, meas_lat = float(res["bandwidth_bps"]), float(res["latency_s"])
                    rec.update(measured_bps=meas_bw, measured_kernel_latency_s=meas_lat,
                               bandwidth_error_pct=100.0 * (meas_bw - bw) / bw, probe_bytes=size)  # fmt: skip
                links.append(Link(a=a, b=b, bandwidth_bps=meas_bw, latency_s=meas_lat + lat))
                rec["cluster_latency_s"] = meas_lat + lat
                checks.append(rec)
    finally:
        for p in servers.values():
            stop(p, 1.0)
    for c in checks:
        if "measured_bps" in c:
            say(f"link {c['a']}<->{c['b']}: shaped {c['configured_bps'] * 8 / 1e6:.0f} Mbit/s, measured "
                f"{c['measured_bps'] * 8 / 1e6:.1f} Mbit/s goodput; latency {c['configured_latency_s'] * 1e3:.2f} ms "
                f"user space + {c['measured_kernel_latency_s'] * 1e3:.2f} ms measured")  # fmt: skip
    return links, checks
