"""Continuous batching: every step, running sequences first, then waiting ones, under a token budget.

Prefill and decode share a step; a long prompt is cut into chunks that fit the budget. When the KV pool
runs dry the newest running sequence is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

import time
from collections import deque

from tokenmill.config import EngineConfig
from tokenmill.engine.batch import ScheduledBatch, ScheduledSequence
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            known = seq.num_tokens - seq.num_computed_tokens
            num_new = min(known + len(seq.draft_token_ids), budget)
            del seq.draft_token_ids[max(0, num_new - known) :]  # drafts beyond the budget are dropped
            copies = self.block_manager.allocate_slots(seq, num_new)
            if copies is None and seq.draft_token_ids:  # drop guesses before preempting anyone
                seq.draft_token_ids.clear()
                num_new = min(known, budget)
                copies = self.block_manager.allocate_slots(seq, num_new)
            while copies is None:
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.block_manager.allocate_slots(seq, num_new)
            if copies is None:
                break
            batch.entries.append(ScheduledSequence(seq, num_new))
            batch.block_copies.extend(copies)
            budget -= num_new
            index += 1
        if batch.preempted:
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0:
                self.block_manager.acquire_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            copies = self.block_manager.allocate_slots(seq, num_new)
            if copies is None:
                self._undo_prefix(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            batch.entries.append(ScheduledSequence(seq, num_new))
            batch.block_copies.extend(copies)
            budget -= num_new
        return batch

    def _undo_prefix(self, seq: Sequence) -> None:
        """A waiting sequence that could not be admitted gives back any cached blocks it took."""
        if seq.block_table and seq.num_computed_tokens == seq.num_cached_tokens:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.block_hashes = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
