"""Per-sequence state: its tokens, how many have KV in the cache, its block table and its timings."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from tokenmill.sampling import SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One stream of tokens. A request with n > 1 owns n sequences that share the prompt's KV blocks."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [k, vocab] the proposer's q, when it sampled its guesses
    # Greedy only: a second candidate for the first draft token, verified in the same pass (runner.py).
    draft_branch: int | None = None
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    output_text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop all KV; prompt and outputs so far are prefilled again later."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_hashes = []
        self.draft_token_ids = []
        self.draft_probs = None
        self.draft_branch = None
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
