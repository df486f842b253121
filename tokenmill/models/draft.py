"""Draft models for speculative decoding: load one, and the file format of a trained draft.

A draft is any Llama-family model sharing the target's vocabulary. `tokenmill draft train` makes one for a
target that has none: a few decoder layers of the target's width, saved alone in a safetensors file. The
embedding table (and the LM head when it is not tied) are the target's and are taken from the target at
load time, so the file stays small; its metadata names the target and the shapes it was trained against.
The draft may score only a subset of the vocabulary (the tokens the target actually writes): its LM head
is then a few thousand rows instead of the whole table, which is most of a small draft's cost.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.errors import IncompatibleDraftError, ModelLoadError
from tokenmill.layers.linear import DenseLinear, make_linear
from tokenmill.models.eagle import EAGLE_FC_BIAS, EAGLE_FC_WEIGHT, EagleDraft
from tokenmill.models.llama import LlamaModel
from tokenmill.models.loader import LAYER_WEIGHT_NAMES, LoadedModel, load_model

DRAFT_FORMAT = "tokenmill-draft-1"
HEAD_TOKENS = "draft.head_token_ids"  # int64 [n]: vocabulary ids the draft's LM head scores
LAYER_NAMES = LAYER_WEIGHT_NAMES  # the tensors of each draft layer, as in a target layer


@dataclass(slots=True)
class DraftFileInfo:
    """What a trained draft file says about itself (its safetensors metadata)."""

    target: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    source_layers: list[int]
    extra: dict
    kind: str = "layers"  # "layers": decoder layers over the tokens; "eagle": one layer over target states

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": DRAFT_FORMAT,
            "target": self.target,
            "vocab_size": str(self.vocab_size),
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "source_layers": json.dumps(self.source_layers),
            "extra": json.dumps(self.extra),
            "kind": self.kind,
        }


@dataclass
class DraftModel:
    """A Llama-family model used as a proposer; `head_token_ids` maps its logit columns to token ids
    (None: the columns are the whole vocabulary)."""

    model: LlamaModel
    head_token_ids: torch.Tensor | None
    name: str


def save_draft_file(path: Path, weights: dict[str, torch.Tensor], info: DraftFileInfo) -> None:
    """Write the draft's own tensors (layers, final norm, head token ids) and its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous() for name, t in weights.items()}
    save_file(tensors, str(path), metadata=info.to_metadata())


def read_draft_file(path: Path) -> tuple[DraftFileInfo, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != DRAFT_FORMAT:
                raise ModelLoadError(
                    f"{path} is not a tokenmill draft file (no '{DRAFT_FORMAT}' metadata); give a file made "
                    "by `tokenmill draft train`, or a model folder / GGUF"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    info = DraftFileInfo(
        target=meta.get("target", "?"),
        vocab_size=int(meta["vocab_size"]),
        hidden_size=int(meta["hidden_size"]),
        num_layers=int(meta["num_layers"]),
        source_layers=json.loads(meta.get("source_layers", "[]")),
        extra=json.loads(meta.get("extra", "{}")),
        kind=meta.get("kind", "layers"),
    )
    return info, tensors


def draft_model_config(target: ModelConfig, num_layers: int, name: str) -> ModelConfig:
    """A trained draft has the target's shape except its depth."""
    return dataclasses.replace(target, num_layers=num_layers, name=name)


def load_draft(
    path: str,
    target: LoadedModel,
    max_positions: int,
    dtype: torch.dtype,
    quantization: str | None = None,
) -> DraftModel | EagleDraft:
    """A draft for `target`: a `tokenmill draft train` file, or a model folder / GGUF with its vocabulary.
    `quantization` applies to an EAGLE draft's matmuls; the other drafts keep `dtype`."""
    file = Path(path).expanduser()
    if file.suffix == ".safetensors":
        if not file.is_file():
            raise ModelLoadError(f"draft file {str(file)!r} not found")
        return _load_trained_draft(file, target, max_positions, dtype, quantization)
    loaded = load_model(path, dtype)
    _check_vocabulary(loaded, target)
    model = LlamaModel(loaded.config, loaded.weights, max_positions)
    return DraftModel(model, None, loaded.config.name)


def _load_trained_draft(
    file: Path, target: LoadedModel, max_positions: int, dtype: torch.dtype, quantization: str | None
) -> DraftModel | EagleDraft:
    info, tensors = read_draft_file(file)
    cfg = target.config
    if (info.vocab_size, info.hidden_size) != (cfg.vocab_size, cfg.hidden_size):
        raise IncompatibleDraftError(
            f"draft {file} was trained for {info.target} (vocab {info.vocab_size}, "
            f"hidden {info.hidden_size}) but the target {cfg.name} has vocab {cfg.vocab_size}, "
            f"hidden {cfg.hidden_size}"
        )
    eagle = info.kind == "eagle"
    if info.kind not in ("layers", "eagle"):
        raise ModelLoadError(f"draft {file}: unknown draft kind {info.kind!r} (a newer tokenmill's file?)")
    needed = [f"model.layers.{i}.{n}" for i in range(info.num_layers) for n in LAYER_NAMES]
    needed += [EAGLE_FC_WEIGHT, EAGLE_FC_BIAS] if eagle else []
    missing = [name for name in [*needed, "model.norm.weight"] if name not in tensors]
    if missing:
        raise ModelLoadError(f"draft {file}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    weights = {name: t.to(dtype) for name, t in tensors.items() if name != HEAD_TOKENS}
    weights["model.embed_tokens.weight"] = target.weights["model.embed_tokens.weight"]
    if not cfg.tie_word_embeddings:
        weights["lm_head.weight"] = target.weights["lm_head.weight"]
    config = draft_model_config(cfg, info.num_layers, file.stem)
    head_ids = tensors.get(HEAD_TOKENS)
    if head_ids is not None:
        head_ids = head_ids.long()
        if head_ids.numel() == 0 or int(head_ids.max()) >= cfg.vocab_size or int(head_ids.min()) < 0:
            raise IncompatibleDraftError(f"draft {file}: head token ids fall outside the target's vocabulary")
    if not eagle:
        model = LlamaModel(config, weights, max_positions)
        if head_ids is not None:
            model.lm_head = DenseLinear(model.lm_head.weight.index_select(0, head_ids).contiguous())
        return DraftModel(model, head_ids, file.stem)
    model = LlamaModel(config, weights, max_positions, quantization)
    if head_ids is not None:
        head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        model.lm_head = make_linear(head.index_select(0, head_ids).contiguous(), None, quantization)
    fc = make_linear(weights[EAGLE_FC_WEIGHT], weights[EAGLE_FC_BIAS], quantization)
    return EagleDraft(model, fc, head_ids, file.stem)


def _check_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Same vocabulary size and the same ids for a probe text, or the draft's guesses mean nothing."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise IncompatibleDraftError(
            f"draft {draft.path} has vocabulary size {draft.config.vocab_size} but the target has "
            f"{target.config.vocab_size}; a draft must share the target's tokenizer"
        )
    probe = "Speculative decoding: the quick brown fox, 1234!"
    if draft.tokenizer.encode(probe, False) != target.tokenizer.encode(probe, False):
        raise IncompatibleDraftError(
            f"draft {draft.path} tokenizes text differently from the target; it must share its tokenizer"
        )
