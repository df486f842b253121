"""`bench serve --launch tokenmill|llamacpp`: start the server under test on a free 127.0.0.1 port, yield its
URL, stop it afterwards, so one command measures either engine the same way.

tokenmill runs as its own process (`tokenmill serve`), as a user would deploy it, so the benchmark client
and the engine do not share a GIL. llama.cpp's llama-server runs in-process through xllamacpp (its work is
in C++ threads, not Python), with one slot per request that can be in flight.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenmill.errors import InvalidParameterError

LAUNCHABLE = ("tokenmill", "llamacpp")
STARTUP_TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise InvalidParameterError(
                f"tokenmill serve exited with {process.returncode}: {' | '.join(tail)}", "launch"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise InvalidParameterError(
        f"tokenmill serve at {url} not healthy after {timeout:.0f}s (log {log})", "launch"
    )


@contextmanager
def tokenmill_server(
    model: str | None, threads: int | None, max_num_seqs: int, log: Path, quantization: str = "none"
) -> Iterator[str]:
    """`tokenmill serve` in a child process; SIGINT (graceful drain) on exit, SIGKILL if it hangs."""
    port = _free_port()
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--max-num-seqs", str(max_num_seqs), "--log-level", "warning"]
    command += ["--model", model] if model else []
    command += ["--threads", str(threads)] if threads else []
    command += ["--quantization", quantization]
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_healthy(process, url, log, STARTUP_TIMEOUT)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


@contextmanager
def launched_server(
    kind: str,
    model: str | None,
    threads: int | None,
    parallel: int,
    context_per_request: int,
    log_dir: Path,
    quantization: str = "none",
) -> Iterator[str]:
    """The base URL of a freshly started `kind` server for `model` (default SmolLM2), stopped on exit."""
    if kind == "tokenmill":
        log = log_dir / "tokenmill-serve.log"
        with tokenmill_server(model, threads, max(parallel, 1), log, quantization) as url:
            yield url
    elif kind == "llamacpp":
        from tokenmill.bench.llamacpp_peer import llama_server
        from tokenmill.models.loader import resolve_model_path

        path = resolve_model_path(model)
        if path.suffix != ".gguf":
            raise InvalidParameterError(f"--launch llamacpp needs a GGUF model, got {path}", "launch")
        threads = threads or os.cpu_count() or 1
        try:
            with llama_server(path, parallel, context_per_request, threads) as (url, _settings):
                yield url
        except RuntimeError as exc:  # xllamacpp missing or the server did not start
            raise InvalidParameterError(f"could not launch llama-server: {exc}", "launch") from exc
    else:
        raise InvalidParameterError(f"--launch takes one of {', '.join(LAUNCHABLE)}, got {kind!r}", "launch")
