"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache, and samples."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.batch import ScheduledBatch, ScheduledSequence
from tokenmill.kernels import kernels_available
from tokenmill.layers.attention import AttentionContext, PrefillSpan, kv_row_width
from tokenmill.layers.sampler import SamplingRow, argmax_suffices, sample, verify_draft
from tokenmill.models.llama import LlamaModel
from tokenmill.models.weight_arena import zeros_on_huge_pages
from tokenmill.sampling import TokenLogprob

StepResult = list[tuple[int, TokenLogprob | None]]


# Caches our decode kernels read in place (others go through gathers and SDPA).
KERNEL_KV_DTYPES = (torch.float32, torch.float16, torch.int8)


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    width = kv_row_width(model_config.head_dim, dtype)
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * width
    return per_token * block_size * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        engine_config: EngineConfig,
        num_blocks: int,
        dtype: torch.dtype,
        branch_blocks: int = 0,
    ) -> None:
        """`branch_blocks` scratch blocks past the block manager's hold branch candidates' K/V (one each)."""
        cfg = model.config
        self.model = model
        self.block_size = engine_config.block_size
        self.num_blocks = num_blocks
        self.branch_blocks = branch_blocks
        total_slots = (num_blocks + branch_blocks) * self.block_size
        self.kv_cache = zeros_on_huge_pages(
            (cfg.num_layers, 2, total_slots, cfg.num_kv_heads, kv_row_width(cfg.head_dim, dtype)), dtype
        )
        # Per step: seq_id -> (branch row, its scratch slot, the real slot of its position); and the
        # sequences whose branch the target took -> that row (its hidden state is the verified one).
        self.branch_rows: dict[int, tuple[int, int, int]] = {}
        self.branch_taken: dict[int, int] = {}
        self._offsets = torch.arange(self.block_size)
        # Prompts attending only their own fresh K/V: one kernel call per layer (kernels/cpu_prefill.cpp).
        self._prefill_kernel = (
            model.embed.dtype == torch.float32 and cfg.head_dim % 8 == 0 and kernels_available()
        )
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)
        # Set by execute(keep_hidden=True): the step's final hidden states and each entry's row range.
        self.last_hidden: torch.Tensor | None = None
        self.last_ranges: list[tuple[int, int]] = []

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
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[tuple[int, int]]]:
        """Flat inputs for the step. Decodes (one new token) go first as one padded batch; prefill chunks
        and draft-verification spans follow. Returns each entry's row range, in `entries` order."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        rows: dict[int, tuple[int, int]] = {}
        # A verification span (the last known token + its drafts) runs as one decode row per token, row j
        # seeing the context up to its own position: all-decode steps keep the one-call decode stack.
        decodes = [e for e in entries if e.num_new_tokens == 1 or _is_verification(e)]
        context_lens = []
        tables_rows: list[list[int]] = []
        decode_slots: list[int] = []
        for entry in decodes:
            seq = entry.seq
            start = seq.num_computed_tokens
            rows[id(entry)] = (len(ids), len(ids) + entry.num_new_tokens)
            known = seq.token_ids[start : start + entry.num_new_tokens]
            ids.extend(known + seq.draft_token_ids[: entry.num_new_tokens - len(known)])
            for pos in range(start, start + entry.num_new_tokens):
                positions.append(pos)
                context_lens.append(pos + 1)
                tables_rows.append(seq.block_table)
                decode_slots.append(
                    seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
        copies = self._branch_rows(decodes, ids, positions, context_lens, tables_rows, decode_slots)
        if decode_slots:
            slots.append(torch.tensor(decode_slots, dtype=torch.long))
        ctx = AttentionContext(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=len(ids))
        if copies:
            ctx.slot_copies = torch.tensor(copies, dtype=torch.long)
        if decodes:
            width = max(len(table) for table in tables_rows)
            tables = torch.tensor(
                [table + [0] * (width - len(table)) for table in tables_rows], dtype=torch.long
            )
            lengths = torch.tensor(context_lens)
            fp32_model = self.model.embed.dtype == torch.float32
            if fp32_model and self.kv_cache.dtype in KERNEL_KV_DTYPES and kernels_available():
                ctx.decode_block_tables, ctx.decode_lengths = tables, lengths
                ctx.block_size = self.block_size
            else:
                gather = (tables.unsqueeze(-1) * self.block_size + self._offsets).reshape(
                    len(tables_rows), -1
                )
                padding = torch.arange(gather.shape[1]) >= lengths.unsqueeze(1)
                ctx.decode_gather = gather.reshape(-1)
                ctx.decode_bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))[
                    :, None, None, :
                ]
        for entry in entries:
            if entry.num_new_tokens == 1 or _is_verification(entry):
                continue
            seq = entry.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + entry.num_new_tokens
            row = len(ids)
            rows[id(entry)] = (row, row + entry.num_new_tokens)
            tokens = seq.token_ids[start:end]
            if len(tokens) < entry.num_new_tokens:  # the span runs on into this step's draft tokens
                tokens = tokens + seq.draft_token_ids[: entry.num_new_tokens - len(tokens)]
            ids.extend(tokens)
            positions.extend(range(start, end))
            slots.append(self._slots(seq.block_table, start, end))
            span = PrefillSpan(row, row + entry.num_new_tokens)
            if start > 0:
                span.gather = self._slots(seq.block_table, 0, end)
                span.mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)
            ctx.prefills.append(span)
        fresh = [[span.start, span.end] for span in ctx.prefills if span.gather is None]
        if fresh and self._prefill_kernel:
            ctx.fresh_spans = torch.tensor(fresh, dtype=torch.long)
        ctx.slot_mapping = torch.cat(slots)
        return torch.tensor(ids), torch.tensor(positions), ctx, [rows[id(e)] for e in entries]

    def _branch_rows(
        self,
        decodes: list[ScheduledSequence],
        ids: list[int],
        positions: list[int],
        context_lens: list[int],
        tables_rows: list[list[int]],
        decode_slots: list[int],
    ) -> list[tuple[int, int]]:
        """A decode row for each verification's branch: its second candidate for position p + 1 (p the last
        known token), reading the context up to p and never the chain's own guess at p + 1. Its K/V go to a
        scratch block standing in for the block that holds p + 1. When p shares that block, the scratch
        block starts as a copy of it, and p's K/V, made in this very step, are copied in by the model once
        written (returned as (slot, slot) pairs for AttentionContext.slot_copies)."""
        self.branch_rows = {}
        copies: list[tuple[int, int]] = []
        size = self.block_size
        free = iter(range(self.num_blocks, self.num_blocks + self.branch_blocks))
        for entry in decodes:
            seq = entry.seq
            if seq.draft_branch is None or not _is_verification(entry):
                continue
            scratch = next(free, None)
            if scratch is None:
                break
            p = seq.num_computed_tokens
            block = (p + 1) // size
            table = list(seq.block_table)
            real_slot = table[block] * size + (p + 1) % size
            if p // size == block:  # positions before p in the block: K/V from earlier steps
                real, used = table[block] * size, p % size
                self.kv_cache[:, :, scratch * size : scratch * size + used] = self.kv_cache[
                    :, :, real : real + used
                ]
                copies.append((real + used, scratch * size + used))  # p itself, once written
            table[block] = scratch
            branch_slot = scratch * size + (p + 1) % size
            self.branch_rows[seq.seq_id] = (len(ids), branch_slot, real_slot)
            ids.append(seq.draft_branch)
            positions.append(p + 1)
            context_lens.append(p + 2)
            tables_rows.append(table)
            decode_slots.append(branch_slot)
        return copies

    def execute(
        self, batch: ScheduledBatch, rows: dict[int, SamplingRow], keep_hidden: bool = False
    ) -> dict[int, StepResult]:
        """Run one step. rows maps seq_id -> sampling inputs for sequences that sample this step; a
        sequence with draft tokens gets its drafts verified and may receive several tokens."""
        started = time.perf_counter()
        if batch.block_copies:
            self.copy_blocks(batch.block_copies)
        input_ids, positions, ctx, ranges = self.prepare(batch.entries)
        wanted = [(e.seq, r) for e, r in zip(batch.entries, ranges, strict=True) if e.seq.seq_id in rows]
        picked: list[int] = []
        for seq, (start, end) in wanted:
            picked.extend(range(start, end) if seq.draft_token_ids else [end - 1])
            if seq.seq_id in self.branch_rows:
                picked.append(self.branch_rows[seq.seq_id][0])
        prepared = time.perf_counter()
        if keep_hidden:  # a proposer reads every row's hidden state
            hidden = self.model.forward(input_ids, positions, ctx, self.kv_cache)
            self.last_hidden, self.last_ranges = hidden, ranges
            sampled = _rows(hidden, picked)
        elif _every_row(picked, len(input_ids)):
            sampled = self.model.forward(input_ids, positions, ctx, self.kv_cache)
        else:
            sampled = self.model.forward(
                input_ids, positions, ctx, self.kv_cache, torch.tensor(picked, dtype=torch.long)
            )
        if not wanted:
            self._record(started, prepared, time.perf_counter())
            return {}
        if len(picked) == len(wanted) and all(argmax_suffices(rows[seq.seq_id]) for seq, _ in wanted):
            # Every row greedy and one per sequence: the tokens without the logits (an int8 LM head's kernel).
            tokens = self.model.greedy_tokens(sampled)
            if tokens is not None:
                computed = time.perf_counter()
                self.branch_taken = {}
                results = {
                    seq.seq_id: [(t, None)] for (seq, _), t in zip(wanted, tokens.tolist(), strict=True)
                }
                self._record(started, prepared, computed)
                return results
        logits = self.model.compute_logits(sampled)
        computed = time.perf_counter()
        results: dict[int, StepResult] = {}
        offset = 0
        plain: list = []
        plain_rows: list[int] = []
        self.branch_taken = {}
        for seq, _ in wanted:
            if seq.draft_token_ids:
                count = len(seq.draft_token_ids) + 1
                tokens = verify_draft(
                    logits[offset : offset + count], seq.draft_token_ids, rows[seq.seq_id], seq.draft_probs
                )
                if seq.seq_id in self.branch_rows:
                    if tokens[0] == seq.draft_branch:  # greedy: the target's token is the second candidate
                        tokens = [seq.draft_branch, int(logits[offset + count].argmax())]
                        row, scratch_slot, real_slot = self.branch_rows[seq.seq_id]
                        self.kv_cache[:, :, real_slot] = self.kv_cache[:, :, scratch_slot]
                        self.branch_taken[seq.seq_id] = row
                    offset += 1
                results[seq.seq_id] = [(t, None) for t in tokens]
                offset += count
            else:
                plain.append(seq)
                plain_rows.append(offset)
                offset += 1
        if plain:
            token_ids, logprobs = sample(_rows(logits, plain_rows), [rows[s.seq_id] for s in plain])
            for seq, token, logprob in zip(plain, token_ids, logprobs, strict=True):
                results[seq.seq_id] = [(token, logprob)]
        self._record(started, prepared, computed)
        return results

    def _record(self, started: float, prepared: float, computed: float) -> None:
        """Seconds per phase, so benchmarks can show host overhead beside model time."""
        self.phase_seconds["prepare"] += prepared - started
        self.phase_seconds["model"] += computed - prepared
        self.phase_seconds["sample"] += time.perf_counter() - computed


def _is_verification(entry: ScheduledSequence) -> bool:
    """The entry is the sequence's last known token followed by its draft tokens."""
    seq = entry.seq
    drafts = len(seq.draft_token_ids)
    return drafts > 0 and seq.num_computed_tokens == seq.num_tokens - 1 and entry.num_new_tokens == drafts + 1


def _every_row(picked: list[int], count: int) -> bool:
    """picked is rows 0 .. count - 1 in order (an all-decode step)."""
    return len(picked) == count and picked == list(range(count))


def _rows(x: torch.Tensor, picked: list[int]) -> torch.Tensor:
    """x[picked]; when that is every row in order x itself: at batch 64 the copy of the logits alone was
    12.6 MB per step."""
    return x if _every_row(picked, x.shape[0]) else x[torch.tensor(picked)]
