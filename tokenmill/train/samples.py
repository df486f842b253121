"""Training text for a draft: the target's own answers to the prompts shipped for distillation.

The draft's job is to guess what the target will write next, so it learns from the target's greedy
answers (sequence-level distillation): each answer token is the target's argmax given everything before it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling import SamplingParams


@dataclass(slots=True)
class Sample:
    prompt_ids: list[int]
    output_ids: list[int]
    greedy: bool = True  # False: sampled at a temperature, for more varied text (its tokens are not argmaxes)

    def token_ids(self, max_length: int) -> list[int]:
        """Prompt then answer, cut at max_length: the text a draft trains on."""
        return (self.prompt_ids + self.output_ids)[:max_length]


def training_conversations(seed: int = 0) -> list[list[dict]]:
    """The shipped questions interleaved one for one with template prompts (every template filled with
    every topic), in a seeded random order. The questions come early because answers are collected for a
    fixed time: they are the varied text (many forms and subjects), the templates repeat each topic."""
    data = json.loads(resources.files("tokenmill.train").joinpath("data/draft_prompts.json").read_text())
    rng = random.Random(seed)
    templated = [t.format(topic=topic) for t in data["templates"] for topic in data["topics"]]
    questions = list(data["questions"])
    rng.shuffle(templated)
    rng.shuffle(questions)
    texts = [text for pair in zip(questions, templated, strict=False) for text in pair]
    shared = min(len(questions), len(templated))
    texts += questions[shared:] + templated[shared:]
    return [[{"role": "user", "content": text}] for text in texts]


def generate_samples(
    engine: LLMEngine,
    conversations: list[list[dict]],
    max_tokens: int,
    seconds: float,
    temperatures: list[float] | None = None,
) -> list[Sample]:
    """Answers from the target, as many as fit in `seconds` (requests still running at the end are kept if
    they have some tokens already). temperatures[i] > 0 samples conversation i instead of greedy decoding."""
    temperatures = temperatures or [0.0] * len(conversations)
    prompts = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template(c)) for c in conversations]
    latest: dict[str, list[int]] = {}
    finished: set[str] = set()
    next_prompt = 0
    start = time.monotonic()
    bar = tqdm(total=len(prompts), desc="target answers", unit="prompt", disable=None)
    with bar:
        while True:
            late = time.monotonic() - start > seconds
            in_flight = next_prompt - len(finished)
            while not late and next_prompt < len(prompts) and in_flight < engine.config.max_num_seqs:
                temperature = temperatures[next_prompt]
                seed = next_prompt if temperature else None  # repeated prompts get different answers
                params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
                engine.add_request(f"draft-data-{next_prompt}", prompts[next_prompt], params)
                next_prompt += 1
                in_flight += 1
            if in_flight == 0 or (late and time.monotonic() - start > seconds * 1.1):
                break
            for output in engine.step():
                latest[output.request_id] = output.outputs[0].token_ids
                if output.finished:
                    finished.add(output.request_id)
                    bar.update(1)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    samples = []
    for i in range(next_prompt):
        output = latest.get(f"draft-data-{i}", [])
        if f"draft-data-{i}" in finished or len(output) >= 16:
            samples.append(Sample(prompts[i], list(output), temperatures[i] == 0))
    return samples


def save_samples(path: Path, samples: list[Sample], target: str) -> None:
    rows = [{"prompt": s.prompt_ids, "output": s.output_ids, "greedy": s.greedy} for s in samples]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": target, "samples": rows}))


def load_samples(path: Path, target: str) -> list[Sample] | None:
    """Samples saved by an earlier run for the same target, or None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("target") != target:
        return None
    return [Sample(r["prompt"], r["output"], r.get("greedy", True)) for r in data["samples"]]
