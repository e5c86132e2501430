"""The Workload: what a plan is for (the KV cache to reserve and the request shape).

It is the other half of every prediction (a plan says which device runs which layers; the workload says how
long the context is, how long the prompt, how many tokens are generated), so it lives in the core beside the
:class:`~prima_sim.plan.Plan`, not in the planner: the cost model, the simulator, the emulation and the reports
all take one.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from prima_sim.schema import FrozenModel

# Every default of a workload exists here once: the Workload's fields, the CLI flags generated from them
# (prima_sim.cli.common.add_workload_args) and the real ring's prefill batch (--batch) use these.
DEFAULT_UBATCH = 512
"""llama.cpp's default micro-batch: prompts are prefilled in chunks of this many tokens. The simulator's and
planner's ``--ubatch`` and the real ring's ``--batch`` (tokens per prefill message, llama.cpp's n_batch = n_ubatch
in every window) are this one quantity."""
MAX_SEQ = 256
"""Most sequences one KV cache is planned for (llama.cpp's own limit, LLAMA_MAX_SEQ)."""
DEFAULT_CTX = 1024
"""The context every command reserves KV cache for unless told otherwise (prima.cpp's examples use ``-c 1024``)."""
DEFAULT_PROMPT_TOKENS = 64
"""Prompt length of a prediction unless told otherwise."""
DEFAULT_DECODE_TOKENS = 128
"""Tokens generated after the first in a prediction unless told otherwise."""


class Workload(FrozenModel):
    """What the plan is for: the KV cache to reserve and the request shape.

    Attributes:
        n_ctx: context length reserved in every window's KV cache (tokens).
        prompt_tokens: prompt length (prefill, TTFT).
        decode_tokens: tokens generated after the first (TPOT is their median).
        n_ubatch: prefill micro-batch size.
        n_seq: sequences every window's KV cache holds (``prima-sim serve --parallel``): the KV cache is
            ``n_seq`` x ``n_ctx`` tokens.
    """

    n_ctx: int = Field(
        default=DEFAULT_CTX, gt=0, description="context length reserved in every window's KV cache (tokens)"
    )
    prompt_tokens: int = Field(
        default=DEFAULT_PROMPT_TOKENS, ge=1, description="prompt length (prefill, TTFT)"
    )
    decode_tokens: int = Field(
        default=DEFAULT_DECODE_TOKENS,
        ge=0,
        description="tokens generated after the first (TPOT: their median)",
    )
    n_ubatch: int = Field(default=DEFAULT_UBATCH, ge=1, description="prefill micro-batch size (tokens)")
    n_seq: int = Field(
        default=1,
        ge=1,
        le=MAX_SEQ,
        description="sequences every window's KV cache holds (prima-sim serve --parallel): n_seq x n_ctx tokens",
    )

    @classmethod
    def of(cls, **fields: Any) -> Workload:
        """A validated workload; any problem is a ValueError of one line naming the field (for CLI flags and
        scenario files, which turn it into an :class:`~prima_sim.errors.InputError`)."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            raise ValueError(f"{where}: {msg}" if where else msg) from None

    @model_validator(mode="after")
    def _fits(self) -> Workload:
        if self.prompt_tokens + self.decode_tokens > self.n_ctx:
            raise ValueError(
                f"prompt ({self.prompt_tokens}) + decode ({self.decode_tokens}) tokens exceed n_ctx ({self.n_ctx})"
            )
        return self

    @property
    def decode_kv_tokens(self) -> int:
        """Cached tokens a typical decode step attends to (the middle of generation)."""
        return max(1, min(self.n_ctx, self.prompt_tokens + self.decode_tokens // 2))

    def with_decode_tokens(self, n: int) -> Workload:
        """The same workload generating ``n`` tokens (validated)."""
        return Workload.of(
            n_ctx=self.n_ctx,
            prompt_tokens=self.prompt_tokens,
            decode_tokens=n,
            n_ubatch=self.n_ubatch,
            n_seq=self.n_seq,
        )
