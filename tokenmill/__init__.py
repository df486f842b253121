"""tokenmill: a small LLM inference engine for the CPU, with continuous batching over a paged KV cache."""

from tokenmill.config import EngineConfig
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams"]
