"""Token selection for a batch of rows, each with its own parameters and (optionally) its own seed.

Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)): a seeded row draws its noise from its
own generator, so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    banned_token_ids: list[int]  # e.g. EOS before min_tokens


def _apply_penalties(logits: torch.Tensor, row: SamplingRow) -> None:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(row.output_token_ids), minlength=logits.shape[0]).to(
            logits.dtype
        )
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _truncate(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply top-k, top-p and min-p in one sort; logits are already divided by temperature."""
    vocab = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows])
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=logits.dtype)
    ordered, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = ordered.softmax(dim=-1)
    drop |= (probs.cumsum(dim=-1) - probs) > top_p.unsqueeze(1)
    drop |= probs < (min_p * probs[:, :1].squeeze(1)).unsqueeze(1)
    drop[:, 0] = False
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def sampling_probabilities(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Each row's sampling distribution: divided by its temperature, then top-k/top-p/min-p applied."""
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype).unsqueeze(1)
    scaled = logits / temps
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 or r.params.min_p > 0.0 for r in rows):
        scaled = _truncate(scaled, rows)
    return scaled.softmax(dim=-1)


def _sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def verify_draft(
    logits: torch.Tensor, draft: list[int], row: SamplingRow, draft_probs: torch.Tensor | None = None
) -> list[int]:
    """Check k draft tokens against the target's k+1 distributions; returns accepted drafts + one more.

    Greedy keeps drafts while they equal the target's argmax. Sampling uses the standard rejection rule:
    keep draft d with probability min(1, p(d) / q(d)); on rejection draw from max(0, p - q), renormalised.
    `draft_probs` [k, V] is q, the distribution each draft was drawn from; None means the drafts were
    chosen deterministically (q one-hot: keep d with probability p(d), else draw from p without d).
    Either way the output follows the target's own distribution exactly.
    """
    if row.params.greedy:
        targets = logits.argmax(dim=-1).tolist()
        accepted = []
        for i, token in enumerate(draft):
            if targets[i] != token:
                return accepted + [targets[i]]
            accepted.append(token)
        return accepted + [targets[len(draft)]]
    probs = sampling_probabilities(logits, [row] * logits.shape[0])
    accepted = []
    for i, token in enumerate(draft):
        q = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if torch.rand(1, generator=row.generator).item() * q < probs[i, token].item():
            accepted.append(token)
            continue
        if draft_probs is None:
            residual = probs[i].clone()
            residual[token] = 0.0
        else:
            residual = (probs[i] - draft_probs[i]).clamp_min_(0.0)
        total = residual.sum()
        if total <= 0:  # p == q: a rejection cannot happen except by rounding; p itself is then right
            residual, total = probs[i], probs[i].sum()
        return accepted + [_sample_from(residual / total, row.generator)]
    return accepted + [_sample_from(probs[len(draft)], row.generator)]


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [N, V] raw model output, one row per entry of rows. Returns chosen ids and logprobs."""
    wants_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = logits.log_softmax(dim=-1) if any(wants_logprobs) else None
    if any(r.params.uses_penalties or r.banned_token_ids for r in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.params.uses_penalties:
                _apply_penalties(logits[i], row)
            if row.banned_token_ids:
                logits[i, row.banned_token_ids] = float("-inf")
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        picked = [rows[i] for i in random_rows]
        index = torch.tensor(random_rows)
        probs = sampling_probabilities(logits[index], picked)
        noise = torch.empty_like(probs)
        for j, row in enumerate(picked):
            noise[j].exponential_(generator=row.generator)
        chosen[index] = (probs / noise).argmax(dim=-1)
    token_ids = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, row in enumerate(rows):
            if not wants_logprobs[i]:
                continue
            top = []
            if row.params.logprobs:
                values, ids = raw_logprobs[i].topk(row.params.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            logprobs[i] = TokenLogprob(token_ids[i], float(raw_logprobs[i, token_ids[i]]), top)
    return token_ids, logprobs
