"""SamplingParams: how one request picks its tokens, validated where the request enters."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import InvalidParameterError

MAX_LOGPROBS = 20


def _require(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidParameterError(message, param)


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of a chosen token and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SamplingParams:
    """OpenAI/vLLM-style knobs. temperature == 0 means greedy."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        _require(isinstance(self.n, int) and 1 <= self.n <= 64, f"n must be in [1, 64], got {self.n}", "n")
        _require(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be a positive integer or None, got {self.max_tokens}",
            "max_tokens",
        )
        _require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        _require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            "min_tokens",
        )
        _require(
            0.0 <= self.temperature <= 100.0,
            f"temperature must be in [0, 100], got {self.temperature}",
            "temperature",
        )
        _require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _require(
            isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
            f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k}",
            "top_k",
        )
        _require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        _require(
            0.0 < self.repetition_penalty <= 10.0,
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
            "repetition_penalty",
        )
        _require(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            "presence_penalty",
        )
        _require(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            "frequency_penalty",
        )
        _require(
            self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63),
            f"seed must be a 64-bit integer, got {self.seed!r}",
            "seed",
        )
        _require(
            all(isinstance(s, str) and s for s in self.stop),
            "stop must be a non-empty string or a list of non-empty strings",
            "stop",
        )
        _require(len(self.stop) <= 16, "at most 16 stop strings are allowed", "stop")
        _require(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
            "stop_token_ids",
        )
        _require(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            "logprobs",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
