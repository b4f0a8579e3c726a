"""Processes the benchmarks run: a bare aiohttp app (the yardstick) and the fake upstream."""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from proxy.testing import FakeOpenAI

# The same answer the fake upstream gives a short chat, as a fixed body.
FIXED = orjson.dumps(
    {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Answer 1 to 1a2b3c4d: word1 word2"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
    }
)


async def bare(request: web.Request) -> web.Response:
    """Reads the body, answers a fixed JSON body: what any aiohttp service costs at least."""
    await request.read()
    return web.Response(body=FIXED, content_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["bare", "fake"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--speech-mb", type=float, default=0.0)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.kind == "bare":
        app = web.Application()
        app.router.add_post("/{tail:.*}", bare)
        web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
        return

    async def run_fake() -> None:
        fake = FakeOpenAI(latency=args.latency, chunk_delay=args.chunk_delay)
        fake.speech_mb = args.speech_mb
        await fake.start(port=args.port)
        await asyncio.Event().wait()

    asyncio.run(run_fake())


if __name__ == "__main__":
    main()
