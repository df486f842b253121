"""Benchmark workloads shared by the offline and online benchmarks."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np


def random_token_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from [3, vocab_size) (ids 0-2 are
    usually special), reproducible from `seed`."""
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must be > 3, got {vocab_size}")
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab_size, size=(num, input_len)).tolist()


def shared_prefix_prompts(
    num: int, prefix_len: int, suffix_len: int, group_size: int, vocab_size: int, seed: int
) -> list[list[int]]:
    """Groups of `group_size` prompts behind one shared `prefix_len`-token 'system prompt' each, then a
    unique `suffix_len`-token question: the case prefix caching is for."""
    rng = np.random.default_rng(seed)
    prompts = []
    for start in range(0, num, group_size):
        prefix = rng.integers(3, vocab_size, size=prefix_len).tolist()
        for _ in range(min(group_size, num - start)):
            prompts.append(prefix + rng.integers(3, vocab_size, size=suffix_len).tolist())
    return prompts


def shipped_prompts() -> dict:
    """The prompt file shipped with tokenmill: input-grounded tasks and general chat questions."""
    return json.loads(resources.files("tokenmill.bench").joinpath("data/prompts.json").read_text())


def grounded_messages() -> list[list[dict]]:
    return [
        [{"role": "user", "content": f"{item['instruction']}\n\n{item['passage']}"}]
        for item in shipped_prompts()["grounded"]
    ]


def chat_messages() -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in shipped_prompts()["chat"]]


def chat_prompts(tokenizer, num: int) -> list[list[int]]:
    """The shipped chat and input-grounded conversations, templated and tokenised, cycled to `num`."""
    conversations = chat_messages() + grounded_messages()
    encoded = [tokenizer.encode(tokenizer.apply_chat_template(c)) for c in conversations]
    return [encoded[i % len(encoded)] for i in range(num)]
