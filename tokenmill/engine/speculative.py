"""Speculative decoding: a cheap proposer guesses the next k tokens, one target pass checks them all.

Decode is memory-bound: checking k+1 positions costs about one weight read, so every accepted guess is a
token for free. That stops being true once the step is compute-bound, so speculation is switched off when
the running batch times (k+1) passes the machine's crossover batch (FLOP/s / bytes/s * bytes/param / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import InvalidParameterError

# fp32 crossover measured on the reference machine (2 EPYC cores): ~77 GFLOP/s over ~22.6 GB/s -> ~7.
DEFAULT_CROSSOVER_TOKENS = 7


@dataclass(slots=True)
class SpeculativeConfig:
    method: str
    k: int = 4
    # Matching on 2-4 tokens, not 1: single-token matches guess badly in free chat (measured with
    # `tokenmill bench speculative`: chat 1.20x -> 1.30x, input-grounded 2.61x -> 2.55x).
    max_ngram: int = 4
    min_ngram: int = 2
    crossover_tokens: int = DEFAULT_CROSSOVER_TOKENS

    @property
    def max_batch(self) -> int:
        """Largest running batch that still speculates: batch * (k + 1) tokens within the crossover."""
        return max(1, self.crossover_tokens // (self.k + 1))

    @classmethod
    def parse(cls, spec: str) -> SpeculativeConfig:
        """'ngram' or 'ngram:k=4,max_ngram=3' (the form used on the command line)."""
        method, _, options = spec.partition(":")
        if method != "ngram":
            raise InvalidParameterError(f"speculative method must be 'ngram', got {method!r}", "speculative")
        values: dict[str, int] = {}
        for item in filter(None, options.split(",")):
            key, _, value = item.partition("=")
            if key not in ("k", "max_ngram", "min_ngram", "crossover_tokens") or not value.isdigit():
                raise InvalidParameterError(
                    f"bad speculative option {item!r}; use k=N, max_ngram=N, min_ngram=N, crossover_tokens=N",
                    "speculative",
                )
            values[key] = int(value)
        config = cls(method, **values)
        if not 1 <= config.k <= 16 or not 1 <= config.min_ngram <= config.max_ngram:
            raise InvalidParameterError("speculative k must be in [1, 16] and 1 <= min_ngram <= max_ngram")
        return config


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens and propose what followed."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_n = config.max_ngram
        self.min_n = config.min_ngram

    def propose(self, token_ids: list[int], k: int) -> list[int]:
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
