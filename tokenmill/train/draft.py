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

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.models.draft import HEAD_TOKENS, DraftFileInfo, save_draft_file
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.train.draft_network import DraftNetwork, first_layers
from tokenmill.train.samples import (
    Sample,
    generate_samples,
    load_samples,
    save_samples,
    training_conversations,
)

IGNORE = -100


@dataclass(slots=True)
class DraftTrainConfig:
    output: Path
    model: str | None = None
    num_layers: int = 2
    source_layers: list[int] | None = None  # default: the target's first layers
    minutes: float = 20.0  # whole run: target answers, then training
    data_fraction: float = 0.4  # share of the time spent collecting the target's answers
    max_steps: int | None = None  # stop earlier than the time budget
    answer_tokens: int = 128
    max_prompts: int | None = None
    head_tokens: int = 8192  # 0: score the whole vocabulary
    batch_size: int = 8
    max_length: int = 320
    learning_rate: float = 5e-4
    samples_path: Path | None = None  # cache of the target's answers, reused when present
    threads: int | None = None
    seed: int = 0
    log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise InvalidParameterError("num_layers must be >= 1", "num_layers")
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
    heldout_agreement: float  # share of held-out answer tokens where the draft's argmax is the target's


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
    rows = [(s.prompt_ids + s.output_ids)[:max_length] for s in samples]
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


def _loss(network: DraftNetwork, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    hidden = network(ids)
    picked = labels != IGNORE
    logits = network.logits(hidden[picked])
    targets = labels[picked]
    known = targets >= 0  # answer tokens outside the draft's head cannot be guessed; not trained on
    loss = F.cross_entropy(logits[known], targets[known])
    agree = (logits.argmax(-1) == targets).sum()
    return loss, agree, torch.tensor(targets.numel())


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
    engine = LLMEngine(EngineConfig(model=config.model, num_threads=config.threads), loaded)
    samples = load_samples(config.samples_path, cfg.name) if config.samples_path else None
    if samples is None:
        conversations = training_conversations(config.seed)[: config.max_prompts]
        samples = generate_samples(engine, conversations, config.answer_tokens, budget * config.data_fraction)
        if config.samples_path:
            save_samples(config.samples_path, samples, cfg.name)
    samples = [s for s in samples if s.output_ids]
    if len(samples) < 2:
        raise InvalidParameterError("too few target answers to train on; give more minutes", "minutes")
    data_seconds = time.monotonic() - start
    random.Random(config.seed).shuffle(samples)
    heldout = samples[: max(1, min(32, len(samples) // 10))]
    train = samples[len(heldout) :]

    head_ids = None
    if config.head_tokens and config.head_tokens < cfg.vocab_size:
        head_ids = choose_head_tokens(train, config.head_tokens, engine.eos_token_ids)
    column = None
    if head_ids is not None:
        column = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
        column[head_ids] = torch.arange(len(head_ids))
    sources = config.source_layers or first_layers(config.num_layers)
    if len(sources) != config.num_layers or not all(0 <= s < cfg.num_layers for s in sources):
        raise InvalidParameterError(
            f"source_layers must be {config.num_layers} layer indices in [0, {cfg.num_layers})",
            "source_layers",
        )
    del engine
    network = DraftNetwork(cfg, loaded.weights, sources, head_ids, config.max_length + 1)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=0.0)
    answer_tokens = sum(len(s.output_ids) for s in train)
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
            ids, labels = _batch(
                rng.sample(train, min(config.batch_size, len(train))), column, config.max_length
            )
            loss, agree, total = _loss(network, ids, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            step += 1
            value = loss.item()
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            config.log.append({"step": step, "loss": value, "agreement": int(agree) / max(1, int(total))})
            bar.set_postfix(loss=f"{ema:.3f}", acc=f"{int(agree) / max(1, int(total)):.2f}")
            bar.update(1)
    with torch.no_grad():
        agree = total = 0
        for i in range(0, len(heldout), config.batch_size):
            ids, labels = _batch(heldout[i : i + config.batch_size], column, config.max_length)
            _, a, t = _loss(network, ids, labels)
            agree, total = agree + int(a), total + int(t)
    weights = network.export()
    if head_ids is not None:
        weights[HEAD_TOKENS] = head_ids
    info = DraftFileInfo(
        target=cfg.name,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=config.num_layers,
        source_layers=sources,
        extra={"steps": step, "final_loss": ema, "samples": len(samples), "answer_tokens": answer_tokens},
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
        heldout_agreement=agree / max(1, total),
    )
