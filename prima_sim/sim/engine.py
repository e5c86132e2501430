"""The simulation of one plan: builds the devices, the network and the head's token loop, and runs them.

The head drives the run as the executor's head does: for every step (the prompt's prefill in micro-batches
of ``n_ubatch`` tokens, then one step per decode token) it embeds the batch, sends it to the owner of the
first window, waits until the output head has run on the last token, and samples. One batch is in flight at
a time (prima.cpp's piped ring pipelines disk and compute across devices, never tokens). The KV cache grows
with the context: a decode step at position ``P + s - 1`` attends to ``P + s`` cached tokens.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy
from simpy.core import NORMAL, EventPriority

from prima_sim.devices.cluster import Cluster
from prima_sim.devices.model import ModelProfile
from prima_sim.errors import InfeasiblePlanError
from prima_sim.halda.costmodel import (
    DeviceCosts,
    MemoryUse,
    check_memory,
    draft_token_s,
    memory_use,
    predict,
    step_breakdown,
    window_paged_bytes,
)
from prima_sim.plan import DeviceAssignment, LayerRange, Plan, Prediction
from prima_sim.sim.config import SimConfig, component_rng
from prima_sim.sim.device import SimDevice, cache_capacity
from prima_sim.sim.layout import build_layout
from prima_sim.sim.network import Network
from prima_sim.sim.recorder import SpanRecorder
from prima_sim.sim.result import SimResult
from prima_sim.sim.ring import Message, Ring
from prima_sim.sim.self_eviction import overflows, self_eviction_bytes
from prima_sim.workload import Workload


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that can say how many events it has scheduled (the benchmark's events per second).

    SimPy numbers every scheduled event from one counter (``Environment._eid``, used to break ties in its
    queue); reading it costs nothing during the run. Where a SimPy version lacks it, scheduling is counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counted = 0
        # SimPy's event-id counter (an itertools.count), read once here; None where this SimPy has none
        self._ids: Iterator[int] | None = vars(self).get("_eid")
        if self._ids is None:
            self.schedule = self._counting_schedule  # type: ignore[method-assign]

    def _counting_schedule(
        self, event: simpy.Event, priority: EventPriority = NORMAL, delay: float = 0
    ) -> None:
        self._counted += 1
        simpy.Environment.schedule(self, event, priority, delay)

    @property
    def n_events(self) -> int:
        """Events scheduled so far."""
        if self._ids is None:
            return self._counted
        # the next id is the number scheduled so far; consuming it only skips a tie-breaker
        return next(self._ids)


@dataclass(frozen=True)
class Step:
    """One step of the run: the prefill (index 0) or one decode token.

    Attributes:
        index: 0 for the prefill, s for the s-th decode token.
        phase: "prefill" or "decode".
        batches: (tokens, cached tokens attended to after it) of each micro-batch.
    """

    index: int
    phase: str
    batches: tuple[tuple[int, int], ...]

    @property
    def n_tokens(self) -> int:
        """Tokens processed in the step."""
        return sum(n for n, _ in self.batches)


def steps_for(workload: Workload, concurrency: int = 1) -> list[Step]:
    """The prefill in micro-batches, then one step per decode token (KV cache growing by one each).

    With ``concurrency`` sequences (``SimConfig.concurrency``) their prompts are prefilled together (``concurrency``
    x ``prompt_tokens`` rows in micro-batches) and each decode step carries one row per sequence, attending to
    every sequence's cache (``serve`` keeps them in one unified KV cache)."""
    c = concurrency
    p, u = workload.prompt_tokens, workload.n_ubatch
    batches, done = [], 0
    while done < c * p:
        n = min(u, c * p - done)
        batches.append((n, done + n))
        done += n
    out = [Step(0, "prefill", tuple(batches))]
    out += [Step(s, "decode", ((c, c * (p + s)),)) for s in range(1, workload.decode_tokens + 1)]
    return out


class Simulation:
    """A plan running on a cluster, as a discrete-event model.

    Args:
        plan: which device runs which layers (ring order, head first).
        cluster: the devices' profiles and the network.
        model: the model's profile.
        workload: prompt length, decode tokens, context (must be the plan's ``n_ctx``), micro-batch.
        config: simulator settings.
        analytic: the cost model's prediction of this plan for this workload, if already at hand (the
            planner attaches it); otherwise it is computed for the summary.

    Raises:
        InputError: the plan does not match the cluster, the model or the workload.
        InfeasiblePlanError: pinned memory (KV cache, buffers) or VRAM does not fit on some device.
    """

    def __init__(self, plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload,
                 config: SimConfig | None = None, analytic: Prediction | None = None,
                 draft: ModelProfile | None = None) -> None:  # fmt: skip
        self.cfg = config or SimConfig()
        if not self.cfg.stream and any(a.streamed_layers for a in plan.devices):
            # a run that leaves every window to the page cache (prima.cpp): the plan's streaming and the
            # prediction made with it do not apply
            plan, analytic = plan.without_streaming(), None
        self.analytic = analytic
        self.draft_s = 0.0
        if self.cfg.draft_max:
            if draft is None:
                raise ValueError(
                    'speculative decoding ("draft_max") needs the draft model: simulate(..., draft=...)'
                )
            self.draft_s = draft_token_s(cluster.device(plan.head), draft, workload)
        self.produced: list[int] = []
        plan.check_against(cluster, model, workload)
        problems = check_memory(plan, cluster, model, workload)
        if problems:
            raise InfeasiblePlanError("the plan cannot run: " + "; ".join(problems))
        self.plan, self.cluster, self.model, self.workload = plan, cluster, model, workload
        self.env = CountingEnvironment()
        self.rec = SpanRecorder(self.cfg.record_spans)
        self.net = Network(self.env, cluster, self.cfg.seed, self.cfg.jitter)
        self.ring = Ring(self.env, self.cfg, self.rec, self.net, plan)
        self.steps: list[tuple[int, str, int, float, float]] = []
        self.devices: dict[str, SimDevice] = {}
        costs = {a.name: DeviceCosts(cluster.device(a.name), model, workload) for a in plan.devices}
        uses = {a.name: memory_use(costs[a.name], a, a.name == plan.head) for a in plan.devices}
        indexes = {a.name: {rng: j for j, (nm, rng) in enumerate(self.ring.order) if nm == a.name}
                   for a in plan.devices}  # fmt: skip
        extra = self._self_eviction(costs, uses, indexes)
        for a in plan.devices:
            profile, is_head = cluster.device(a.name), a.name == plan.head
            layout = build_layout(a, profile, model, indexes[a.name], is_head, self.cfg.chunk_bytes)
            self.devices[a.name] = self.ring.devices[a.name] = SimDevice(
                self.ring, a, profile, costs[a.name], uses[a.name], layout, is_head, extra.get(a.name)
            )
        self.head = self.devices[plan.head]

    def _self_eviction(self, costs: dict[str, DeviceCosts], uses: dict[str, MemoryUse],
                       indexes: dict[str, dict[LayerRange, int]]) -> dict[str, tuple[int, float]]:  # fmt: skip
        """Per prefetching Linux device whose largest window overflows its page cache: (window index, bytes) its
        own advice makes it read again per pass of that window (:mod:`prima_sim.sim.self_eviction`); the timing
        the kernel model needs comes from the cost model's decode step, worked out only when such a device
        exists."""
        cfg, plan = self.cfg, self.plan
        # the replay is of this project's executor: its advice in uncapped pieces after each send, not prima.cpp's
        # capped advice (--prima-prefetch), its --force touch or its advice of a device's only window
        if (not cfg.prefetch or cfg.page_cache != "linux" or cfg.willneed_cap_bytes or cfg.force_touch
                or cfg.prefetch_own_window or len(plan.devices) < 2):  # fmt: skip
            return {}
        overflowing: list[tuple[DeviceAssignment, list[float], float]] = []
        for a in plan.devices:
            c = costs[a.name]
            if len(a.layers) < 2 or not c.memory.kernel_lru:
                continue
            wins = [window_paged_bytes(c, a, rng) for rng in a.layers]
            room, _growth = cache_capacity(c, uses[a.name])
            if overflows(wins, room):
                overflowing.append((a, wins, room))
        if not overflowing:
            return {}
        b = step_breakdown(plan, self.cluster, self.model, self.workload, prefetch=True, costs=costs)
        times = {t.name: t for t in b.per_device}
        ring_s = sum(t.compute_s + t.memory_s + t.overhead_s + t.comm_s for t in b.per_device) + b.head_s
        out: dict[str, tuple[int, float]] = {}
        for a, wins, room in overflowing:
            c, t = costs[a.name], times[a.name]
            own = t.compute_s + t.memory_s + t.overhead_s
            extra = self_eviction_bytes(
                wins, room, c.memory.fault_bps, own, max(0.0, ring_s - own) / len(wins)
            )
            if extra > 0:
                big = max(range(len(wins)), key=lambda i: wins[i])
                out[a.name] = (indexes[a.name][a.layers[big]], extra)
        return out

    @property
    def disk_read(self) -> dict[tuple[int, str], float]:
        """Bytes read from disk per (step, device)."""
        return self.ring.disk_read

    # --- the head's token loop ------------------------------------------------------------------------------
    def _driver(self) -> Generator[simpy.Event, Any, None]:
        env, head, cfg, ring = self.env, self.head, self.cfg, self.ring
        c = cfg.concurrency
        prompt = [
            int(x) for x in head.sampler.integers(0, self.model.arch.n_vocab, c * self.workload.prompt_tokens)
        ]
        next_token = 0
        d = cfg.draft_max
        accept_rng = component_rng(cfg.seed, "speculation")
        produced = 0
        for st in self._steps():
            ring.begin_step(st.index)
            if st.phase == "decode" and d:
                yield from head.draft(d, self.draft_s, st.index)
            ids = prompt if st.phase == "prefill" else [next_token] * st.n_tokens
            done = 0
            for n, n_kv in st.batches:
                yield from head.embed(ids[done : done + n], st.index)
                done += n
                msg = Message(st.index, 0, n, n_kv)
                batch_done = ring.expect_batch()
                first = ring.owner(0)
                if first == head.name:
                    head.last_done = env.now
                    head.deliver(msg)
                else:
                    yield from head.send(first, msg)
                    if cfg.prefetch:
                        nxt = ring.prefetch_window(head.name, -1, head.ran)
                        if nxt is not None:
                            head.prefetch(nxt, st.index)
                            if cfg.force_touch:
                                yield from head.force_touch(nxt, st.index)
                    head.last_done = env.now
                yield batch_done
            self.steps.append((st.index, st.phase, st.n_tokens, ring.step_start, env.now))
            next_token = yield from head.sample(st.index, st.n_tokens if d and st.phase == "decode" else c)
            if st.phase == "decode" and d:
                # the drafts accepted before the first rejection, and the ring's own token
                got = 1 + int(np.argmin(np.append(accept_rng.random(d) < cfg.accept, False)))
                got = min(got, self.workload.decode_tokens - produced)
                self.produced.append(got)
                produced += got
                if produced >= self.workload.decode_tokens:
                    return

    def _steps(self) -> Iterator[Step]:
        """The steps to run: :func:`steps_for`, or with speculation the prefill and then verification passes of
        ``draft_max + 1`` rows until the workload's decode tokens are out (the driver stops it)."""
        wl, d = self.workload, self.cfg.draft_max
        steps = steps_for(wl, self.cfg.concurrency)
        if not d:
            yield from steps
            return
        yield steps[0]
        for s in range(1, wl.decode_tokens + 1):  # at least one token per pass
            yield Step(s, "decode", ((d + 1, wl.prompt_tokens + sum(self.produced) + d + 1),))

    def run(self) -> SimResult:
        """Run every step and return what happened."""
        proc = self.env.process(self._driver())
        self.env.run(until=proc)
        return self._result()

    def _result(self) -> SimResult:
        """Assemble the result from the components' snapshots (devices, network, recorder)."""
        wl = self.workload
        analytic = (self.analytic if self.analytic is not None else
                    predict(self.plan, self.cluster, self.model, wl, prefetch=self.cfg.prefetch))  # fmt: skip
        analytic_reads = {t.name: t.read_bytes for t in analytic.per_device}
        stats = {
            name: d.stats(wl.decode_tokens, analytic_reads.get(name, 0.0)) for name, d in self.devices.items()
        }
        spans = self.rec.spans()
        return SimResult(
            plan=self.plan, cluster_name=self.cluster.name, model_id=self.model.id,
            workload={"n_ctx": wl.n_ctx, "prompt_tokens": wl.prompt_tokens, "decode_tokens": wl.decode_tokens,
                      "n_ubatch": wl.n_ubatch},
            config=self.cfg.to_dict(), devices=list(self.devices), spans=spans, steps=list(self.steps),
            disk_read=dict(self.ring.disk_read), device_stats=stats, network=self.net.stats(),
            events=self.env.n_events, lanes=sorted({s.device for s in spans} - set(self.devices)),
            analytic=analytic, produced=list(self.produced),
        )  # fmt: skip


def simulate(plan: Plan, cluster: Cluster, model: ModelProfile, workload: Workload,
             config: SimConfig | None = None, analytic: Prediction | None = None,
             draft: ModelProfile | None = None) -> SimResult:  # fmt: skip
    """Simulate ``plan`` for ``workload`` and return spans, per-token rows and a summary (``draft``: the draft
    model of speculative decoding, with ``SimConfig.draft_max``).

    Raises:
        InputError: the plan does not match the cluster, the model or the workload.
        InfeasiblePlanError: the plan's pinned memory or VRAM does not fit.
    """
    return Simulation(plan, cluster, model, workload, config, analytic, draft).run()
