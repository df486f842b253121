"""The OpenAI-compatible HTTP API over an AsyncEngine: completions, chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.errors import EngineOverloadedError, EngineStoppedError, InvalidParameterError
from tokenmill.outputs import RequestOutput
from tokenmill.serve.metrics import ServerMetrics
from tokenmill.serve.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.serve.responses import ChoiceStream, chat_logprobs, completion_logprobs


class ModelNotFoundError(Exception):
    pass


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    metrics = ServerMetrics(model_name)
    engine.on_step = metrics.on_step
    tokenizer = engine.engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_running:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # ---- errors in OpenAI's shape -------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{first.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
        return error_response(400, message, "invalid_request_error", where)

    @app.exception_handler(InvalidParameterError)
    async def _invalid_param(request: Request, exc: InvalidParameterError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        return error_response(429, str(exc), "rate_limit_exceeded", headers={"Retry-After": "1"})

    @app.exception_handler(EngineStoppedError)
    async def _stopped(request: Request, exc: EngineStoppedError) -> JSONResponse:
        return error_response(503, str(exc), "service_unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {exc!r}", "internal_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(
                    401, "missing or wrong API key", "invalid_request_error", code="invalid_api_key"
                )
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name not in (model_name, "default", ""):
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves {model_name!r}")

    # ---- plain endpoints ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return error_response(503, "engine is not running", "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "tokenmill",
            "max_model_len": engine.engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.refresh_gauges(engine.engine)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- generation ---------------------------------------------------------------------------------
    async def start_all(prompts: list, params) -> list[AsyncIterator[RequestOutput]]:
        streams = []
        try:
            for prompt in prompts:
                streams.append(await engine.generate(prompt, params))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests as they come, tagged with the request's position."""
        if len(streams) == 1:
            async for output in streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for output in stream:
                    await queue.put((i, output))
            except BaseException as exc:
                await queue.put((i, exc))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_streams = len(streams)
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                await stream.aclose()

    def observe(output: RequestOutput) -> None:
        if output.finished:
            metrics.on_finish(output.metrics, [o.finish_reason for o in output.outputs])

    async def run(kind: str, prompts: list, params, body, echo_texts: list[str] | None) -> Response:
        streams = await start_all(prompts, params)
        n = params.n
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        choices = [ChoiceStream(i * n + j, tokenizer, params) for i in range(len(prompts)) for j in range(n)]
        if body.stream:
            return StreamingResponse(
                sse(kind, request_id, streams, choices, body, echo_texts), media_type="text/event-stream"
            )
        prompt_tokens = 0
        async for index, output in merged(streams):
            observe(output)
            for out in output.outputs:
                choices[index * n + out.index].update(out, output.finished)
            if output.finished:
                prompt_tokens += len(output.prompt_token_ids)
        completion_tokens = sum(c.num_tokens for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        payload = {"id": request_id, "created": int(time.time()), "model": model_name, "usage": usage}
        if kind == "chat":
            payload["object"] = "chat.completion"
            payload["choices"] = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tokenizer, c.logprobs) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ]
        else:
            payload["object"] = "text_completion"
            payload["choices"] = []
            for c in choices:
                prefix = echo_texts[c.index // n] if echo_texts else ""
                payload["choices"].append(
                    {
                        "index": c.index,
                        "text": prefix + c.text,
                        "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(tokenizer, c.logprobs, len(prefix))
                        if body.logprobs is not None
                        else None,
                    }
                )
        return JSONResponse(payload)

    async def sse(kind, request_id, streams, choices, body, echo_texts) -> AsyncIterator[str]:
        created_at = int(time.time())
        n = len(choices) // len(streams)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        last_time: dict[int, float] = {}

        def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
            data = {
                "id": request_id,
                "object": obj,
                "created": created_at,
                "model": model_name,
                "choices": choice_list,
            }
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        if kind == "chat":
            yield chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for c in choices
                ]
            )
        elif echo_texts:
            yield chunk(
                [
                    {
                        "index": c.index,
                        "text": echo_texts[c.index // n],
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for c in choices
                ]
            )
        prompt_tokens = 0
        async for index, output in merged(streams):
            observe(output)
            now = time.monotonic()
            if output.finished:
                prompt_tokens += len(output.prompt_token_ids)
            parts = []
            for out in output.outputs:
                choice = choices[index * n + out.index]
                delta_text, new_logprobs, finished_now = choice.update(out, output.finished)
                if not delta_text and not finished_now and not new_logprobs:
                    continue
                if delta_text and choice.index in last_time:
                    metrics.itl.observe(now - last_time[choice.index])
                last_time[choice.index] = now
                reason = choice.finish_reason if finished_now else None
                if kind == "chat":
                    lp = chat_logprobs(tokenizer, new_logprobs) if body.logprobs and new_logprobs else None
                    parts.append(
                        {
                            "index": choice.index,
                            "delta": {"content": delta_text} if delta_text else {},
                            "logprobs": lp,
                            "finish_reason": reason,
                        }
                    )
                else:
                    lp = (
                        completion_logprobs(tokenizer, new_logprobs, 0) if body.logprobs is not None else None
                    )
                    parts.append(
                        {"index": choice.index, "text": delta_text, "logprobs": lp, "finish_reason": reason}
                    )
            if parts:
                yield chunk(parts)
        if body.stream_options and body.stream_options.include_usage:
            completion_tokens = sum(c.num_tokens for c in choices)
            yield chunk(
                [],
                {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            )
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts or len(prompts) > 64:
            raise InvalidParameterError(
                "prompt must be a string, a token list, or a list of 1-64 of them", "prompt"
            )
        params = body.sampling_params(body.max_tokens, body.logprobs)
        echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else None
        return await run("completion", prompts, params, body, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, logprobs)
        return await run("chat", [prompt], params, body, None)

    return app
