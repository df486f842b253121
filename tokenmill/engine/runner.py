"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSequence
from tokenmill.layers.attention import AttentionContext, PrefillSpan
from tokenmill.layers.sampler import SamplingRow, sample
from tokenmill.models.llama import LlamaModel
from tokenmill.sampling import TokenLogprob


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
    return per_token * block_size * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(
        self, model: LlamaModel, engine_config: EngineConfig, num_blocks: int, dtype: torch.dtype
    ) -> None:
        cfg = model.config
        self.model = model
        self.block_size = engine_config.block_size
        self.kv_cache = torch.zeros(
            cfg.num_layers, 2, num_blocks * self.block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype
        )
        self._offsets = torch.arange(self.block_size)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of token positions [start, end) of a sequence."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        size = self.block_size
        for source, target in copies:
            self.kv_cache[:, :, target * size : (target + 1) * size] = self.kv_cache[
                :, :, source * size : (source + 1) * size
            ]

    def prepare(
        self, entries: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        """Decodes (one new token) go first so they form one padded batch; prefill spans follow."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        decodes = [e for e in entries if e.num_new_tokens == 1]
        context_lens = []
        for entry in decodes:
            seq = entry.seq
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            block = seq.block_table[pos // self.block_size]
            slots.append(torch.tensor([block * self.block_size + pos % self.block_size]))
            context_lens.append(pos + 1)
            sample_rows.append(len(ids) - 1)
        ctx = AttentionContext(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=len(decodes))
        if decodes:
            width = max(len(e.seq.block_table) for e in decodes)
            tables = torch.zeros(len(decodes), width, dtype=torch.long)
            for row, entry in enumerate(decodes):
                tables[row, : len(entry.seq.block_table)] = torch.tensor(entry.seq.block_table)
            gather = (tables.unsqueeze(-1) * self.block_size + self._offsets).reshape(len(decodes), -1)
            padding = torch.arange(gather.shape[1]) >= torch.tensor(context_lens).unsqueeze(1)
            ctx.decode_gather = gather.reshape(-1)
            ctx.decode_bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))[
                :, None, None, :
            ]
        for entry in entries:
            if entry.num_new_tokens == 1:
                continue
            seq = entry.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + entry.num_new_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.append(self._slots(seq.block_table, start, end))
            span = PrefillSpan(row, row + entry.num_new_tokens)
            if start > 0:
                span.gather = self._slots(seq.block_table, 0, end)
                query_pos = torch.arange(start, end).unsqueeze(1)
                span.mask = torch.arange(end).unsqueeze(0) <= query_pos
            ctx.prefills.append(span)
            sample_rows.append(len(ids) - 1)
        ctx.slot_mapping = torch.cat(slots)
        return torch.tensor(ids), torch.tensor(positions), ctx, sample_rows

    def execute(
        self, batch: ScheduledBatch, rows: dict[int, SamplingRow]
    ) -> dict[int, tuple[int, TokenLogprob | None]]:
        """Run one step. rows maps seq_id -> sampling inputs for sequences that sample this step."""
        if batch.block_copies:
            self.copy_blocks(batch.block_copies)
        decodes = [e for e in batch.entries if e.num_new_tokens == 1]
        ordered = decodes + [e for e in batch.entries if e.num_new_tokens != 1]
        input_ids, positions, ctx, last_rows = self.prepare(batch.entries)
        sampled = [(e.seq.seq_id, r) for e, r in zip(ordered, last_rows, strict=True) if e.seq.seq_id in rows]
        if not sampled:
            self.model.forward(input_ids, positions, ctx, self.kv_cache)
            return {}
        hidden = self.model.forward(input_ids, positions, ctx, self.kv_cache)
        logits = self.model.compute_logits(hidden[torch.tensor([r for _, r in sampled])])
        token_ids, logprobs = sample(logits, [rows[seq_id] for seq_id, _ in sampled])
        return {
            seq_id: (token, logprob)
            for (seq_id, _), token, logprob in zip(sampled, token_ids, logprobs, strict=True)
        }
