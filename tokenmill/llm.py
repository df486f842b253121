"""Offline API: LLM(model).generate(prompts, params) and .chat(messages, params)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """Runs a batch of prompts to completion through the continuous-batching engine."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        loaded = engine_options.pop("loaded", None)
        config = engine_options.pop("config", None) or EngineConfig(model=model, **engine_options)
        self.engine = LLMEngine(config, loaded)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in prompt order. A single prompt may be a string or a list of ids."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if not prompts:
            raise InvalidParameterError("generate() needs at least one prompt", "prompts")
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise InvalidParameterError("give one SamplingParams, or one per prompt", "params")
        request_ids = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Messages | Seq[Messages],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generating", unit="req", disable=not use_tqdm)
        with bar:
            while pending:
                for output in self.engine.step(finished_only=True):
                    if output.finished and output.request_id in pending:
                        pending.discard(output.request_id)
                        finished[output.request_id] = output
                        bar.update(1)
                if pending and not self.engine.scheduler.has_unfinished():
                    raise RuntimeError("engine stopped with requests pending")  # an engine bug, not input
        return [finished[r] for r in request_ids]
