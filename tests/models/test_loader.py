import json
import shutil

import pytest
import torch

from tokenmill.errors import ModelLoadError, UnsupportedArchitectureError
from tokenmill.layers.attention import AttentionContext, PrefillSpan
from tokenmill.models.llama import LlamaModel
from tokenmill.models.loader import default_model_path, load_model

SAMPLE_TEXTS = [
    "Hello world! 12345 how are you?",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "naïve café — ünïcödé 日本語 😀",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # comment",
]


def _logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    kv = torch.zeros(cfg.num_layers, 2, len(ids), cfg.num_kv_heads, cfg.head_dim)
    ctx = AttentionContext(slot_mapping=torch.arange(len(ids)), prefills=[PrefillSpan(0, len(ids))])
    hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), ctx, kv)
    return model.compute_logits(hidden)


def test_default_model_is_found_without_a_path(smollm_loaded):
    assert smollm_loaded.path == default_model_path()
    cfg = smollm_loaded.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("llama", 30, 576, 3)
    assert cfg.tie_word_embeddings


def test_gguf_tokenizer_matches_transformers(smollm_loaded):
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in SAMPLE_TEXTS:
        ours = smollm_loaded.tokenizer.encode(text)
        assert ours == reference(text)["input_ids"], text
        assert smollm_loaded.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_chat_template_renders_like_transformers(smollm_loaded):
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm_loaded.tokenizer.apply_chat_template(messages) == expected


def test_smollm_logits_match_transformers(smollm_loaded, hf_smollm):
    ids = smollm_loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    ours = _logits(LlamaModel(smollm_loaded.config, smollm_loaded.weights, 256), ids)
    with torch.no_grad():
        reference = hf_smollm(torch.tensor([ids])).logits[0]
    assert (ours - reference).abs().max().item() < 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_architecture_logits_match_transformers(tiny_models, arch):
    folder, reference_model = tiny_models[arch]
    loaded = load_model(str(folder))
    assert loaded.config.architecture == arch
    ids = list(range(5, 60))
    ours = _logits(LlamaModel(loaded.config, loaded.weights, 256), ids)
    with torch.no_grad():
        reference = reference_model(torch.tensor([ids])).logits[0]
    assert (ours - reference).abs().max().item() < 1e-3


def test_unknown_model_path_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))


def test_truncated_gguf_is_a_typed_error(tmp_path):
    source = default_model_path()
    broken = tmp_path / "broken.gguf"
    with open(source, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(source.stat().st_size // 3))
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        load_model(str(broken))


def test_garbage_gguf_is_a_typed_error(tmp_path):
    broken = tmp_path / "garbage.gguf"
    broken.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError):
        load_model(str(broken))


def test_unsupported_architecture_is_named(tiny_models, tmp_path):
    folder, _ = tiny_models["llama"]
    copy = tmp_path / "gpt2-like"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_model(str(copy))


def test_truncated_safetensors_is_a_typed_error(tiny_models, tmp_path):
    folder, _ = tiny_models["qwen2"]
    copy = tmp_path / "cut"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(copy))
