"""Speculative decoding: a cheap proposer guesses the next k tokens, one target pass checks them all.

Decode is memory-bound: checking k+1 positions costs about one weight read, so every accepted guess is a
token for free. That stops being true once the step is compute-bound, so speculation is switched off when
the running batch times (k+1) passes the machine's crossover batch (FLOP/s / bytes/s * bytes/param / 2).

Proposers: `NgramProposer` (prompt lookup, here), `DraftModelProposer` (a small model with its own
paged KV cache, engine/draft_proposer.py) and `EagleProposer` (one layer over the target's own hidden
states, engine/eagle_proposer.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tokenmill.engine.sequence import Sequence
from tokenmill.errors import InvalidParameterError

# fp32 crossover measured on the reference machine (2 EPYC cores): ~77 GFLOP/s over ~22.6 GB/s -> ~7.
DEFAULT_CROSSOVER_TOKENS = 7

_OPTIONS = {
    "ngram": ("k", "max_ngram", "min_ngram", "crossover_tokens"),
    "draft": ("k", "crossover_tokens", "ngram", "branch"),
}


@dataclass(slots=True)
class SpeculativeConfig:
    method: str
    k: int = 4
    # Matching on 2-4 tokens, not 1: single-token matches guess badly in free chat (measured with
    # `tokenmill bench speculative`: chat 1.20x -> 1.30x, input-grounded 2.61x -> 2.55x).
    max_ngram: int = 4
    min_ngram: int = 2
    crossover_tokens: int = DEFAULT_CROSSOVER_TOKENS
    draft_path: str | None = None  # method 'draft': a model folder / GGUF, or a `tokenmill draft train` file
    # method 'draft', ngram=1: prompt lookup first, the draft only for sequences it finds no match for. A
    # match is right more often than a small draft (chat: accepted length 2.5 vs 1.6) and costs nothing.
    ngram: int = 0
    # method 'draft' with an EAGLE draft, branch=1: greedy sequences also verify the draft's second choice
    # for the first token (one more row; it is the target's token in ~19% of first-guess misses).
    branch: int = 1

    @property
    def max_batch(self) -> int:
        """Largest running batch that still speculates: batch * (k + 1) tokens within the crossover."""
        return max(1, self.crossover_tokens // (self.k + 1))

    @classmethod
    def parse(cls, spec: str) -> SpeculativeConfig:
        """'ngram', 'ngram:k=4,max_ngram=3' or 'draft=PATH,k=4[,ngram=1]' (the command line's forms)."""
        if spec.startswith("draft="):
            path, _, options = spec[len("draft=") :].partition(",")
            method = "draft"
            if not path:
                raise InvalidParameterError("speculative 'draft=PATH' needs a path", "speculative")
        else:
            method, _, options = spec.partition(":")
            path = None
            if method != "ngram":
                raise InvalidParameterError(
                    f"speculative method must be 'ngram[:k=N,...]' or 'draft=PATH[,k=N]', got {spec!r}",
                    "speculative",
                )
        allowed = _OPTIONS[method]
        values: dict[str, int] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in allowed or not value.isdigit():
                raise InvalidParameterError(
                    f"bad speculative option {item!r} for {method}; use "
                    + ", ".join(f"{a}=N" for a in allowed),
                    "speculative",
                )
            values[key] = int(value)
        config = cls(method, draft_path=path, **values)
        if (
            not 1 <= config.k <= 16
            or not 1 <= config.min_ngram <= config.max_ngram
            or config.ngram > 1
            or config.branch > 1
        ):
            raise InvalidParameterError(
                "speculative k must be in [1, 16], 1 <= min_ngram <= max_ngram and ngram, branch 0 or 1",
                "speculative",
            )
        return config


@dataclass(slots=True)
class DraftProposal:
    """Guessed tokens for one sequence. `probs` [len(token_ids), vocab] is the distribution each guess was
    drawn from, needed by the rejection rule; None means the guesses were picked deterministically."""

    token_ids: list[int]
    probs: torch.Tensor | None = None
    # Greedy sequences: another candidate for the first token (the draft's second choice); when the target
    # picks it, it and the target's token after it are both kept (a two-branch tree, engine/runner.py).
    branch: int | None = None


class Proposer(ABC):
    """Guesses continuations for a batch of decoding sequences; the target verifies them."""

    # True: the engine hands over the target's final hidden states (`observe`) after every step.
    wants_hidden_states = False

    @abstractmethod
    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[DraftProposal]:
        """Up to num_tokens[i] guesses for seqs[i], whose KV is computed up to its last token."""

    def release(self, seq: Sequence) -> None:  # noqa: B027 - a proposer without per-sequence state
        """Forget a sequence that finished, was aborted or was preempted (free any state it holds)."""

    def observe(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:  # noqa: B027
        """The target's final hidden states [n, H] for seq's positions start..start+n-1, now verified."""


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and propose what followed."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_n = config.max_ngram
        self.min_n = config.min_ngram

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[DraftProposal]:
        return [DraftProposal(self.lookup(s.token_ids, k)) for s, k in zip(seqs, num_tokens, strict=True)]

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        length = len(token_ids)
        for n in range(self.max_n, self.min_n - 1, -1):
            if length <= n:
                continue
            pattern = token_ids[-n:]
            first = pattern[0]
            for start in range(length - n - 1, -1, -1):
                if token_ids[start] == first and token_ids[start : start + n] == pattern:
                    return token_ids[start + n : start + n + k]
        return []
