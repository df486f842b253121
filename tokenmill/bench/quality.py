"""What quantisation costs in quality: perplexity on a shipped text and greedy agreement with fp32.

Perplexity runs the model over non-overlapping windows of the text (each window a fresh prefill, so every
token is scored with up to `window - 1` tokens of context), the way llama.cpp's `perplexity` tool does. A
format with a narrower KV cache (+kv16, +kv8) prefills each window in chunks that read the earlier tokens
back from that cache, so its perplexity includes what the cache's rounding costs.
"""

from __future__ import annotations

import math
import time
from importlib import resources

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tokenmill.bench.workloads import chat_messages, grounded_messages
from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.layers.attention import AttentionContext, PrefillSpan, kv_row_width
from tokenmill.models.llama import LlamaModel
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.sampling import SamplingParams

FORMATS = ("fp32", "int8", "int4")
# A format name's suffix: the same weights over a float16 or an int8 KV cache.
KV_SUFFIXES = {"+kv16": "float16", "+kv8": "int8"}
# Formats with a narrower KV cache score their windows in prefill chunks of this many tokens (perplexity).
KV_CHUNK = 64


def format_options(name: str) -> dict:
    """EngineConfig options of a format name: fp32 (or none), int8, int4, each optionally +kv16 or +kv8."""
    weights, kv_dtype = name, "auto"
    for suffix, dtype in KV_SUFFIXES.items():
        if name.endswith(suffix):
            weights, kv_dtype = name.removesuffix(suffix), dtype
    return {"quantization": None if weights in ("none", "fp32") else weights, "kv_cache_dtype": kv_dtype}


def perplexity_text() -> str:
    """~28k SmolLM2 tokens of English technical prose (the Python Language Reference), shipped with us."""
    text = resources.files("tokenmill.bench").joinpath("data/perplexity.txt").read_text()
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("# "))


@torch.inference_mode()
def perplexity(
    model: LlamaModel,
    token_ids: list[int],
    window: int = 512,
    progress: bool = False,
    kv_dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each window.

    With `chunk`, each window goes in prefill chunks of that many tokens, every chunk after the first reading
    the earlier ones back from a KV cache of `kv_dtype`, as a served sequence's later tokens do: the way to
    see what a narrower cache costs (a whole-window prefill attends its own fresh fp32 K/V)."""
    cfg = model.config
    kv_cache = torch.zeros(
        cfg.num_layers, 2, window, cfg.num_kv_heads, kv_row_width(cfg.head_dim, kv_dtype), dtype=kv_dtype
    )
    total_nll = 0.0
    scored = 0
    starts = range(0, len(token_ids) - 1, window)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        ids = torch.tensor(token_ids[start : start + window])
        length = ids.shape[0]
        if length < 2:
            break
        hidden = []
        step = chunk or length
        for first in range(0, length, step):
            last = min(length, first + step)
            span = PrefillSpan(0, last - first)
            if first > 0:
                span.gather = torch.arange(last)
                span.mask = torch.arange(last).unsqueeze(0) <= torch.arange(first, last).unsqueeze(1)
            ctx = AttentionContext(slot_mapping=torch.arange(first, last), prefills=[span])
            hidden.append(model.forward(ids[first:last], torch.arange(first, last), ctx, kv_cache))
        logits = model.compute_logits(torch.cat(hidden)[:-1])
        total_nll += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
        scored += length - 1
    return math.exp(total_nll / scored)


def agreement_prompts(engine: LLMEngine, num: int) -> list[list[int]]:
    """The shipped chat and grounded conversations, then openings of the text's paragraphs, up to `num`."""
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template(c)) for c in chat_messages() + grounded_messages()
    ]
    paragraphs = [p for p in perplexity_text().split("\n\n") if len(p) > 200]
    step = max(1, len(paragraphs) // num)
    for paragraph in paragraphs[::step]:
        if len(prompts) >= num:
            break
        prompts.append(tokenizer.encode(paragraph[:300]))
    return prompts[:num]


def greedy_outputs(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"quality-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
    return [done[i] for i in ids]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Share of prompts with identical greedy output, and mean share of tokens before the first mismatch."""
    prefixes = []
    for ref, cand in zip(reference, candidate, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(ref, cand, strict=False)) if a != b), min(len(ref), len(cand))
        )
        prefixes.append(same / max(1, len(ref)))
    return {
        "identical": sum(ref == cand for ref, cand in zip(reference, candidate, strict=True))
        / len(reference),
        "mean_matching_prefix": sum(prefixes) / len(prefixes),
    }


def run_quality(
    model: str | None,
    formats: tuple[str, ...] = FORMATS,
    max_text_tokens: int | None = None,
    num_prompts: int = 50,
    max_tokens: int = 32,
    threads: int | None = None,
    group_size: int = 32,
    loaded: LoadedModel | None = None,
) -> dict:
    loaded = loaded or load_model(model)
    token_ids = loaded.tokenizer.encode(perplexity_text())[:max_text_tokens]
    rows = {}
    reference_outputs = None
    for name in formats:
        config = EngineConfig(
            model=model, num_threads=threads, quantization_group_size=group_size, **format_options(name)
        )
        engine = LLMEngine(config, loaded)
        started = time.perf_counter()
        kv_dtype = engine.runner.kv_cache.dtype
        chunk = KV_CHUNK if kv_dtype != torch.float32 else None  # a narrower cache only counts when read back
        ppl = perplexity(engine.model, token_ids, progress=True, kv_dtype=kv_dtype, chunk=chunk)
        prompts = agreement_prompts(engine, num_prompts)
        outputs = greedy_outputs(engine, prompts, max_tokens)
        reference_outputs = reference_outputs or outputs
        rows[name] = {
            "perplexity": ppl,
            "weight_bytes": engine.model.weight_bytes,
            **agreement(reference_outputs, outputs),
            "seconds": time.perf_counter() - started,
        }
    base = rows[formats[0]]["perplexity"]
    for row in rows.values():
        row["perplexity_vs_first"] = row["perplexity"] / base - 1.0
    return {
        "model": loaded.config.name,
        "text_tokens": len(token_ids),
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "group_size": group_size,
        "formats": rows,
    }


def markdown_report(result: dict) -> str:
    first = next(iter(result["formats"]))
    lines = [
        f"Quality of {result['model']}: perplexity over {result['text_tokens']} tokens of the shipped "
        f"text; greedy agreement with {first} over {result['num_prompts']} prompts x "
        f"{result['max_tokens']} tokens.",
        "",
        f"| weights | weight MB/step | perplexity | vs {first} | identical outputs | matching prefix |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["formats"].items():
        lines.append(
            f"| {name} | {row['weight_bytes'] / 1e6:.0f} | {row['perplexity']:.3f} | "
            f"{row['perplexity_vs_first'] * 100:+.2f}% | {row['identical'] * 100:.0f}% | "
            f"{row['mean_matching_prefix'] * 100:.0f}% |"
        )
    return "\n".join(lines) + "\n"
