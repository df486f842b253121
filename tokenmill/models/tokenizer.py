"""Tokenizer, chat template and incremental detokenisation, built from a HF folder or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.errors import InvalidParameterError, ModelLoadError

# llama.cpp's pre-tokenizer names -> the split regex they stand for (GPT-2's is ByteLevel's own default).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_STYLE_PRE = ("default", "gpt2", "smollm", "gpt-2")

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@dataclass
class Tokenizer:
    """What the engine needs from a tokenizer: encode, decode, special ids and the chat template."""

    backend: BackendTokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own Jinja template, the way HF transformers does."""
        if not self.chat_template:
            raise InvalidParameterError("this model has no chat template; use a plain prompt", "messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
        ):
            raise InvalidParameterError(
                "messages must be a list of {'role': str, 'content': str} objects", "messages"
            )
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidParameterError(f"chat template failed: {exc}", "messages") from exc


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_ids: list[int], final: bool = False) -> str:
        prefix = self._tokenizer.decode(token_ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tokenizer.decode(token_ids[self._prefix_offset :], self._skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset = self._read_offset
            self._read_offset = len(token_ids)
            return full[len(prefix) :]
        return ""


def tokenizer_from_hf_folder(folder: Path, eos_token_ids: tuple[int, ...]) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no tokenizer.json (needed beside config.json)")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises bare Exceptions on bad JSON
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        special[key] = value or ""
    bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
    eos_ids = set(eos_token_ids)
    if special["eos_token"] and backend.token_to_id(special["eos_token"]) is not None:
        eos_ids.add(backend.token_to_id(special["eos_token"]))
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(sorted(eos_ids)),
        bos_token_id=bos_id,
        add_bos_token=bool(config.get("add_bos_token", False)),
        chat_template=template,
        special_tokens=special,
    )


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build a byte-level BPE tokenizer from the tokenizer.ggml.* fields llama.cpp writes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2', is)"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _PRE_TOKENIZER_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _GPT2_STYLE_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported")
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    added = [
        AddedToken(tokens[i], special=(t == _TOKEN_TYPE_CONTROL), normalized=False)
        for i, t in enumerate(types)
        if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    backend.add_special_tokens([a for a in added if a.special])
    backend.add_tokens([a for a in added if not a.special])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = {eos} if eos is not None else set()
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        eos_ids.add(meta["tokenizer.ggml.eot_token_id"])
    special = {
        "bos_token": tokens[bos] if bos is not None else "",
        "eos_token": tokens[eos] if eos is not None else "",
    }
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(sorted(eos_ids)),
        bos_token_id=bos,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens=special,
    )
