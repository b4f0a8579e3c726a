"""Processes the benchmarks run: a bare aiohttp app and a bare aiohttp pass-through proxy (the
yardsticks), and the fake upstream."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
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


def bare_proxy(upstream: str) -> web.Application:
    """A bare aiohttp pass-through proxy: read the body, one shared ClientSession, stream the
    answer back. No key, no cache, no log: the yardstick of a MISS."""
    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with session.request(
            request.method, upstream + request.path_qs, headers=headers, data=body
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "date"):
                    resp.headers[k] = v
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["bare", "fake", "bare-proxy"])
    p.add_argument("--upstream", default="")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--speech-mb", type=float, default=0.0)
    p.add_argument("--judge-says", default="", help="the chat reply of the model 'judge'")
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
    if args.kind == "bare-proxy":
        web.run_app(
            bare_proxy(args.upstream.rstrip("/")),
            host="127.0.0.1",
            port=args.port,
            print=None,
            access_log=None,
        )
        return

    async def run_fake() -> None:
        fake = FakeOpenAI(latency=args.latency, chunk_delay=args.chunk_delay, chunks=args.chunks)
        fake.speech_mb = args.speech_mb
        if args.judge_says:
            fake.model_replies["judge"] = args.judge_says
        await fake.start(port=args.port)
        await asyncio.Event().wait()

    asyncio.run(run_fake())


if __name__ == "__main__":
    main()
