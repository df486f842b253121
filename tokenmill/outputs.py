"""What a request gives back: per-sample text, ids, finish reason, logprobs, and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling import TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class RequestMetrics:
    """Monotonic timestamps (seconds) of a request's life; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    spec_draft_tokens: int = 0  # speculative guesses checked for this request
    spec_accepted_tokens: int = 0  # of which the target agreed with

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    new_token_counts: list[int] = field(default_factory=list)  # tokens added per sample this step

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
