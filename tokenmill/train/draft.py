"""`tokenmill draft train`: distil a small draft model for a target from the target's own answers.

No public draft shares SmolLM2's tokenizer, so tokenmill makes one: a few decoder layers of the target's
width, started from some of the target's own layers, on the target's frozen embeddings. It is trained with
cross-entropy against the target's greedy answers to the shipped prompts, which is the same as learning
the target's argmax — exactly what a greedy draft must guess. The LM head scores only the tokens the target
actually wrote (plus its stop tokens), which makes drafting several times cheaper than a full-vocabulary head.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.kernels import kernels_available
from tokenmill.models.draft import HEAD_TOKENS, DraftFileInfo, save_draft_file
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.train.draft_network import DraftNetwork, first_layers
from tokenmill.train.eagle import EagleTrainer
from tokenmill.train.samples import (
    Sample,
    generate_samples,
    load_samples,
    save_samples,
    training_conversations,
)

IGNORE = -100
SAMPLED_TEMPERATURE = 0.8


@dataclass(slots=True)
class DraftTrainConfig:
    output: Path
    model: str | None = None
    kind: str = "eagle"  # "eagle": one layer over the target's hidden states; "layers": a token-only draft
    depth: int = 3  # eagle: guesses deep the training runs the draft on its own guesses
    sampled_answers: int = 0  # eagle: extra answers per prompt sampled at temperature 0.8 (more text)
    num_layers: int = 2
    source_layers: list[int] | None = None  # default: the target's first layers
    minutes: float | None = None  # whole run: answers, (eagle) their hidden states, training; 50 / 20
    data_fraction: float | None = None  # share of the time spent writing answers; eagle 0.3, layers 0.4
    max_steps: int | None = None  # stop earlier than the time budget
    answer_tokens: int = 128
    max_prompts: int | None = None
    head_tokens: int = 8192  # 0: score the whole vocabulary
    batch_size: int | None = None  # default per kind: eagle 4, layers 8
    max_length: int = 320
    learning_rate: float | None = None  # default per kind: eagle 3e-3, layers 5e-4
    samples_path: Path | None = None  # cache of the target's answers, reused when present
    threads: int | None = None
    seed: int = 0
    log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        eagle = self.kind == "eagle"
        if self.batch_size is None:
            self.batch_size = 4 if eagle else 8
        if self.learning_rate is None:
            self.learning_rate = 3e-3 if eagle else 5e-4
        if self.minutes is None:
            self.minutes = 50.0 if eagle else 20.0
        if self.data_fraction is None:
            self.data_fraction = 0.3 if eagle else 0.4
        if self.kind not in ("eagle", "layers"):
            raise InvalidParameterError(f"draft kind must be 'eagle' or 'layers', got {self.kind!r}", "kind")
        if self.num_layers < 1 or not 1 <= self.depth <= 8 or self.sampled_answers < 0:
            raise InvalidParameterError(
                "num_layers >= 1, depth in [1, 8], sampled_answers >= 0", "num_layers"
            )
        if self.minutes <= 0 or not 0 < self.data_fraction < 1:
            raise InvalidParameterError("minutes must be > 0 and data_fraction in (0, 1)", "minutes")
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidParameterError("max_steps must be >= 1", "max_steps")
        if self.head_tokens < 0 or self.batch_size < 1 or self.max_length < 8:
            raise InvalidParameterError("head_tokens >= 0, batch_size >= 1, max_length >= 8", "head_tokens")


@dataclass(slots=True)
class DraftTrainResult:
    output: Path
    steps: int
    seconds: float
    data_seconds: float
    num_samples: int
    num_answer_tokens: int
    final_loss: float
    heldout_agreement: float  # share of held-out answer tokens where the draft's first guess is the target's
    heldout_by_depth: list[float] = field(default_factory=list)  # eagle: the same for guesses 1..depth


def choose_head_tokens(samples: list[Sample], count: int, always: tuple[int, ...]) -> torch.Tensor:
    """The `count` token ids the target writes most often, plus its stop tokens; sorted."""
    counts = Counter(t for s in samples for t in s.output_ids)
    counts.update(t for s in samples for t in s.prompt_ids)
    chosen = set(always)
    for token, _ in counts.most_common():
        if len(chosen) >= count:
            break
        chosen.add(token)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _batch(samples: list[Sample], column: torch.Tensor | None, max_length: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids and labels: position t of an answer is labelled with the target's token t + 1."""
    rows = [s.token_ids(max_length) for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, sample) in enumerate(zip(rows, samples, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        start = len(sample.prompt_ids) - 1
        if start + 1 < len(row):
            targets = torch.tensor(row[start + 1 :])
            labels[i, start : len(row) - 1] = column[targets] if column is not None else targets
    return ids, labels


class LayersTrainer:
    """The token-only draft: a few decoder layers reading the text, trained on greedy answers."""

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        samples: list[Sample],
        head_ids: torch.Tensor | None,
        sources: list[int],
        max_length: int,
    ) -> None:
        self.samples = samples
        self.max_length = max_length
        self.network = DraftNetwork(config, weights, sources, head_ids, max_length + 1)
        self.column = None
        if head_ids is not None:
            self.column = torch.full((config.vocab_size,), -1, dtype=torch.long)
            self.column[head_ids] = torch.arange(len(head_ids))

    def parameters(self):
        return self.network.parameters()

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, int, int]:
        ids, labels = _batch([self.samples[i] for i in indices], self.column, self.max_length)
        hidden = self.network(ids)
        picked = labels != IGNORE
        logits = self.network.logits(hidden[picked])
        targets = labels[picked]
        known = targets >= 0  # answer tokens outside the draft's head cannot be guessed; not trained on
        loss = F.cross_entropy(logits[known], targets[known])
        return loss, int((logits.argmax(-1) == targets).sum()), targets.numel()

    @torch.no_grad()
    def agreement(self, indices: list[int], batch_size: int) -> list[float]:
        agree = total = 0
        for i in range(0, len(indices), batch_size):
            _, a, t = self.loss(indices[i : i + batch_size])
            agree, total = agree + a, total + t
        return [agree / max(1, total)]

    def export(self) -> dict[str, torch.Tensor]:
        return self.network.export()


def train_draft(config: DraftTrainConfig, loaded: LoadedModel | None = None) -> DraftTrainResult:
    """Collect the target's answers (or reuse saved ones), train the draft, write the draft file."""
    start = time.monotonic()
    budget = config.minutes * 60
    torch.manual_seed(config.seed)
    loaded = loaded or load_model(config.model)
    cfg = loaded.config
    if cfg.qk_norm or cfg.attention_bias:
        raise InvalidParameterError(
            f"draft training supports llama/mistral-style targets; {cfg.architecture} has q/k norm or bias",
            "model",
        )
    # The EAGLE labels come from an fp32 pass over the answers afterwards, so its answers can be written
    # by the faster int8 engine (with the kernels; the fallback's int8 is slower than fp32).
    quantization = "int8" if config.kind == "eagle" and kernels_available() else None
    engine = LLMEngine(
        EngineConfig(model=config.model, num_threads=config.threads, quantization=quantization), loaded
    )
    samples = load_samples(config.samples_path, cfg.name) if config.samples_path else None
    if samples is None:
        conversations = training_conversations(config.seed)[: config.max_prompts]
        temperatures = [0.0] * len(conversations)
        if config.kind == "eagle":  # sampled answers after the greedy ones: more text from the same prompts
            extra = len(conversations) * config.sampled_answers
            conversations = conversations + conversations * config.sampled_answers
            temperatures += [SAMPLED_TEMPERATURE] * extra
        seconds = budget * config.data_fraction
        samples = generate_samples(engine, conversations, config.answer_tokens, seconds, temperatures)
        if config.samples_path:
            save_samples(config.samples_path, samples, cfg.name)
    samples = [s for s in samples if s.output_ids and (s.greedy or config.kind == "eagle")]
    greedy = [i for i, s in enumerate(samples) if s.greedy]
    if len(greedy) < 2:
        raise InvalidParameterError("too few target answers to train on; give more minutes", "minutes")
    random.Random(config.seed).shuffle(greedy)
    heldout = greedy[: max(1, min(32, len(greedy) // 10))]  # greedy answers: what drafting will see
    train = sorted(set(range(len(samples))) - set(heldout))
    head_ids = None
    if config.head_tokens and config.head_tokens < cfg.vocab_size:
        head_ids = choose_head_tokens([samples[i] for i in train], config.head_tokens, engine.eos_token_ids)
    num_layers = 1 if config.kind == "eagle" else config.num_layers
    sources = config.source_layers or first_layers(num_layers)
    if len(sources) != num_layers or not all(0 <= s < cfg.num_layers for s in sources):
        raise InvalidParameterError(
            f"source_layers must be {num_layers} layer indices in [0, {cfg.num_layers})", "source_layers"
        )
    del engine
    if config.kind == "eagle":
        trainer = EagleTrainer(
            cfg, loaded.weights, samples, head_ids, config.max_length, config.depth, sources[0]
        )
    else:
        trainer = LayersTrainer(cfg, loaded.weights, samples, head_ids, sources, config.max_length)
    data_seconds = time.monotonic() - start
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=config.learning_rate, weight_decay=0.0)
    answer_tokens = sum(len(samples[i].output_ids) for i in train)
    rng = random.Random(config.seed + 1)
    train_start = time.monotonic()
    train_budget = max(1.0, budget - (train_start - start))
    step, ema = 0, None
    bar = tqdm(total=config.max_steps, desc="training draft", unit="step", disable=None)
    with bar:
        while True:
            elapsed = time.monotonic() - train_start
            done = elapsed / train_budget
            if config.max_steps is not None:
                done = max(done, step / config.max_steps)
            if done >= 1.0:
                break
            # Warm up for 20 steps, then cosine decay over the budget (time or steps, whichever is shorter).
            scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * done))
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * max(scale, 0.02)
            loss, agree, total = trainer.loss(rng.sample(train, min(config.batch_size, len(train))))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
            optimizer.step()
            step += 1
            value = loss.item()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            config.log.append({"step": step, "loss": value, "agreement": agree / max(1, total)})
            bar.set_postfix(loss=f"{ema:.3f}", acc=f"{agree / max(1, total):.2f}")
            bar.update(1)
    by_depth = trainer.agreement(heldout, config.batch_size)
    weights = trainer.export()
    if head_ids is not None:
        weights[HEAD_TOKENS] = head_ids
    info = DraftFileInfo(
        target=cfg.name,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=num_layers,
        source_layers=sources,
        extra={"steps": step, "final_loss": ema, "samples": len(samples), "answer_tokens": answer_tokens},
        kind=config.kind,
    )
    save_draft_file(config.output, weights, info)
    return DraftTrainResult(
        output=config.output,
        steps=step,
        seconds=time.monotonic() - start,
        data_seconds=data_seconds,
        num_samples=len(samples),
        num_answer_tokens=answer_tokens,
        final_loss=ema if ema is not None else float("nan"),
        heldout_agreement=by_depth[0],
        heldout_by_depth=by_depth,
    )
