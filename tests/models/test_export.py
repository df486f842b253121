"""Exported HF folders: what vLLM (and HF transformers) load must be tokenmill's exact model."""

import pytest
import torch

from tests.conftest import hf_greedy, make_engine, run_to_completion
from tokenmill.models.export import export_hf_folder
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams


def test_exported_tiny_model_greedy_tokens_match_tokenmill(tiny_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    loaded = load_model(str(tiny_models["llama"][0]))
    folder = export_hf_folder(loaded, tmp_path / "export")

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "The quick brown fox jumps over"
    prompt = loaded.tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == prompt
    messages = [{"role": "user", "content": "Hi there"}]
    expected_chat = loaded.tokenizer.apply_chat_template(messages)
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected_chat
    )

    engine = make_engine(loaded)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    ours = run_to_completion(engine)["r"].outputs[0].token_ids
    assert list(ours) == hf_greedy(hf, prompt, 12)


def test_exported_gguf_keeps_hf_layout_of_q_and_k(smollm_loaded, hf_smollm, tmp_path):
    """The GGUF's Q/K rows are permuted by llama.cpp; the export must match HF's own GGUF reader."""
    transformers = pytest.importorskip("transformers")
    folder = export_hf_folder(smollm_loaded, tmp_path / "smollm")
    assert not (folder / "model.safetensors").stat().st_size < 500e6  # fp32, tied head not duplicated
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([smollm_loaded.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ours, reference = exported(ids).logits, hf_smollm(ids).logits
    assert (ours - reference).abs().max().item() < 1e-3
