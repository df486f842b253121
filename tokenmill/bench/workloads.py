"""Benchmark workloads shared by the offline and online benchmarks."""

from __future__ import annotations

import numpy as np


def random_token_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from [3, vocab_size) (ids 0-2 are
    usually special), reproducible from `seed`."""
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must be > 3, got {vocab_size}")
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(num, input_len)).tolist()
