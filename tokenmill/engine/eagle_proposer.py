"""EAGLE proposer: guesses from the target's own hidden states with a one-layer draft (models/eagle.py).

After every target step the engine hands over the verified hidden states (`observe`). When asked for
guesses, the draft first catches up: for each verified position i it has not seen, it reads the target's
state at i with token i + 1, writing its own K/V (one small forward for all of them). The output at the last
such position is its guess of the target's next state, hence the first guessed token; each further guess
feeds the guessed state back in. Guessed positions' K/V are simply overwritten by the next catch-up, so a
rejection needs no rollback. A gap in the observed states (a prefix-cache hit, a fork, speculation paused at
large batches) restarts the draft's context at the next state it does see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.engine.draft_proposer import pick_guesses
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.speculative import DraftProposal, Proposer
from tokenmill.models.eagle import EagleCache, EagleDraft


@dataclass
class _Track:
    """One sequence's draft state: its cache holds true-state K/V for positions [cache.base, filled);
    `states` are the observed target states for positions [filled, filled + len(states))."""

    cache: EagleCache
    filled: int
    states: list[torch.Tensor] = field(default_factory=list)

    @property
    def observed_end(self) -> int:
        return self.filled + sum(s.shape[0] for s in self.states)


class EagleProposer(Proposer):
    wants_hidden_states = True

    def __init__(self, draft: EagleDraft, vocab_size: int, branch: bool = True) -> None:
        self.draft = draft
        self.vocab_size = vocab_size
        self.branch = branch
        self.tracks: dict[int, _Track] = {}

    def release(self, seq: Sequence) -> None:
        self.tracks.pop(seq.seq_id, None)

    def observe(self, seq: Sequence, start: int, hidden: torch.Tensor) -> None:
        track = self.tracks.get(seq.seq_id)
        if track is None or start != track.observed_end:
            track = _Track(EagleCache(start), start)
            self.tracks[seq.seq_id] = track
        track.states.append(hidden.clone())

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[DraftProposal]:
        proposals = []
        for seq, k in zip(seqs, num_tokens, strict=True):
            track = self.tracks.get(seq.seq_id)
            # States must reach the last computed position (num_tokens - 2): the token after it is known.
            if track is None or k < 1 or track.observed_end != seq.num_tokens - 1 or not track.states:
                proposals.append(DraftProposal([]))
                continue
            proposals.append(self._guess(seq, track, k))
        return proposals

    def _guess(self, seq: Sequence, track: _Track, k: int) -> DraftProposal:
        draft = self.draft
        states = torch.cat(track.states) if len(track.states) > 1 else track.states[0]
        start = track.filled
        next_ids = torch.tensor(seq.token_ids[start + 1 : start + 1 + states.shape[0]])
        hidden = draft.extend(track.cache, states, next_ids, start)[-1:]
        track.filled, track.states = start + states.shape[0], []
        position = track.filled  # the guessed state's position: the sequence's last token
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        branch = None
        for step in range(k):
            logits = draft.logits(hidden)
            guess, dist = pick_guesses(logits, [seq], draft.head_token_ids, self.vocab_size)
            tokens.append(guess[0])
            if step == 0 and self.branch and seq.params.greedy and logits.shape[-1] > 1:
                column = logits[0].topk(2).indices[1]
                branch = int(draft.head_token_ids[column] if draft.head_token_ids is not None else column)
                branch = None if branch == guess[0] else branch  # a tie can put the argmax second
            if dist[0] is not None:
                dists.append(dist[0])
            if step + 1 < k:
                hidden = draft.extend(track.cache, hidden, torch.tensor(guess), position + step)
        return DraftProposal(tokens, torch.stack(dists) if dists else None, branch)
