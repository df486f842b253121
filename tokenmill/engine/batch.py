"""What one engine step computes: which sequences, how many new tokens each, which blocks to copy.

Shared by the scheduler (which fills it) and the runner (which executes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_known_tokens(self) -> bool:
        """True when this chunk reaches the sequence's last token (and any drafts after it), so the step
        samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens >= self.seq.num_tokens


@dataclass(slots=True)
class ScheduledBatch:
    entries: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)
