"""llama.cpp peer for the offline benchmark: llama.cpp's own llama-server, run in-process by xllamacpp.

xllamacpp (``pip install xllamacpp``) ships prebuilt CPU wheels of llama.cpp with its server. Constructing
``xllamacpp.Server(CommonParams)`` loads the GGUF, starts ``n_parallel`` slots with continuous batching and
serves llama-server's HTTP API on ``CommonParams.port`` (0 = a free port chosen by the OS, read back from
``Server.listening_address``); dropping the last reference to the Server stops it. The workload goes
through llama-server's native ``/completion`` endpoint with the prompt given as token ids, greedy decoding,
``ignore_eos`` and ``n_predict`` = output length, so it is the same token-level workload tokenmill runs.

Note that llama.cpp computes with the GGUF's quantised weights as stored (Q4_1 for SmolLM2-135M-Instruct),
while tokenmill dequantises them to fp32: the comparison is of engines *and* weight formats.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tokenmill.bench.offline import BenchResult

PIP_REQUIREMENT = "xllamacpp==2026.10.11549"  # the version this peer was written and tested against
STARTUP_TIMEOUT = 60.0


def llamacpp_available() -> tuple[bool, str]:
    """(True, version) when the llama.cpp peer can run, else (False, the reason)."""
    try:
        import xllamacpp
    except Exception as exc:  # ImportError, or a wheel that does not load on this CPU / libc
        return (
            False,
            f"xllamacpp is not importable ({type(exc).__name__}: {exc}); `pip install {PIP_REQUIREMENT}`",
        )
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        return False, f"httpx is not importable ({exc}); `pip install httpx`"
    if not hasattr(xllamacpp, "Server") or not hasattr(xllamacpp, "CommonParams"):
        return False, f"xllamacpp {getattr(xllamacpp, '__version__', '?')} has no Server/CommonParams API"
    return True, f"xllamacpp {getattr(xllamacpp, '__version__', '?')}"


def gguf_weight_format(gguf_path: str | Path) -> str:
    """The tensor types stored in the GGUF, most common first, e.g. 'Q4_1 x210, F32 x61, Q8_0 x1'."""
    try:
        from gguf import GGUFReader

        counts = Counter(t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors)
    except Exception as exc:  # reported, never fatal for the benchmark
        return f"unknown ({exc})"
    return ", ".join(f"{name} x{count}" for name, count in counts.most_common())


def _weights_note(gguf_path: str | Path) -> str:
    return (
        f"llama.cpp computes with the GGUF weights as stored ({gguf_weight_format(gguf_path)}); "
        "tokenmill dequantises them to fp32"
    )


@contextmanager
def llama_server(gguf_path: str | Path, n_parallel: int, ctx_per_slot: int, threads: int) -> Iterator[tuple]:
    """Run llama-server in-process on 127.0.0.1; yields (base_url, settings dict). Always stopped on exit."""
    ok, reason = llamacpp_available()
    if not ok:
        raise RuntimeError(reason)
    import httpx
    import xllamacpp

    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"GGUF model {gguf_path} not found")
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path)
    params.n_parallel = n_parallel
    # Without a unified KV cache every slot gets n_ctx / n_parallel tokens (llama.cpp rounds it up to 256).
    params.n_ctx = n_parallel * ctx_per_slot
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the OS picks a free port; read back from listening_address
    params.ctx_shift = False  # a too-small context must not silently drop tokens
    params.cache_prompt = False
    params.verbosity = -1  # no llama.cpp log output
    server = xllamacpp.Server(params)  # raises RuntimeError("Failed to init server ...") on bad params
    try:
        url = server.listening_address
        if not url.startswith("http"):
            url = f"http://{url}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server at {url} did not become healthy in {STARTUP_TIMEOUT}s")
            time.sleep(0.1)
        props = httpx.get(f"{url}/props", timeout=10).json()
        slot_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        if slot_ctx is not None and slot_ctx < ctx_per_slot:
            raise RuntimeError(f"llama-server slots have {slot_ctx} tokens of context, need {ctx_per_slot}")
        settings = {
            "xllamacpp": getattr(xllamacpp, "__version__", "?"),
            "llama_cpp_build": xllamacpp.BUILD_INFO,
            "endpoint": "/completion",
            "n_parallel": n_parallel,
            "n_ctx": params.n_ctx,
            "n_ctx_per_slot": slot_ctx,
            "threads": threads,
            "threads_batch": threads,
            "n_batch": params.n_batch,
            "n_ubatch": params.n_ubatch,
            "cont_batching": params.cont_batching,
            "kv_unified": params.kv_unified,
            "flash_attn_type": int(params.flash_attn_type),  # -1 = auto
            "cache_type_k": int(params.cache_type_k),  # ggml_type: 1 = F16
            "cache_type_v": int(params.cache_type_v),
            "cache_prompt": False,
            "ctx_shift": False,
            "system_info": xllamacpp.get_system_info().strip(),
            # ggml's spinning thread barriers collapse when other processes compete for the cores
            # (seen: 0.6 tok/s with threads=2 on a busy 2-core box); record the evidence with the numbers.
            "loadavg_at_start": os.getloadavg()[0],
            "cpu_count": os.cpu_count(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        }
        yield url, settings
    finally:
        del server  # the last reference: the C++ destructor stops the HTTP listener and the slot loop


def _payload(prompt: list[int], n_predict: int, temperature: float = 0.0) -> dict:
    """Greedy, or plain temperature sampling: llama-server's default top-k 40, top-p 0.95 and min-p 0.05
    switched off, as for the other systems."""
    sampling = (
        {"temperature": 0.0, "top_k": 1}
        if temperature <= 0
        else {"temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    )
    return {
        "prompt": list(prompt),  # token ids: no tokenisation, no BOS added
        "n_predict": n_predict,
        "ignore_eos": True,
        **sampling,
        "cache_prompt": False,
        "stream": False,
    }


def _complete(client, url: str, prompt: list[int], n_predict: int, temperature: float = 0.0) -> dict:
    response = client.post(f"{url}/completion", json=_payload(prompt, n_predict, temperature))
    if response.status_code != 200:
        raise RuntimeError(f"llama-server /completion returned {response.status_code}: {response.text[:500]}")
    return response.json()


def _output_tokens(body: dict) -> int:
    if "tokens_predicted" in body:
        return int(body["tokens_predicted"])
    return int(body.get("usage", {}).get("completion_tokens", 0))


def bench_llamacpp(
    gguf_path: str,
    prompts: list[list[int]],
    output_len: int,
    threads: int,
    n_parallel: int,
    scenario: str,
    temperature: float = 0.0,
) -> BenchResult:
    """All prompts through llama-server, at most n_parallel in flight; wall time first send -> last reply."""
    import httpx

    ctx_per_slot = max(len(p) for p in prompts) + output_len
    system = f"llama.cpp (llama-server, n_parallel={n_parallel})"
    with llama_server(gguf_path, n_parallel, ctx_per_slot, threads) as (url, settings):
        limits = httpx.Limits(max_connections=n_parallel, max_keepalive_connections=n_parallel)
        with httpx.Client(timeout=None, limits=limits) as client:
            _complete(client, url, prompts[0][:8], 2)  # warm-up
            with ThreadPoolExecutor(max_workers=n_parallel) as pool:
                start = time.perf_counter()
                bodies = list(pool.map(lambda p: _complete(client, url, p, output_len, temperature), prompts))
                seconds = time.perf_counter() - start
    counts = [_output_tokens(b) for b in bodies]
    note = _weights_note(gguf_path)
    short = sum(1 for c in counts if c != output_len)
    if short:
        note += f"; {short} requests did not return exactly {output_len} tokens"
    return BenchResult(system, scenario, len(prompts), sum(counts), seconds, note=note, extra=settings)


def bench_llamacpp_decode(gguf_path: str, prompt: list[int], output_len: int, threads: int) -> BenchResult:
    """Single-stream decode speed after the first token, from llama-server's own timings when present
    (predicted_per_second counts the tokens after the first), else wall(output_len) - wall(1 token)."""
    import httpx

    system = "llama.cpp (llama-server, n_parallel=1)"
    with llama_server(gguf_path, 1, len(prompt) + output_len, threads) as (url, settings):
        with httpx.Client(timeout=None) as client:
            _complete(client, url, prompt[:8], 2)  # warm-up
            start = time.perf_counter()
            one = _complete(client, url, prompt, 1)
            one_seconds = time.perf_counter() - start
            start = time.perf_counter()
            body = _complete(client, url, prompt, output_len)
            full_seconds = time.perf_counter() - start
    produced = _output_tokens(body)
    if produced != output_len or _output_tokens(one) != 1:
        raise RuntimeError(f"llama-server returned {produced} tokens, expected {output_len}")
    timings = body.get("timings") or {}
    tokens = output_len - 1
    per_second = timings.get("predicted_per_second")
    if per_second and timings.get("predicted_n") == output_len:
        seconds = tokens / per_second
        source = "llama-server timings.predicted_per_second"
    else:
        seconds = full_seconds - one_seconds
        source = "wall time minus a 1-token request"
    extra = settings | {"timings": timings, "wall_seconds": full_seconds, "source": source}
    note = f"{_weights_note(gguf_path)}; decode speed from {source}"
    return BenchResult(system, "single-stream decode", 1, tokens, seconds, note=note, extra=extra)
