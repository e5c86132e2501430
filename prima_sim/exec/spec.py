"""Speculative decoding on the head: a small draft model proposes, the ring verifies in one pass.

The draft is a whole GGUF in one llama.cpp context on the head (:class:`Draft`). Per decode step it proposes up
to ``draft_max`` tokens greedily after the tokens accepted so far; the head then sends the last accepted token and
the drafts as one batch of ``n + 1`` rows round the ring (:meth:`Head.step_rows`, positions ``pos..pos+n``, every
row an output of the logits window) and accepts the longest prefix of drafts that equals the target's own greedy
choice, plus the target's choice after that prefix. Output is therefore the target's greedy
output, token for token; only greedy decoding is speculated.

Rejected rows leave no trace: the next batch starts at the first rejected position, and every window (and the
draft's context) removes its KV entries from a batch's first position on when that position does not continue its
cache (``llama_memory_seq_rm`` in :meth:`Window._prepare` / :meth:`Window._prepare_rows`): no extra message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prima_sim.errors import InputError
from prima_sim.exec.llamacpp import Model, Reference

DEFAULT_DRAFT_MAX = 4
"""Tokens the draft proposes per verification pass unless ``--draft-max`` says (as prima.cpp's ``--draft-max``)."""


@dataclass
class SpecStats:
    """What speculation did during one generation."""

    draft_max: int
    passes: int = 0  # verification passes of the ring that carried at least one drafted token
    drafted: int = 0  # drafted tokens sent for verification
    accepted: int = 0  # of them, accepted
    rejections: int = 0  # passes that ended on a rejected draft (the others accepted all they carried)
    tokens: int = 0  # tokens those passes produced (accepted drafts plus the ring's own)
    draft_s: float = 0.0  # time the draft model took (prefill included)

    @property
    def accept_rate(self) -> float:
        """Per-token acceptance, as the cost model's ``accept`` means it: each drafted token is accepted with
        probability a until the first rejection, so a = accepted / (accepted + rejections) (NaN before any pass)."""
        n = self.accepted + self.rejections
        return self.accepted / n if n else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per verification pass (NaN before any pass)."""
        return self.tokens / self.passes if self.passes else float("nan")

    def to_json(self) -> dict[str, float | int]:
        """The object ``run --json`` prints under ``speculation``."""
        return {"draft_max": self.draft_max, "passes": self.passes, "drafted": self.drafted,
                "accepted": self.accepted, "rejections": self.rejections, "accept_rate": self.accept_rate,
                "accepted_of_drafted": self.accepted / self.drafted if self.drafted else float("nan"),
                "tokens_per_pass": self.tokens_per_pass, "draft_s": self.draft_s}  # fmt: skip


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Draft(Reference):
    """A draft model: a whole GGUF in one llama.cpp context (a :class:`Reference`), proposing tokens greedily.

    Its context remembers which tokens its KV cache holds (per sequence); a proposal after other tokens (a
    rejection, a new prompt) re-decodes from the first position that differs, and llama.cpp drops the cache from
    there on.

    Args:
        path: the draft GGUF (whole model).
        n_ctx: context length (the plan's).
        n_batch: tokens per llama.cpp call when catching up (a prompt).
        n_threads: CPU threads.
        source: what to name in errors (the flag).
        n_seq: sequences the cache holds (``prima-sim serve --parallel``: one per slot).

    Raises:
        InputError: the file cannot be loaded.
    """

    def __init__(
        self, path: Path, n_ctx: int, n_batch: int, n_threads: int, source: str = "--draft", n_seq: int = 1
    ) -> None:
        super().__init__(path, n_ctx, n_batch, n_threads, n_seq)
        self.source = source
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]  # per sequence: the tokens at positions 0..

    def check_vocab(self, target: Model) -> None:
        """Refuse a draft whose vocabulary is not the target's (size and every token's text).

        Raises:
            InputError: naming the first difference.
        """
        a, b = self.model, target
        if a.n_vocab != b.n_vocab:
            raise InputError(self.source, "", f"the draft's vocabulary has {a.n_vocab} tokens but the model's has "
                             f"{b.n_vocab}: a draft must share the model's tokenizer")  # fmt: skip
        lc = a._lc
        for t in range(a.n_vocab):
            ta, tb = lc.llama_vocab_get_text(a.vocab, t), lc.llama_vocab_get_text(b.vocab, t)
            if ta != tb:
                raise InputError(self.source, "", f"token {t} is {ta!r} in the draft but {tb!r} in the model: a "
                                 "draft must share the model's tokenizer")  # fmt: skip

    def _decode(self, tokens: list[int], pos0: int, seq: int) -> np.ndarray:
        """Decode ``tokens`` of sequence ``seq`` at ``pos0..`` (a position the cache does not continue is cut
        first) and return the logits after the last one."""
        n = len(tokens)
        self.window.run_rows(np.array(tokens, dtype=np.int32), np.arange(pos0, pos0 + n, dtype=np.int32),
                             np.full(n, seq, dtype=np.int32), {n - 1})  # fmt: skip
        return self.window.logits_at(n - 1)

    def catch_up(self, context: list[int], seq: int = 0) -> np.ndarray:
        """Decode what of ``context`` the cache of ``seq`` does not hold (at least its last token) and return the
        logits after it."""
        c = min(
            common_prefix(self.cached[seq], context), len(context) - 1
        )  # at least one token to decode: its logits give the first draft
        logits = np.empty(0)
        for i in range(c, len(context), self.window.n_batch):
            logits = self._decode(context[i : i + self.window.n_batch], i, seq)
        self.cached[seq] = list(context)
        return logits

    def propose(self, context: list[int], n: int, seq: int = 0) -> list[int]:
        """Up to ``n`` greedy tokens after ``context`` (fewer when one ends generation)."""
        logits = self.catch_up(context, seq)
        cached = self.cached[seq]
        out: list[int] = []
        while True:
            tok = int(np.argmax(logits))
            out.append(tok)
            if len(out) >= n or self.model.is_eog(tok):
                return out
            logits = self._decode([tok], len(cached), seq)
            cached.append(tok)
