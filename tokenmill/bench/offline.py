"""Offline throughput: the same random-token workload through tokenmill and its peers, in one process.

Numbers are only compared within one run (same machine state); every peer that cannot run is reported
with the reason instead of being skipped silently.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenmill.bench.quality import format_options
from tokenmill.bench.workloads import chat_prompts, random_token_prompts, shared_prefix_prompts
from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError
from tokenmill.kernels import kernel_build
from tokenmill.llm import LLM
from tokenmill.models.loader import resolve_model_path
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams


@dataclass
class BenchResult:
    system: str
    scenario: str
    requests: int
    output_tokens: int
    seconds: float
    note: str = ""
    extra: dict = field(default_factory=dict)
    # 1-minute load average when the result was taken: on a shared 2-core box, the evidence of how quiet
    # the machine was (anything above ~2 means another process competed for the cores).
    loadavg: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def bench_tokenmill(
    llm: LLM, prompts: list[list[int]], output_len: int, scenario: str, temperature: float = 0.0
) -> BenchResult:
    """temperature 0: greedy; above: plain temperature sampling (no top-k/top-p), as the peers get."""
    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up
    phases = llm.engine.stats.phase_seconds
    before = dict(phases)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    split = {name: value - before.get(name, 0.0) for name, value in phases.items()}
    host = sum(value for name, value in split.items() if name != "model")
    note = (
        f"host overhead {host / seconds:.1%} of wall time (model {split.get('model', 0.0) / seconds:.1%}); "
        f"kernels {kernel_build()}"
    )
    return BenchResult(
        "tokenmill", scenario, len(prompts), tokens, seconds, note=note, extra={"phases": split}
    )


def single_stream_decode(
    engine: LLMEngine, prompt: str | list[int], params: SamplingParams
) -> tuple[int, float, RequestOutput]:
    """Run one request alone; returns (tokens after the first, seconds after the first token, output),
    so prefill is not counted. Speculative steps may add several tokens at once: tokens are counted."""
    engine.add_request(f"decode-probe-{time.monotonic_ns()}", prompt, params)
    first, first_tokens, final = None, 0, None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if first is None:
                first, first_tokens = time.perf_counter(), output.num_output_tokens
            final = output
    return final.num_output_tokens - first_tokens, time.perf_counter() - first, final


def bench_tokenmill_decode(llm: LLM, prompt: list[int], output_len: int) -> BenchResult:
    """Single-stream decode speed, greedy, ignore_eos."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    tokens, seconds, _ = single_stream_decode(llm.engine, prompt, params)
    return BenchResult("tokenmill", "single-stream decode", 1, tokens, seconds)


def load_hf_model(model: str | None):
    import transformers

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return hf.eval()


def bench_hf(
    hf, prompts: list[list[int]], output_len: int, scenario: str, temperature: float = 0.0
) -> BenchResult:
    """HF generate on the whole batch at once; ragged prompts are left-padded with an attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    if temperature > 0:  # HF's sampling defaults add top-k 50: off, as for the other systems
        kwargs |= dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, pad_token_id=0)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, **kwargs)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return BenchResult("hf-transformers", scenario, len(prompts), tokens, seconds)


def bench_hf_decode(hf, prompt: list[int], output_len: int) -> BenchResult:
    """HF single-stream decode: the difference between generating output_len and 1 token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, pad_token_id=0)
        one = time.perf_counter() - start
        start = time.perf_counter()
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        full = time.perf_counter() - start
    return BenchResult("hf-transformers", "single-stream decode", 1, output_len - 1, full - one)


def _tokenmill_results(
    model: str | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    threads: int | None,
    workloads: tuple[str, ...],
    speculative: str | None,
    batch_sizes: tuple[int, ...],
    out_dir: Path | None,
    quantization: str,
    temperature: float = 0.0,
) -> tuple[dict[str, list[list[int]]], list[int], list[BenchResult]]:
    """tokenmill in one weight format (a +kv16 or +kv8 suffix: over a float16 or int8 KV cache): single-stream
    decode, then each workload (and the batch sweep)."""
    options = format_options(quantization)
    config = EngineConfig(
        model=model,
        num_threads=threads,
        max_num_seqs=max(64, num_prompts, *batch_sizes),
        speculative=speculative,
        **options,
    )
    llm = LLM(config=config)
    sets = build_workloads(
        llm.tokenizer, llm.engine.model_config.vocab_size, workloads, num_prompts, input_len, seed
    )
    first_prompt = next(iter(sets.values()))[0]
    results = [bench_tokenmill_decode(llm, first_prompt, output_len)]
    for name, prompts in sets.items():
        scenario = _scenario(name, prompts, output_len, temperature)
        results.append(bench_tokenmill(llm, prompts, output_len, scenario, temperature))
    if batch_sizes:
        from tokenmill.bench.roofline import roofline_for_engine, write_report

        sweep = roofline_for_engine(llm.engine, batch_sizes, input_len)
        if out_dir is not None:
            write_report(sweep, out_dir, "offline_sweep")
    kv_label = {"float16": " (KV fp16)", "int8": " (KV int8)"}.get(options["kv_cache_dtype"], "")
    label = (options["quantization"] or "fp32") + kv_label
    for result in results:
        result.system = f"tokenmill {label}" + (f" (speculative {speculative})" if speculative else "")
    del llm
    gc.collect()
    return sets, first_prompt, results


def run_offline(
    model: str | None,
    num_prompts: int,
    input_len: int,
    output_len: int,
    peers: list[str],
    seed: int = 0,
    threads: int | None = None,
    out_dir: Path | None = None,
    workloads: tuple[str, ...] = ("random",),
    speculative: str | None = None,
    vllm_venv: Path | None = None,
    vllm_install: bool = True,
    batch_sizes: tuple[int, ...] = (),
    quantizations: tuple[str, ...] = ("none",),
    llamacpp_weights: tuple[str, ...] = ("native",),
    temperature: float = 0.0,
) -> list[BenchResult]:
    """Each workload through tokenmill, then through each peer; single-stream decode once per system.

    `vllm_venv` is where the vLLM peer lives (default ~/.cache/tokenmill/vllm-venv); with `vllm_install`
    False a missing vLLM is reported instead of installed. `batch_sizes` adds tokenmill's decode step time
    at each batch size against the roofline bound (offline_sweep.json/.md/.png). `quantizations` runs
    tokenmill once per weight format (none = fp32, int8, int4; int4+kv16 and the like over a float16 KV
    cache); `llamacpp_weights` runs llama.cpp on the
    GGUF as shipped ("native") and re-encoded (f32, q8_0, q4_0, ...) by bench/gguf_convert.py. The
    workloads decode greedily, or with `temperature` > 0 sample at that temperature on every system (the
    single-stream runs stay greedy)."""
    if temperature < 0:
        raise InvalidParameterError(f"temperature must be >= 0, got {temperature}", "temperature")
    results: list[BenchResult] = []
    sets: dict[str, list[list[int]]] = {}
    for index, quantization in enumerate(quantizations):
        sets, first_prompt, runs = _tokenmill_results(
            model,
            num_prompts,
            input_len,
            output_len,
            seed,
            threads,
            workloads,
            speculative,
            batch_sizes if index == 0 else (),
            out_dir,
            quantization,
            temperature,
        )
        results.extend(runs)
    if "hf" in peers:
        try:
            hf = load_hf_model(model)
        except Exception as exc:  # reported, not skipped
            results.append(BenchResult("hf-transformers", "all", 0, 0, 0.0, note=f"could not run: {exc}"))
        else:
            results.append(bench_hf_decode(hf, first_prompt, output_len))
            for name, prompts in sets.items():
                scenario = _scenario(name, prompts, output_len, temperature)
                results.append(bench_hf(hf, prompts, output_len, scenario, temperature))
    if "llamacpp" in peers:
        threads = threads or torch.get_num_threads()
        for weights in llamacpp_weights:
            for index, (name, prompts) in enumerate(sets.items()):
                scenario = _scenario(name, prompts, output_len, temperature)
                runs = _llamacpp_results(
                    model, prompts, output_len, threads, scenario, index == 0, weights, temperature
                )
                for run in runs:
                    run.system += "" if weights == "native" else f" {weights}"
                results.extend(runs)
    if "vllm" in peers:
        from tokenmill.bench.vllm_peer import run_vllm_peer

        threads = threads or torch.get_num_threads()
        results.extend(run_vllm_peer(model, sets, output_len, threads, vllm_venv, vllm_install, temperature))
    if out_dir is not None:
        write_reports(results, out_dir)
    return results


def write_reports(results: list[BenchResult], out_dir: Path) -> None:
    """offline.json, offline.md and offline.png (throughput per workload, one bar per system)."""
    from tokenmill.bench.offline_plot import plot_throughput

    out_dir.mkdir(parents=True, exist_ok=True)
    payload = [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in results]
    (out_dir / "offline.json").write_text(json.dumps(payload, indent=2))
    (out_dir / "offline.md").write_text(markdown_table(results))
    plot_throughput(results, out_dir / "offline.png")


def build_workloads(
    tokenizer, vocab: int, names: tuple[str, ...], num: int, input_len: int, seed: int
) -> dict[str, list[list[int]]]:
    """random: num x input_len random ids; shared-prefix: groups of 8 behind one input_len-token prefix,
    plus 32 unique tokens each; chat: the shipped conversations, chat-templated."""
    makers = {
        "random": lambda: random_token_prompts(num, input_len, vocab, seed),
        "shared-prefix": lambda: shared_prefix_prompts(num, input_len, 32, 8, vocab, seed),
        "chat": lambda: chat_prompts(tokenizer, num),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise InvalidParameterError(
            f"unknown workloads {unknown}; choose from {', '.join(makers)}", "workloads"
        )
    return {name: makers[name]() for name in names}


def _scenario(name: str, prompts: list[list[int]], output_len: int, temperature: float = 0.0) -> str:
    lengths = [len(p) for p in prompts]
    span = f"{min(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
    sampled = f", temperature {temperature:g}" if temperature > 0 else ""
    return f"{name}: {len(prompts)} x {span} in / {output_len} out{sampled}"


def _llamacpp_results(
    model: str | None,
    prompts: list[list[int]],
    output_len: int,
    threads: int,
    scenario: str,
    single: bool = True,
    weights: str = "native",
    temperature: float = 0.0,
) -> list[BenchResult]:
    """llama.cpp's own server on the same GGUF (as shipped, or re-encoded as `weights`): single stream,
    then 8 and 64 parallel slots."""
    from tokenmill.bench.gguf_convert import convert_gguf
    from tokenmill.bench.llamacpp_peer import bench_llamacpp, bench_llamacpp_decode, llamacpp_available

    name = "llama.cpp (llama-server)"
    path = resolve_model_path(model)
    ok, reason = llamacpp_available()
    if not ok or path.suffix != ".gguf":
        why = reason if not ok else "llama.cpp needs a GGUF model"
        return [BenchResult(name, scenario, 0, 0, 0.0, note=f"could not run: {why}")]
    results = []
    try:
        if weights != "native":
            path = convert_gguf(path, weights)
        if single:
            results.append(bench_llamacpp_decode(str(path), prompts[0], output_len, threads))
        for slots in sorted({8, len(prompts)} if single else {len(prompts)}):
            results.append(
                bench_llamacpp(str(path), prompts, output_len, threads, slots, scenario, temperature)
            )
    except Exception as exc:  # reported, not skipped
        results.append(BenchResult(name, scenario, 0, 0, 0.0, note=f"failed: {exc}"))
    return results


def markdown_table(results: list[BenchResult]) -> str:
    lines = [
        "| system | scenario | requests | output tokens | seconds | tok/s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.scenario} | {r.requests} | {r.output_tokens} | {r.seconds:.2f} | "
            f"{r.tokens_per_second:.1f} | {r.note} |"
        )
    return "\n".join(lines) + "\n"
