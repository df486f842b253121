"""`tokenmill demo | generate | chat`: the command line over the offline engine."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Iterator

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import InvalidParameterError, TokenmillError
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

DEMO_PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in one paragraph.",
    "List three uses of Python.",
    "What is the boiling point of water?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What makes a good password?",
]


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--speculative", default=None, help="speculative decoding: ngram:k=4 or draft=PATH,k=4[,ngram=1]"
    )
    parser.add_argument(
        "--quantization", default=None, choices=["none", "int8", "int4"], help="weight format (default fp32)"
    )
    parser.add_argument("--group-size", type=int, default=32, help="int4 weights per scale: 32, 64 or 128")
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "float16", "int8"],
        help="what the KV cache stores (auto: as the model computes; float16 halves its bytes, int8 rounds "
        "each token's head to int8 with one scale: 0.53x fp16's bytes)",
    )


def _quantization(value: str | None) -> str | None:
    return None if value in (None, "none") else value


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        num_threads=args.threads,
        kv_cache_gib=args.kv_cache_gib,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        speculative=args.speculative,
        quantization=_quantization(args.quantization),
        quantization_group_size=args.group_size,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def stream_text(engine: LLMEngine, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
    """Yield the text of one request as it is produced."""
    request_id = f"stream-{time.monotonic_ns()}"
    engine.add_request(request_id, prompt, params)
    sent = 0
    while True:
        for output in engine.step():
            if output.request_id != request_id:
                continue
            text = output.outputs[0].text
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if output.finished:
                return


def cmd_generate(args: argparse.Namespace) -> int:
    llm = LLM(config=_engine_config(args))
    outputs = llm.generate(args.prompts, _sampling(args), use_tqdm=len(args.prompts) > 1)
    for output in outputs:
        print(output.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = LLMEngine(_engine_config(args))
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = engine.tokenizer.apply_chat_template(messages)
        reply = []
        for piece in stream_text(engine, prompt, _sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    llm = LLM(config=_engine_config(args))
    print(f"loaded {llm.engine.model_config.name} in {time.perf_counter() - start:.1f}s")
    engine = llm.engine
    question = "What are three good reasons to learn a second language?"
    print(f"\n### chat: {question}\n")
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    for piece in stream_text(engine, prompt, params):
        print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    tokens = engine.stats.generation_tokens
    rate = tokens / elapsed
    print(f"\n\n[single stream: {tokens} tokens in {elapsed:.1f}s = {rate:.1f} tok/s, prefill included]")
    conversations = [
        [{"role": "user", "content": DEMO_PROMPTS[i % len(DEMO_PROMPTS)]}] for i in range(args.batch)
    ]
    before = engine.stats.generation_tokens
    start = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=True)
    elapsed = time.perf_counter() - start
    tokens = engine.stats.generation_tokens - before
    rate = tokens / elapsed
    print(f"\n### batch of {len(outputs)} chats: {tokens} tokens in {elapsed:.1f}s = {rate:.1f} tok/s")
    for output in outputs[:3]:
        print(f"- {output.outputs[0].text[:120]!r}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.models.loader import DEFAULT_MODEL_NAME
    from tokenmill.serve.app import build_app

    if args.model_path and not args.model:
        args.model = args.model_path
    engine = LLMEngine(_engine_config(args))
    name = args.served_model_name or (DEFAULT_MODEL_NAME if args.model is None else args.model)
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    app = build_app(AsyncEngine(engine, args.max_queued_requests), name, api_key)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30
    )
    # uvicorn drains in-flight requests on SIGINT/SIGTERM, then re-raises the signal; these no-op
    # handlers receive it, so a clean shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenmill.bench.offline import markdown_table, run_offline

    results = run_offline(
        args.model,
        args.num_prompts,
        args.input_len,
        args.output_len,
        [p for p in args.peers.split(",") if p],
        seed=args.seed,
        threads=args.threads,
        out_dir=Path(args.out_dir),
        workloads=tuple(w for w in args.workloads.split(",") if w),
        speculative=args.speculative,
        vllm_venv=Path(args.vllm_venv) if args.vllm_venv else None,
        vllm_install=not args.no_vllm_install,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",") if b),
        quantizations=tuple(q for q in args.quantization.split(",") if q) or ("none",),
        llamacpp_weights=tuple(w for w in args.llamacpp_weights.split(",") if w) or ("native",),
        temperature=args.temperature,
    )
    print(markdown_table(results))
    print(f"wrote {Path(args.out_dir) / 'offline.json'}, offline.md, offline.png")
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokenmill.bench.quality import markdown_report, run_quality

    result = run_quality(
        args.model,
        tuple(f for f in args.formats.split(",") if f),
        max_text_tokens=args.max_text_tokens,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        threads=args.threads,
        group_size=args.group_size,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    report = markdown_report(result)
    (out / "quality.md").write_text(report)
    print(report)
    return 0


def cmd_bench_roofline(args: argparse.Namespace) -> int:
    from tokenmill.bench.roofline import run_roofline, write_report

    batches = tuple(int(b) for b in args.batches.split(","))
    formats = tuple(_quantization(q) for q in args.quantization.split(",") if q) or (None,)
    result = run_roofline(args.model, args.threads, batches, args.prompt_len, args.steps, formats)
    print(write_report(result, args.out_dir))
    print(f"wrote roofline.json, roofline.md, roofline.png in {args.out_dir}")
    return 0


def cmd_bench_speculative(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokenmill.bench.speculative import markdown_report, run_speculative_bench

    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not set(tasks) <= {"input-grounded", "chat"} or not tasks:
        raise InvalidParameterError("--tasks is a comma list of input-grounded, chat", "tasks")
    specs = args.speculative or ["ngram:k=4"]
    result = run_speculative_bench(args.model, specs, args.output_len, args.threads, tasks)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(result, indent=2))
    report = markdown_report(result)
    (out / "speculative.md").write_text(report)
    print(report)
    return 0


def cmd_draft_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenmill.train.draft import DraftTrainConfig, train_draft

    config = DraftTrainConfig(
        output=Path(args.output),
        model=args.model,
        kind=args.kind,
        depth=args.depth,
        sampled_answers=args.sampled_answers,
        num_layers=args.layers,
        source_layers=[int(x) for x in args.source_layers.split(",")] if args.source_layers else None,
        minutes=args.minutes,
        data_fraction=args.data_fraction,
        max_steps=args.max_steps,
        answer_tokens=args.answer_tokens,
        max_prompts=args.max_prompts,
        head_tokens=args.head_tokens,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        samples_path=Path(args.samples) if args.samples else None,
        threads=args.threads,
        seed=args.seed,
    )
    result = train_draft(config)
    print(
        f"wrote {result.output}: {result.steps} steps in {result.seconds / 60:.1f} min "
        f"({result.data_seconds / 60:.1f} min collecting {result.num_samples} answers, "
        f"{result.num_answer_tokens} tokens); final loss {result.final_loss:.3f}, "
        f"held-out agreement with the target {result.heldout_agreement:.1%}"
        + (" (guesses 1..n: " + ", ".join(f"{a:.1%}" for a in result.heldout_by_depth) + ")")
    )
    if config.kind == "eagle":  # best measured on 2 cores (BENCHMARKS.md, session 6)
        print(
            f"use it with: --speculative draft={result.output},k=2 (alone: 2 guesses + a second choice "
            f"for the first), or draft={result.output},k=4,ngram=1 (prompt lookup first)"
        )
    else:
        print(f"use it with: --speculative draft={result.output},k=4")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete one or more prompts")
    generate.add_argument("prompts", nargs="+")
    _engine_args(generate)
    _sampling_args(generate)
    generate.set_defaults(func=cmd_generate)
    chat = commands.add_parser("chat", help="interactive chat, streaming tokens (reads stdin)")
    chat.add_argument("--system", default=None)
    _engine_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model_path", nargs="?", default=None, help="model (default: SmolLM2-135M)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or TOKENMILL_API_KEY)"
    )
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-queued-requests", type=int, default=256, help="beyond running ones; then 429")
    serve.add_argument("--log-level", default="info")
    _engine_args(serve)
    serve.set_defaults(func=cmd_serve)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    offline = bench.add_parser("offline", help="offline throughput vs peers (same run)")
    offline.add_argument("--model", default=None)
    offline.add_argument("--threads", type=int, default=None)
    offline.add_argument("--num-prompts", type=int, default=64)
    offline.add_argument("--input-len", type=int, default=128)
    offline.add_argument("--output-len", type=int, default=128)
    offline.add_argument("--peers", default="hf,llamacpp", help="comma list of hf, llamacpp, vllm (or empty)")
    offline.add_argument(
        "--vllm-venv", default=None, help="venv of the vllm peer (default ~/.cache/tokenmill/vllm-venv)"
    )
    offline.add_argument(
        "--no-vllm-install", action="store_true", help="report a missing vLLM instead of installing it"
    )
    offline.add_argument(
        "--batch-sizes", default="", help="also sweep tokenmill decode over these batch sizes, e.g. 1,8,32,64"
    )
    offline.add_argument("--seed", type=int, default=0)
    offline.add_argument("--workloads", default="random", help="comma list of random, shared-prefix, chat")
    offline.add_argument("--speculative", default=None, help="run tokenmill with e.g. ngram:k=4")
    offline.add_argument(
        "--quantization",
        default="none",
        help="tokenmill weight formats, comma list of none, int8, int4 "
        "(+kv16 / +kv8: over a float16 / int8 KV cache)",
    )
    offline.add_argument(
        "--llamacpp-weights",
        default="native",
        help="llama.cpp GGUF weights: native (as shipped) and/or re-encoded f32, f16, q8_0, q4_0, q4_1",
    )
    offline.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample the workloads at this temperature on every system (0: greedy); shows the sampler's cost",
    )
    offline.add_argument("--out-dir", default="results")
    offline.set_defaults(func=cmd_bench_offline)
    from tokenmill.bench.serve import add_parser as add_bench_serve

    add_bench_serve(bench)
    roofline = bench.add_parser("roofline", help="machine limits, predicted vs measured decode steps")
    roofline.add_argument("--model", default=None)
    roofline.add_argument("--threads", type=int, default=None)
    roofline.add_argument("--batches", default="1,8,32,64")
    roofline.add_argument("--prompt-len", type=int, default=128)
    roofline.add_argument("--steps", type=int, default=8)
    roofline.add_argument(
        "--quantization", default="none", help="weight formats, comma list of none, int8, int4"
    )
    roofline.add_argument("--out-dir", default="results")
    roofline.set_defaults(func=cmd_bench_roofline)
    quality = bench.add_parser("quality", help="perplexity and greedy agreement of fp32/int8/int4 weights")
    quality.add_argument("--model", default=None)
    quality.add_argument("--threads", type=int, default=None)
    quality.add_argument(
        "--formats",
        default="fp32,int8,int4",
        help="first one is the reference; a +kv16 or +kv8 suffix (e.g. int4+kv16) runs over a float16 or "
        "int8 KV cache",
    )
    quality.add_argument("--group-size", type=int, default=32)
    quality.add_argument("--max-text-tokens", type=int, default=None, help="default: the whole text (~28k)")
    quality.add_argument("--num-prompts", type=int, default=50)
    quality.add_argument("--max-tokens", type=int, default=32)
    quality.add_argument("--out-dir", default="results")
    quality.set_defaults(func=cmd_bench_quality)
    spec = bench.add_parser("speculative", help="plain vs speculative single-stream decode, same run")
    spec.add_argument("--model", default=None)
    spec.add_argument("--threads", type=int, default=None)
    spec.add_argument(
        "--speculative",
        action="append",
        default=None,
        help="proposer to compare with plain decode, repeatable (default ngram:k=4); e.g. draft=PATH,k=4",
    )
    spec.add_argument("--tasks", default="input-grounded,chat", help="comma list of input-grounded, chat")
    spec.add_argument("--output-len", type=int, default=128)
    spec.add_argument("--out-dir", default="results")
    spec.set_defaults(func=cmd_bench_speculative)
    draft = commands.add_parser("draft", help="draft models for speculative decoding").add_subparsers(
        dest="draft", required=True
    )
    train = draft.add_parser("train", help="distil a small draft from the target's own answers (CPU)")
    train.add_argument("--model", default=None, help="target model (default: SmolLM2-135M)")
    train.add_argument("--output", default="draft.safetensors", help="draft file to write")
    train.add_argument("--minutes", type=float, default=None, help="whole run: 50 (eagle) / 20 (layers)")
    train.add_argument(
        "--data-fraction", type=float, default=None, help="share of time for answers: 0.3 eagle / 0.4 layers"
    )
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    train.add_argument(
        "--kind",
        choices=("eagle", "layers"),
        default="eagle",
        help="eagle: one layer over the target's hidden states; layers: a token-only draft",
    )
    train.add_argument("--depth", type=int, default=3, help="eagle: guesses deep to train on own guesses")
    train.add_argument(
        "--sampled-answers", type=int, default=0, help="eagle: extra sampled answers per prompt"
    )
    train.add_argument("--layers", type=int, default=2, help="decoder layers in a 'layers' draft")
    train.add_argument(
        "--source-layers", default=None, help="target layers to start from (default 0..layers-1)"
    )
    train.add_argument("--head-tokens", type=int, default=8192, help="vocabulary the draft scores (0: all)")
    train.add_argument("--answer-tokens", type=int, default=128, help="tokens per target answer")
    train.add_argument("--max-prompts", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None, help="default: 4 (eagle), 8 (layers)")
    train.add_argument("--lr", type=float, default=None, help="default: 3e-3 (eagle), 5e-4 (layers)")
    train.add_argument("--samples", default=None, help="JSON cache of the target's answers (reused)")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_draft_train)
    demo = commands.add_parser("demo", help="a chat answer and a batch, with tokens/s")
    demo.add_argument("--batch", type=int, default=16)
    _engine_args(demo)
    _sampling_args(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
