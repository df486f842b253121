"""A real tokenmill server on 127.0.0.1 (uvicorn in a thread of the test process), per test module."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine import LLMEngine
from tokenmill.models.loader import load_model
from tokenmill.serve.app import build_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, url: str, app, engine: LLMEngine) -> None:
        self.url = url
        self.app = app
        self.engine = engine

    def metric(self, name: str) -> float:
        """Sum of a Prometheus series' samples whose name matches exactly (labels ignored)."""
        text = httpx.get(f"{self.url}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_until(self, condition, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return False


@contextmanager
def running_server(
    loaded, model_name: str = "tiny", api_key: str | None = None, max_queued: int = 256, **options
):
    options.setdefault("num_threads", 2)
    engine = LLMEngine(EngineConfig(**options), loaded)
    app = build_app(AsyncEngine(engine, max_queued), model_name, api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, engine)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_models):
    return load_model(str(tiny_models["llama"][0]))


@pytest.fixture(scope="module")
def tiny_server(tiny_loaded):
    with running_server(tiny_loaded) as server:
        yield server


@pytest.fixture(scope="module")
def smol_server(smollm_loaded):
    with running_server(smollm_loaded, model_name="SmolLM2-135M-Instruct") as server:
        yield server
