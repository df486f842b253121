"""AsyncEngine: the engine's step loop on a background thread, with an asyncio stream per request.

The loop thread owns the LLMEngine: requests and aborts reach it through a queue and are applied between
steps, so a new HTTP request joins the running batch at the next step. Outputs go back to each request's
asyncio queue with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import EngineOverloadedError, EngineStoppedError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    accepted: asyncio.Future
    stream: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_queued_requests: int = 256,
        on_step: Callable[[LLMEngine], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- requests -----------------------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; raises typed errors at once for bad input or overload.

        Closing the iterator early (client gone) aborts the request and frees its KV blocks.
        """
        request_id = request_id or f"req-{next(self._ids)}"
        stream = await self.submit(request_id, prompt, params)
        return self._iterate(request_id, stream)

    async def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> asyncio.Queue:
        if not self.is_running:
            raise EngineStoppedError("the engine is not running")
        if self.num_unfinished >= self.max_queued_requests + self.engine.config.max_num_seqs:
            raise EngineOverloadedError(
                f"{self.num_unfinished} requests are in flight (limit "
                f"{self.max_queued_requests + self.engine.config.max_num_seqs}); retry later"
            )
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._commands.put(_Add(request_id, prompt, params, accepted, stream, loop))
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def _iterate(self, request_id: str, stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- the loop thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block):
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    if self.on_step is not None:
                        self.on_step(self.engine)
                    for output in outputs:
                        self._deliver(output.request_id, output, output.finished)
        except BaseException as exc:  # an engine bug: fail every open stream rather than hang them
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, RuntimeError(f"engine failed: {exc!r}"), True)
            raise
        finally:
            for request_id in list(self._streams):
                self._deliver(request_id, EngineStoppedError("the engine stopped"), True)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; returns False when asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            if isinstance(command, _Abort):
                if command.request_id in self.engine.requests:
                    self.engine.abort_request(command.request_id)
                self._streams.pop(command.request_id, None)
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params)
            except Exception as exc:
                command.loop.call_soon_threadsafe(_set_exception, command.accepted, exc)
            else:
                command.loop.call_soon_threadsafe(_set_result, command.accepted)

    def _deliver(self, request_id: str, item: object, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
