"""Many clients at once: batched together, each correct; disconnects abort and free their blocks."""

import asyncio
import json

import httpx

from tests.conftest import make_engine, run_to_completion
from tests.serve.conftest import running_server
from tokenmill.sampling import SamplingParams


async def _stream_completion(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    text = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def test_32_concurrent_streams_are_batched_and_correct(tiny_loaded):
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(32)]
    engine = make_engine(tiny_loaded)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    done = run_to_completion(engine)
    expected = [done[str(i)].outputs[0].text for i in range(32)]

    with running_server(tiny_loaded) as server:

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(_stream_completion(client, server.url, p, 24) for p in prompts))

        texts = asyncio.run(main())
        assert texts == expected
        steps = server.metric("tokenmill:step_batch_size_count")
        assert steps > 0
        assert server.metric("tokenmill:step_batch_size_sum") / steps > 1.5, "requests were not batched"
        assert server.metric("tokenmill:generation_tokens_total") == 32 * 24


def test_disconnected_clients_are_aborted_and_free_their_blocks(tiny_loaded):
    with running_server(tiny_loaded) as server:
        assert server.metric("tokenmill:kv_cache_blocks_used") == 0

        async def leave_early(client, i):
            body = {"prompt": list(range(5, 40 + i)), "max_tokens": 900, "stream": True, "ignore_eos": True}
            async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                seen = 0
                async for line in lines:
                    if line.startswith("data: "):
                        seen += 1
                        if seen == 3:
                            break  # leave mid-stream: closing the response closes the connection

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                await asyncio.gather(*(leave_early(client, i) for i in range(20)))

        asyncio.run(main())
        # 20 x 900 tokens would keep the engine busy for a long time; aborted, the pool empties at once.
        assert server.wait_until(
            lambda: server.engine.block_manager.num_free_blocks == server.engine.block_manager.num_blocks, 20
        )
        assert server.metric("tokenmill:kv_cache_blocks_used") == 0
        assert not server.engine.has_unfinished_requests()
        follow_up = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3})
        assert follow_up.status_code == 200


def test_overload_gets_429_with_retry_after_and_nothing_hangs(tiny_loaded):
    with running_server(tiny_loaded, max_queued=2, max_num_seqs=2) as server:

        async def one(client):
            body = {"prompt": [5, 6, 7, 8], "max_tokens": 40, "ignore_eos": True}
            return await client.post(f"{server.url}/v1/completions", json=body)

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(24))), 120)

        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}
        assert codes.count(429) > 0 and codes.count(200) > 0
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_exceeded"
            else:
                assert r.json()["usage"]["completion_tokens"] == 40
