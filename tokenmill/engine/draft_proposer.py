"""Draft-model proposer: a small model with its own paged KV cache guesses k tokens per sequence.

Each sequence has a shadow in the draft's cache (its own block table and computed count). Every step the
shadow is first rolled back to the tokens the target kept, then catches up on the tokens it has not seen
(the last step's accepted guesses and the target's own token) in the same pass that proposes the first
guess; k - 1 more one-token passes propose the rest. Each pass runs the whole batch of speculating
sequences at once, so drafting costs k small forwards per step, not k per sequence.

Greedy requests get the draft's argmax. Sampled requests draw from the draft's distribution under the
request's own temperature / top-k / top-p, and hand that distribution (q) to the verifier, whose rejection
rule then keeps the target's distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.batch import ScheduledSequence
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.runner import ModelRunner
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.speculative import DraftProposal, Proposer
from tokenmill.layers.sampler import SamplingRow, sampling_probabilities
from tokenmill.models.draft import DraftModel


@dataclass
class _Shadow:
    """The draft's view of one target sequence: token_ids holds what its KV was computed from (the
    target's tokens, then the draft's own guesses); the first `known` of them are confirmed tokens."""

    seq: Sequence
    known: int = 0


class DraftModelProposer(Proposer):
    def __init__(
        self, draft: DraftModel, engine_config: EngineConfig, num_blocks: int, vocab_size: int
    ) -> None:
        dtype = draft.model.embed.dtype
        self.draft = draft
        self.vocab_size = vocab_size
        self.runner = ModelRunner(draft.model, engine_config, num_blocks, dtype)
        self.block_manager = BlockManager(num_blocks, engine_config.block_size, enable_prefix_caching=False)
        self.shadows: dict[int, _Shadow] = {}

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow.seq)

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[DraftProposal]:
        proposals = [DraftProposal([]) for _ in seqs]
        active: list[tuple[int, _Shadow, int]] = []  # (index in seqs, shadow, tokens to guess)
        first: list[ScheduledSequence] = []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens, strict=True)):
            shadow = self._catch_up(seq)
            pending = shadow.seq.num_tokens - shadow.seq.num_computed_tokens
            if k < 1 or self.block_manager.allocate_slots(shadow.seq, pending + k - 1) is None:
                continue  # the draft's pool is full: this sequence goes without guesses this step
            active.append((i, shadow, k))
            first.append(ScheduledSequence(shadow.seq, pending))
        if not active:
            return proposals
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in active}
        entries = first
        for step in range(max(k for _, _, k in active)):
            if step:
                entries = [ScheduledSequence(s.seq, 1) for _, s, k in active if k > step]
            running = [(i, s) for i, s, k in active if k > step]
            tokens, dists = self._guess(entries, [seqs[i] for i, _ in running])
            for (i, shadow), entry, token, dist in zip(running, entries, tokens, dists, strict=True):
                shadow.seq.num_computed_tokens += entry.num_new_tokens
                shadow.seq.token_ids.append(token)
                proposals[i].token_ids.append(token)
                if dist is not None:
                    probs[i].append(dist)
        for i, _, _ in active:
            if probs[i]:
                proposals[i].probs = torch.stack(probs[i])
        return proposals

    def _catch_up(self, seq: Sequence) -> _Shadow:
        """Roll the shadow back to the longest prefix it shares with the target's tokens, then give it the
        target's tokens; the KV of everything past that prefix is recomputed."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = _Shadow(Sequence(seq.request_id, seq.index, [], seq.params, token_ids=[]))
            self.shadows[seq.seq_id] = shadow
        draft_seq, tokens = shadow.seq, seq.token_ids
        same = min(shadow.known, len(tokens))
        limit = min(draft_seq.num_computed_tokens, len(tokens))
        while same < limit and draft_seq.token_ids[same] == tokens[same]:
            same += 1
        draft_seq.num_computed_tokens = min(draft_seq.num_computed_tokens, same, len(tokens) - 1)
        self.block_manager.trim(draft_seq)
        draft_seq.token_ids = list(tokens)
        shadow.known = len(tokens)
        return shadow

    def _guess(
        self, entries: list[ScheduledSequence], seqs: list[Sequence]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """One draft forward over the entries; a guess from the last position of each."""
        input_ids, positions, ctx, ranges = self.runner.prepare(entries)
        model = self.draft.model
        hidden = model.forward(input_ids, positions, ctx, self.runner.kv_cache)
        logits = model.compute_logits(hidden[torch.tensor([end - 1 for _, end in ranges])])
        return pick_guesses(logits, seqs, self.draft.head_token_ids, self.vocab_size)


def pick_guesses(
    logits: torch.Tensor, seqs: list[Sequence], head_ids: torch.Tensor | None, vocab_size: int
) -> tuple[list[int], list[torch.Tensor | None]]:
    """One guess per row of the draft's logits. Greedy rows take the argmax; sampled rows draw from the
    draft's distribution under the request's temperature / top-k / top-p and also return it (over the
    whole vocabulary) for the rejection rule. `head_ids` maps logit columns to token ids."""
    columns = logits.argmax(dim=-1)
    dists: list[torch.Tensor | None] = [None] * len(seqs)
    sampled = [j for j, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = [SamplingRow(seqs[j].params, seqs[j].generator, [], [], []) for j in sampled]
        q = sampling_probabilities(logits[torch.tensor(sampled)].float(), rows)
        for row, j in enumerate(sampled):
            noise = torch.empty_like(q[row]).exponential_(generator=seqs[j].generator)
            columns[j] = (q[row] / noise).argmax()
            full = q[row]
            if head_ids is not None:
                full = torch.zeros(vocab_size, dtype=q.dtype).index_copy_(0, head_ids, q[row])
            dists[j] = full
    token_ids = (head_ids[columns] if head_ids is not None else columns).tolist()
    return token_ids, dists
