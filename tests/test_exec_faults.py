"""Faults of a real ring: dead and silent workers, garbage on the ports, foreign plans, GPU plans on a CPU build."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

pytest.importorskip("llama_cpp")
zmq = pytest.importorskip("zmq")

from prima_sim.errors import InputError, WorkerError  # noqa: E402
from prima_sim.exec import wire  # noqa: E402
from prima_sim.exec.head import Head  # noqa: E402
from prima_sim.exec.hosts import HostsFile, free_base_port, resolve  # noqa: E402
from prima_sim.exec.llamacpp import Reference, supports_gpu_offload  # noqa: E402
from prima_sim.exec.local import LocalWorkers  # noqa: E402
from prima_sim.exec.runner import RunOptions, run_ring  # noqa: E402
from prima_sim.exec.shard import load_manifest, write_shards  # noqa: E402
from prima_sim.plan import Plan, make_assignments  # noqa: E402
from prima_sim.testing import interruptible  # noqa: E402

pytestmark = pytest.mark.real

PROMPT = "The three primary colours are red, yellow and"
SLACK_S = 3.0  # scheduling slack on a loaded 2-core CI machine


def make_plan(windows: tuple[int, ...], gpu: tuple[int, ...] | None = None) -> Plan:
    names = [f"D{i}" for i in range(len(windows))]
    devs = make_assignments(names, windows, list(gpu or [0] * len(windows)), 30)
    return Plan(model_id="smollm2", n_layers=30, cluster_name="loopback", k=-(-30 // sum(windows)), n_ctx=256,
                devices=devs, scheduler="manual")  # fmt: skip


def workers_of(pid: int) -> list[psutil.Process]:
    """Live `prima-sim worker` processes started by ``pid``."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def worker_pid(device: str) -> int:
    for p in workers_of(os.getpid()):
        if device in p.cmdline():
            return p.pid
    raise AssertionError(f"no worker process for {device}")


def test_killed_worker_is_named_and_leaves_nothing_behind(smollm2, tmp_path):
    plan = make_plan((10, 10, 10))
    seen: dict[str, float] = {"n": 0}

    def on_text(_piece: str) -> None:
        seen["n"] += 1
        if seen["n"] == 3:
            os.kill(worker_pid("D2"), signal.SIGKILL)
            seen["t"] = time.monotonic()

    o = RunOptions(n_predict=64, ignore_eos=True, threads={"D0": 1, "D1": 1, "D2": 1}, timeout_s=2.0)
    with pytest.raises(WorkerError, match=r"worker D2 .* killed by signal 9") as ei:
        run_ring(plan, smollm2, PROMPT, o, local=True, shard_dir=tmp_path / "s", out_dir=tmp_path / "out",
                 on_text=on_text)  # fmt: skip
    assert time.monotonic() - seen["t"] < 2.0 + SLACK_S
    assert workers_of(os.getpid()) == []
    report = ei.value.report  # what was measured before the failure is kept
    assert len(report.last.token_ids) >= 3 and report.rows
    assert (tmp_path / "out" / "tokens.csv").exists() and (tmp_path / "out" / "summary.json").exists()
    assert ei.value.exit_code == 3


def test_silent_worker_is_detected_within_the_timeout(smollm2, tmp_path):
    plan = make_plan((10, 10, 10))
    seen: dict[str, float] = {}

    def on_text(_piece: str) -> None:
        if "t" not in seen:
            os.kill(worker_pid("D1"), signal.SIGSTOP)  # alive but not answering
            seen["t"] = time.monotonic()

    timeout = 1.5
    o = RunOptions(n_predict=64, ignore_eos=True, threads={"D0": 1, "D1": 1, "D2": 1}, timeout_s=timeout)
    with pytest.raises(WorkerError, match=r"device D1 .*stopped answering"):
        run_ring(plan, smollm2, PROMPT, o, local=True, shard_dir=tmp_path / "s", on_text=on_text)
    assert time.monotonic() - seen["t"] < timeout + SLACK_S
    assert workers_of(os.getpid()) == []


def _garbage(host: str, port: int, fp: str) -> None:
    """Everything a confused or hostile peer might send to a data port."""
    with socket.create_connection((host, port), timeout=2) as s:  # not even ZeroMQ
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(4096))
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(f"tcp://{host}:{port}")
    good = wire.Header(type="data", fp=fp, seq=1, window=0, n_tokens=1, shape=(1, 576))
    pos, hid = np.zeros(1, np.int32), np.zeros((1, 576), np.float32)
    bad_frames = [
        [b"garbage"],
        [os.urandom(100000)],
        [wire.MAGIC + b"{not json"],
        [wire.MAGIC + b'{"v": 2, "type": "data"}'],  # an older peer (JSON headers)
        [wire.MAGIC + b'{"v": 1, "type": "data", "fp": "' + fp.encode() + b'", "seq": -4}'],
        [wire.encode(good, pos, hid)[0][:30]],  # truncated binary header
        [wire.MAGIC + bytes([wire.WIRE_VERSION]) + os.urandom(200)],  # right version, random fields
        wire.encode(good._replace(fp="0000000000000000"), pos, hid),  # another plan
        wire.encode(good._replace(shape=(1, 7)), pos, np.zeros((1, 7), np.float32)),  # wrong width
        wire.encode(good, pos, hid)[:1],  # payload missing
        wire.encode(good._replace(window=99), pos, hid),  # not this worker's window
    ]
    for frames in bad_frames:
        push.send_multipart(frames)
    push.close()


def test_garbage_on_the_ports_does_not_crash_anything(smollm2, tmp_path):
    plan = make_plan((10, 10, 10))
    hosts = HostsFile(base_port=free_base_port(4))
    ep = resolve(hosts, plan)
    with Reference(smollm2, 256, 64, 1) as ref:
        toks = ref.model.tokenize(PROMPT)
    sent: list[bool] = []

    def on_text(_piece: str) -> None:
        if not sent:  # mid-generation, at every worker's and at the head's data and control ports
            for dev in ("D1", "D2", "D0"):
                _garbage(*ep.data[dev], plan.fingerprint())
            _garbage(*ep.control, plan.fingerprint())
            sent.append(True)

    o = RunOptions(n_predict=16, ignore_eos=True, threads={"D0": 1, "D1": 1, "D2": 1}, timeout_s=10.0)
    baseline = run_ring(plan, smollm2, toks, o, local=True, hosts=hosts, shard_dir=tmp_path / "s")
    report = run_ring(
        plan, smollm2, toks, o, local=True, hosts=hosts, shard_dir=tmp_path / "s", on_text=on_text
    )
    assert report.last.token_ids == baseline.last.token_ids
    assert report.rejected["D1"] >= 8 and report.rejected["D2"] >= 8  # every bad message counted and dropped


def test_worker_on_another_plan_is_refused_at_startup(smollm2, tmp_path):
    plan_a, plan_b = make_plan((10, 10, 10)), make_plan((10, 10, 10)).model_copy(update={"n_ctx": 128})
    write_shards(smollm2, plan_a, tmp_path / "a", ["D1"])
    write_shards(smollm2, plan_b, tmp_path / "b", ["D0", "D2"])
    hosts = HostsFile(base_port=free_base_port(4))
    hosts_file = tmp_path / "hosts.toml"
    hosts_file.write_text(f"base_port = {hosts.base_port}\n")
    devs = [("D1", tmp_path / "a" / "D1", 1), ("D2", tmp_path / "b" / "D2", 1)]
    with LocalWorkers(devs, hosts_file, tmp_path / "logs") as workers:
        head = Head(tmp_path / "b" / "D0", load_manifest(tmp_path / "b" / "D0", "D0"), resolve(hosts, plan_b), 1,
                    check_alive=workers.check_alive)  # fmt: skip
        try:
            head.load()
            with pytest.raises(
                WorkerError, match=rf"device D1 runs plan {plan_a.fingerprint()} but the head"
            ):
                head.barrier(60)
        finally:
            head.close(graceful=False)
    assert workers_of(os.getpid()) == []


@pytest.mark.skipif(supports_gpu_offload(), reason="this llama.cpp build has a GPU backend")
def test_gpu_plan_refused_on_cpu_build_before_anything_starts(smollm2, tmp_path):
    plan = make_plan((10, 10, 10), gpu=(0, 4, 0))
    with pytest.raises(InputError, match=r"devices\.D1\.gpu_layers.*no GPU backend"):
        run_ring(plan, smollm2, PROMPT, RunOptions(), local=True, shard_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists() and workers_of(os.getpid()) == []


def _cli(tmp_path: Path, smollm2: Path, *extra: str) -> subprocess.Popen[bytes]:
    plan = make_plan((10, 10, 10))
    plan.save(tmp_path / "plan.json")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "prima_sim.cli.main", "run", "--local", "--plan", str(tmp_path / "plan.json"),
           "--model", str(smollm2), "--shards", str(tmp_path / "s"), "--prompt", PROMPT, "-n", "200",
           "--ignore-eos", "--threads", "1", *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=interruptible
    )


def test_cli_exits_3_naming_the_dead_worker(smollm2, tmp_path):
    proc = _cli(tmp_path, smollm2, "--timeout", "2")
    try:
        assert proc.stdout is not None and proc.stdout.read(1)  # generation has started
        victims = [p for p in workers_of(proc.pid) if "D1" in p.cmdline()]
        pids = [p.pid for p in workers_of(proc.pid)]
        victims[0].kill()
        rc = proc.wait(timeout=2 + 10)
        err = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
    assert rc == 3
    assert err.strip().splitlines()[-1].startswith("prima-sim run: error: worker D1")
    assert "Traceback" not in err
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_cli_ctrl_c_leaves_no_worker(smollm2, tmp_path):
    proc = _cli(tmp_path, smollm2)
    try:
        assert proc.stdout is not None and proc.stdout.read(1)
        pids = [p.pid for p in workers_of(proc.pid)]
        assert len(pids) == 2
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=15)
    finally:
        proc.kill()
    assert rc == 130
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_worker_with_a_smaller_batch_is_refused_at_startup(smollm2, tmp_path):
    plan = make_plan((10, 20))
    write_shards(smollm2, plan, tmp_path / "s")
    hosts = HostsFile(base_port=free_base_port(3))
    (tmp_path / "hosts.toml").write_text(f"base_port = {hosts.base_port}\n")
    with LocalWorkers(
        [("D1", tmp_path / "s" / "D1", 1)], tmp_path / "hosts.toml", tmp_path / "logs", n_batch=8
    ) as w:
        head = Head(tmp_path / "s" / "D0", load_manifest(tmp_path / "s" / "D0", "D0"), resolve(hosts, plan), 1,
                    check_alive=w.check_alive)  # fmt: skip
        try:
            head.load()
            with pytest.raises(
                WorkerError, match=r"device D1 takes batches of up to 8 tokens but the head sends 256"
            ):
                head.barrier(60)
        finally:
            head.close(graceful=False)
    assert workers_of(os.getpid()) == []
