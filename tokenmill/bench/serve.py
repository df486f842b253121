"""`tokenmill bench serve`: an online benchmark of any OpenAI-compatible server, measured like vLLM's.

Requests are streamed (SSE) at scheduled arrival times (Poisson/gamma at a rate, or all at once), at most
`max_concurrency` in flight; the client timestamps every chunk that carries text and `latency.summarize`
turns the timestamps into TTFT/TPOT/ITL/E2E statistics, throughputs and goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from tokenmill.bench.latency import RequestRecord, arrival_times, percentile_key, summarize
from tokenmill.bench.workloads import random_token_prompts
from tokenmill.errors import InvalidParameterError

SLO_KEYS = ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms")
REQUEST_TIMEOUT_S = 6 * 3600.0  # as vLLM: a slow server is measured, not cut off


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def first_model_id(base_url: str, api_key: str | None = None) -> str:
    """The first model id the server lists at GET /v1/models."""
    response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=_auth_headers(api_key), timeout=30)
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def request_body(
    endpoint: str, model: str, prompt: str | list[int], max_tokens: int, ignore_eos: bool
) -> dict:
    """A streaming, greedy request body for /v1/completions or /v1/chat/completions."""
    body: dict = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint.endswith("/chat/completions"):
        if not isinstance(prompt, str):
            raise ValueError("the chat endpoint takes text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": prompt}]
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM/tokenmill extension: always generate max_tokens
    return body


def chunk_text(chunk: dict) -> str:
    """The text a completions or chat SSE chunk carries ('' for role-only, usage-only or empty chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict, headers: dict[str, str], prompt_len: int
) -> RequestRecord:
    """Stream one request and timestamp its text chunks; failures become a record, never an exception."""
    record = RequestRecord(send_time=time.perf_counter(), prompt_tokens=prompt_len)
    usage: dict = {}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ':' comments (pings)
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = f"error in stream: {json.dumps(chunk['error'])[:300]}"
                    return record
                if chunk_text(chunk):
                    record.chunk_times.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    except Exception as exc:  # connection refused, reset, timeout, bad JSON: a failed request
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    if not record.chunk_times:
        record.error = "no chunk with text received"
        return record
    record.output_tokens = usage.get("completion_tokens") or len(record.chunk_times)
    record.prompt_tokens = usage.get("prompt_tokens") or prompt_len
    record.ok = True
    return record


async def run_serve_benchmark(
    base_url: str,
    model: str,
    prompts: list[str] | list[list[int]],
    max_tokens: int,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    endpoint: str = "/v1/completions",
    ignore_eos: bool = True,
    slo: dict[str, float | None] | None = None,
    show_progress: bool = True,
    warmup: bool = True,
) -> dict:
    """Send every prompt at its scheduled arrival time and return `summarize(...)` plus the run's config.

    `slo` takes the keys `slo_ttft_ms`, `slo_tpot_ms`, `slo_e2e_ms` (milliseconds). Token prompts count
    their length as prompt tokens when the server reports no usage. An unmeasured warm-up request goes
    first (`warmup`); if it fails the server is unusable and InvalidParameterError says why.
    """
    slo = {k: v for k, v in (slo or {}).items() if v is not None}
    if unknown := set(slo) - set(SLO_KEYS):
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; allowed: {', '.join(SLO_KEYS)}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    offsets = arrival_times(len(prompts), request_rate, burstiness, seed)
    url = base_url.rstrip("/") + endpoint
    headers = _auth_headers(api_key)
    bodies = [request_body(endpoint, model, p, max_tokens, ignore_eos) for p in prompts]
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        if warmup and prompts:
            # a different prompt of the same size, so the measured first request finds no cached prefix
            body = request_body(endpoint, model, prompts[0][::-1], min(max_tokens, 4), ignore_eos)
            check = await send_request(client, url, body, headers, len(prompts[0]))
            if not check.ok:
                raise InvalidParameterError(
                    f"the warm-up request to {url} failed ({check.error}); check the URL, model and API key",
                    "base_url",
                )
        progress = tqdm(total=len(prompts), desc=f"rate {request_rate:g}/s", disable=not show_progress)
        start = time.perf_counter()

        async def one(offset: float, body: dict, prompt_len: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            if limit is None:
                record = await send_request(client, url, body, headers, prompt_len)
            else:
                async with limit:
                    record = await send_request(client, url, body, headers, prompt_len)
            progress.update(1)
            return record

        records = await asyncio.gather(
            *(
                one(offset, body, 0 if isinstance(p, str) else len(p))
                for offset, body, p in zip(offsets, bodies, prompts, strict=True)
            )
        )
        duration = time.perf_counter() - start
    progress.close()
    result = summarize(records, duration, **slo)
    config = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": base_url,
        "endpoint": endpoint,
        "model": model,
        "num_prompts": len(prompts),
        "max_tokens": max_tokens,
        "request_rate": request_rate,
        "burstiness": burstiness,
        "seed": seed,
        "max_concurrency": max_concurrency,
        "ignore_eos": ignore_eos,
    } | {k: slo.get(k) for k in SLO_KEYS}
    return config | result


# ---- reports --------------------------------------------------------------------------------------------
def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _json_safe(result: dict) -> dict:
    """inf request rates as the string "inf" (as vLLM writes them); JSON has no infinity."""
    return {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in result.items()}


def markdown_table(results: list[dict]) -> str:
    """Metrics as rows, one column per run (labelled by its request rate)."""

    def num(value, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    percentiles = [
        k.split("_", 1)[0]
        for k in results[0]
        if k.startswith("p") and k.endswith("_ttft_ms") and k != "p50_ttft_ms"
    ]  # p50 is the median
    rows: list[tuple[str, list[str]]] = [
        ("model", [str(r["model"]) for r in results]),
        ("max concurrency", [str(r["max_concurrency"] or "-") for r in results]),
        ("completed / failed", [f"{r['completed']} / {r['failed']}" for r in results]),
        ("duration (s)", [num(r["duration"]) for r in results]),
        (
            "input / output tokens",
            [f"{r['total_input_tokens']} / {r['total_output_tokens']}" for r in results],
        ),
        ("request throughput (req/s)", [num(r["request_throughput"]) for r in results]),
        ("request goodput (req/s)", [num(r["request_goodput"]) for r in results]),
        ("output token throughput (tok/s)", [num(r["output_throughput"], 1) for r in results]),
        ("total token throughput (tok/s)", [num(r["total_token_throughput"], 1) for r in results]),
    ]
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        for stat in ("mean", "median", *percentiles):
            rows.append((f"{label} {stat} (ms)", [num(r[f"{stat}_{metric}_ms"]) for r in results]))
    header = "| metric | " + " | ".join(f"rate {_rate_label(r['request_rate'])}/s" for r in results) + " |"
    lines = [header, "|---|" + "---:|" * len(results)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return "\n".join(lines) + "\n"


def write_report(result: dict | list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `serve.json` (one run's dict, or a list for a sweep) and the Markdown table `serve.md`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = result if isinstance(result, list) else [result]
    payload = [_json_safe(r) for r in results]
    json_path, md_path = out / "serve.json", out / "serve.md"
    json_path.write_text(json.dumps(payload if isinstance(result, list) else payload[0], indent=2) + "\n")
    md_path.write_text(markdown_table(results))
    return json_path, md_path


def plot_latency_vs_rate(results: list[dict], path: str | Path) -> Path:
    """PNG of p50/p99 TTFT and TPOT against the request rate; runs at an infinite rate are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(
        (r for r in results if not math.isinf(r["request_rate"])), key=lambda r: r["request_rate"]
    )
    if not finite:
        raise ValueError("no run with a finite request rate to plot")
    rates = [r["request_rate"] for r in finite]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, metric, label in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for p in (50, 99):
            values = [r.get(f"{percentile_key(p)}_{metric}_ms", float("nan")) for r in finite]
            axis.plot(rates, values, marker="o", label=f"p{p}")
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel(f"{label} (ms)")
        axis.set_title(f"{label} vs request rate")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(f"{finite[0]['model']} at {finite[0]['base_url']}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


# ---- command line ---------------------------------------------------------------------------------------
def parse_rates(values: list[str]) -> list[float]:
    """`--request-rate 1 --request-rate 2,4,inf` -> [1.0, 2.0, 4.0, inf]."""
    rates = []
    for part in (p.strip() for value in values for p in value.split(",")):
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            rate = math.nan
        if not rate > 0:
            raise InvalidParameterError(
                f"--request-rate takes numbers > 0 or inf, got {part!r}", "request_rate"
            )
        rates.append(rate)
    return rates


def check_args(args: argparse.Namespace) -> None:
    """Reject values the benchmark cannot run with, naming the option and what is allowed."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= 1", name)
    if args.vocab_size <= 3:
        raise InvalidParameterError("--vocab-size must be > 3", "vocab_size")
    if not (args.burstiness > 0 and math.isfinite(args.burstiness)):
        raise InvalidParameterError("--burstiness must be a finite number > 0", "burstiness")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise InvalidParameterError("--max-concurrency must be >= 1", "max_concurrency")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Run the benchmark once per request rate, print the table, write serve.json/.md (and a PNG); with
    --launch, against a server started for this run and stopped after it."""
    check_args(args)
    if not args.launch:
        return _bench_serve(args)
    from tokenmill.bench.launch import launched_server

    parallel = args.max_concurrency or args.num_prompts
    context = args.input_len + args.output_len
    with launched_server(
        args.launch,
        args.launch_model,
        args.launch_threads,
        parallel,
        context,
        Path(args.out_dir),
        args.launch_quantization,
    ) as url:
        print(f"launched {args.launch} at {url}")
        args.base_url = url
        return _bench_serve(args)


def _bench_serve(args: argparse.Namespace) -> int:
    rates = parse_rates(args.request_rate or ["inf"])
    if args.model:
        model = args.model
    else:
        try:
            model = first_model_id(args.base_url, args.api_key)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise InvalidParameterError(
                f"could not list the models at {args.base_url}/v1/models ({exc}); "
                "check --base-url or pass --model",
                "base_url",
            ) from exc
    prompts = random_token_prompts(args.num_prompts, args.input_len, args.vocab_size, args.seed)
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "slo_e2e_ms": args.slo_e2e_ms}
    results = []
    for rate in rates:
        result = asyncio.run(
            run_serve_benchmark(
                args.base_url,
                model,
                prompts,
                args.output_len,
                request_rate=rate,
                burstiness=args.burstiness,
                seed=args.seed,
                max_concurrency=args.max_concurrency,
                api_key=args.api_key,
                slo=slo,
            )
        )
        results.append(result | {"input_len": args.input_len, "output_len": args.output_len})
    write_report(results if len(results) > 1 else results[0], args.out_dir)
    print(markdown_table(results))
    if len(rates) > 1 and any(math.isfinite(r) for r in rates):
        plot = plot_latency_vs_rate(results, Path(args.out_dir) / "serve_latency_vs_rate.png")
        print(f"plot: {plot}")
    for result in results:
        for error in result["errors"]:
            print(f"rate {_rate_label(result['request_rate'])}/s error: {error}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `tokenmill bench` sub-commands."""
    parser = subparsers.add_parser(
        "serve", help="online latency/throughput of an OpenAI-compatible server (vLLM's definitions)"
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="random prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens, with ignore_eos")
    parser.add_argument("--vocab-size", type=int, default=49152, help="random token ids are below this")
    parser.add_argument(
        "--request-rate",
        action="append",
        default=None,
        help="requests/s (default inf: all at once); repeat or comma-separate to sweep (writes a PNG)",
    )
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps; 1 = Poisson")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--slo-e2e-ms", type=float, default=None)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument(
        "--launch",
        choices=("tokenmill", "llamacpp"),
        default=None,
        help="start this server on a free 127.0.0.1 port for the run (ignores --base-url), stop it after",
    )
    parser.add_argument("--launch-model", default=None, help="model of the launched server (default SmolLM2)")
    parser.add_argument("--launch-threads", type=int, default=None, help="threads of the launched server")
    parser.add_argument(
        "--launch-quantization",
        choices=("none", "int8", "int4"),
        default="none",
        help="weight format of a launched tokenmill server (llama-server runs the GGUF as stored)",
    )
    parser.set_defaults(func=cmd_bench_serve)
    return parser
