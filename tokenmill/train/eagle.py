"""Training an EAGLE-style draft (train/eagle_network.py) on the target's hidden states over its own answers.

Data: one target prefill over each answer gives its hidden states (train/features.py); the label of every
position is the target's argmax there among the draft's head tokens, so sampled answers (more varied text
than greedy ones) still teach the draft the target's greedy choice. Loss per pass: smooth-L1 between the
guessed and the true hidden state (so guesses stay good inputs for the next guess) plus cross-entropy
against the target's token (what acceptance counts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.config import ModelConfig
from tokenmill.models.llama import LlamaModel
from tokenmill.train.eagle_network import EagleNetwork
from tokenmill.train.features import sample_features
from tokenmill.train.samples import Sample

CLASSIFICATION_WEIGHT = 0.5  # cross-entropy beside the state regression (EAGLE used 0.1; 0.5 measured better)
PASS_DECAY = 0.8  # weight of pass d is PASS_DECAY ** (d - 1): later guesses matter less


class EagleTrainer:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        samples: list[Sample],
        head_token_ids: torch.Tensor | None,
        max_length: int,
        depth: int,
        source_layer: int,
    ) -> None:
        self.config = config
        self.depth = depth
        self.samples = samples
        self.network = EagleNetwork(config, weights, source_layer, head_token_ids, max_length + 1)
        target = LlamaModel(config, weights, max_length + 1)
        # fp16 halves the memory of ~600k states; they are rounded once, the draft sees them in fp32.
        self.states = [s.half() for s in sample_features(target, samples, max_length)]
        self.ids = [torch.tensor(s.token_ids(max_length)) for s in samples]
        with torch.no_grad():
            self.labels = [self.network.logits(s.float()).argmax(-1) for s in self.states]

    def parameters(self):
        return self.network.parameters()

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, int, int]:
        """Loss over a batch of samples, and how many first guesses matched the target (of how many)."""
        features, next_ids, targets, labels, valid = self._batch(indices)
        outputs = self.network(features, next_ids, self.depth)
        total = torch.zeros(())
        agree = count = 0
        for d, out in enumerate(outputs, start=1):
            rows = valid.clone()
            rows[:, : d - 1] = False  # rows before d - 1 have no chain of d guesses behind them
            regression = F.smooth_l1_loss(out[rows], targets[rows])
            logits = self.network.logits(out[rows])
            classification = F.cross_entropy(logits, labels[rows])
            total = total + PASS_DECAY ** (d - 1) * (regression + CLASSIFICATION_WEIGHT * classification)
            if d == 1:
                agree, count = int((logits.argmax(-1) == labels[rows]).sum()), int(rows.sum())
        return total, agree, count

    @torch.no_grad()
    def agreement(self, indices: list[int], batch_size: int) -> list[float]:
        """Per guess depth: share of answer positions where the guess is the target's token."""
        hits = [0] * self.depth
        totals = [0] * self.depth
        for i in range(0, len(indices), batch_size):
            chunk = indices[i : i + batch_size]
            features, next_ids, _, labels, valid = self._batch(chunk, answers_only=True)
            for d, out in enumerate(self.network(features, next_ids, self.depth), start=1):
                rows = valid.clone()
                rows[:, : d - 1] = False
                hits[d - 1] += int((self.network.logits(out[rows]).argmax(-1) == labels[rows]).sum())
                totals[d - 1] += int(rows.sum())
        return [h / max(1, t) for h, t in zip(hits, totals, strict=True)]

    def _batch(self, indices: list[int], answers_only: bool = False) -> tuple[torch.Tensor, ...]:
        """Right-padded rows: row r of a sample reads state r and token r + 1 and should produce state
        r + 1, whose target token is labels[r + 1]."""
        width = max(self.ids[i].shape[0] for i in indices) - 1
        hidden = self.config.hidden_size
        features = torch.zeros(len(indices), width, hidden)
        targets = torch.zeros(len(indices), width, hidden)
        next_ids = torch.zeros(len(indices), width, dtype=torch.long)
        labels = torch.zeros(len(indices), width, dtype=torch.long)
        valid = torch.zeros(len(indices), width, dtype=torch.bool)
        for b, i in enumerate(indices):
            n = self.ids[i].shape[0] - 1
            states = self.states[i].float()
            features[b, :n] = states[:n]
            targets[b, :n] = states[1 : n + 1]
            next_ids[b, :n] = self.ids[i][1 : n + 1]
            labels[b, :n] = self.labels[i][1 : n + 1]
            first = len(self.samples[i].prompt_ids) - 1 if answers_only else 0
            valid[b, max(0, first) : n] = True
        return features, next_ids, targets, labels, valid

    def export(self) -> dict[str, torch.Tensor]:
        return self.network.export()
