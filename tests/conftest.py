"""Shared fixtures: the real default model, tiny random models of each architecture, and HF references."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.models.loader import LoadedModel, default_model_path, load_model
from tokenmill.sampling import SamplingParams

TINY_VOCAB_TEXT = "tiny"


@pytest.fixture(scope="session")
def smollm_loaded() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="session")
def hf_smollm():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def _tiny_hf_config(arch: str, vocab_size: int):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(arch)


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm_loaded) -> dict[str, tuple[Path, object]]:
    """Random-weight HF models of each architecture saved as safetensors folders, with the SmolLM2
    tokenizer (so text prompts work). Returns arch -> (folder, HF model)."""
    import transformers

    tokenizer = smollm_loaded.tokenizer
    made = {}
    for arch in TINY_ARCHITECTURES:
        torch.manual_seed(zlib.crc32(arch.encode()))  # str hash() changes per process
        config = _tiny_hf_config(arch, tokenizer.vocab_size)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():  # larger than default init so logits are far from ties
            for param in model.parameters():
                param.mul_(4.0 if param.dim() > 1 else 1.0)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        _save_tiny(model, folder, tokenizer)
        made[arch] = (folder, model)
    return made


def _save_tiny(model, folder: Path, tokenizer) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": tokenizer.chat_template,
                "eos_token": "<|im_end|>",
                "bos_token": "<|im_start|>",
            }
        )
    )


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory, smollm_loaded) -> Path:
    """A smaller random llama (1 layer, width 32) with the tiny models' vocabulary: a draft for them."""
    import transformers

    torch.manual_seed(7)
    config = _tiny_hf_config("llama", smollm_loaded.tokenizer.vocab_size)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 32, 64, 1
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0 if param.dim() > 1 else 1.0)
    folder = tmp_path_factory.mktemp("tiny-draft")
    _save_tiny(model, folder, smollm_loaded.tokenizer)
    return folder


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy decode with HF's own forward and KV cache, never stopping early."""
    generated: list[int] = []
    past = None
    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            inputs = torch.tensor([[token]])
    return generated


def make_engine(loaded: LoadedModel, **options) -> LLMEngine:
    options.setdefault("num_threads", 2)
    return LLMEngine(EngineConfig(**options), loaded)


def run_to_completion(engine: LLMEngine, max_steps: int = 100000) -> dict:
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert not engine.has_unfinished_requests(), "engine did not finish its requests"
    return finished


def assert_no_leak(engine: LLMEngine) -> None:
    """Every block is free again; cached prefixes stay in the free list, evictable."""
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.ref_counts)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def mixed_requests(engine, greedy_only: bool = False) -> list[str]:
    """Prompts of different lengths, some repetitive, different max_tokens: a mixed batch."""
    prompts = [[11, 57, 302, 99, 4000, 12] * 6, list(range(50, 90)), [7] * 20, list(range(200, 213)) * 3, [5]]
    for i, prompt in enumerate(prompts):
        engine.add_request(
            str(i), prompt, SamplingParams(temperature=0, max_tokens=20 + 7 * i, ignore_eos=True)
        )
    return [str(i) for i in range(len(prompts))]


def mixed_outputs(engine) -> dict[str, list[int]]:
    ids = mixed_requests(engine)
    done = run_to_completion(engine)
    return {i: done[i].outputs[0].token_ids for i in ids}


@pytest.fixture(scope="module")
def llama_loaded(tiny_models):
    return load_model(str(tiny_models["llama"][0]))


@pytest.fixture(scope="module")
def llama_plain(llama_loaded) -> dict[str, list[int]]:
    """Plain greedy outputs of the mixed batch on the tiny llama: what every speculative run must match."""
    return mixed_outputs(make_engine(llama_loaded))
