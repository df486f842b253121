"""The target's final hidden states over its own answers: what an EAGLE-style draft learns to continue.

One prefill pass of the target over prompt + answer gives the (normalised) hidden state at every position,
the same states the engine hands the proposer while decoding. Many samples go through one forward as
separate prefill spans, so the pass runs at prefill speed (large matmuls), not decode speed.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tokenmill.layers.attention import AttentionContext, PrefillSpan
from tokenmill.models.llama import LlamaModel
from tokenmill.train.samples import Sample


def sample_features(
    model: LlamaModel, samples: list[Sample], max_length: int, tokens_per_pass: int = 2048
) -> list[torch.Tensor]:
    """For each sample, the target's final hidden states [T, H] over its first `max_length` tokens."""
    cfg = model.config
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(samples), desc="target features", unit="answer", disable=None)
    with bar:
        index = 0
        while index < len(samples):
            group: list[list[int]] = []
            while index < len(samples) and (
                not group
                or sum(map(len, group)) + len(samples[index].token_ids(max_length)) <= tokens_per_pass
            ):
                group.append(samples[index].token_ids(max_length))
                index += 1
            total = sum(map(len, group))
            kv_cache = torch.zeros(cfg.num_layers, 2, total, cfg.num_kv_heads, cfg.head_dim)
            ctx = AttentionContext(slot_mapping=torch.arange(total))
            positions: list[int] = []
            row = 0
            for ids in group:
                ctx.prefills.append(PrefillSpan(row, row + len(ids)))
                positions.extend(range(len(ids)))
                row += len(ids)
            flat = torch.tensor([t for ids in group for t in ids])
            hidden = model.forward(flat, torch.tensor(positions), ctx, kv_cache)
            out.extend(part.clone() for part in hidden.split([len(ids) for ids in group]))
            bar.update(len(group))
    return out
