"""The provider's prompt-cache hit rate with and without `prompt_cache_key = "auto"`.

    python -m bench.prompt_cache_bench [--requests 400] [--prefixes 10] [--machines 64]

The fake upstream simulates the provider's prompt cache (FakeOpenAI.prompt_cache_machines):
`--machines` machines, each remembering the prefixes it served; a request with a
`prompt_cache_key` goes to the machine its key hashes to, one without is spread over the
machines in turn. `--prefixes` apps (system prompts of ~1,500 tokens) send `--requests`
chat requests in all, interleaved, each with a new user message, so every one is a proxy MISS
and goes upstream. Reported per run (a `python -m proxy` with the option off, then on): the
share of upstream calls whose usage reported cached tokens, the cached share of input tokens,
and the dollars the provider's cache saved (the proxy's own /_proxy/stats).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import aiohttp
import orjson

from bench.common import proxy
from proxy.testing import FakeOpenAI

HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}


def system_prompt(app: int) -> str:
    return f"You are the assistant of app {app}. Follow the house style guide closely. " * 90


async def run(base: str, requests: int, prefixes: int) -> dict[str, float]:
    hits = cached = prompt = 0
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            nonlocal hits, cached, prompt
            body = {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": system_prompt(i % prefixes)},
                    {"role": "user", "content": f"question number {i}"},
                ],
            }
            async with (
                sem,
                s.post(
                    base + "/v1/chat/completions", data=orjson.dumps(body), headers=HEADERS
                ) as r,
            ):
                usage = (await r.json())["usage"]
            got = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            hits += got > 0
            cached += got
            prompt += usage["prompt_tokens"]

        await asyncio.gather(*(one(i) for i in range(requests)))
        async with s.get(base + "/_proxy/stats") as r:
            stats = await r.json()
    return {
        "provider_hit_rate": round(hits / requests, 3),
        "cached_input_share": round(cached / max(prompt, 1), 3),
        "provider_saved_usd": stats["provider_cache"]["saved_usd"],
        "spent_usd": stats["spent_usd"],
    }


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--prefixes", type=int, default=10)
    p.add_argument("--machines", type=int, default=64)
    args = p.parse_args()
    for auto in (False, True):
        fake = FakeOpenAI(prompt_cache_machines=args.machines)
        upstream = await fake.start()
        rules = Path(tempfile.mkdtemp(prefix="ocp-bench-")) / "rules.toml"
        option = 'prompt_cache_key = "auto"\n' if auto else ""
        rules.write_text(f'[[rule]]\nroute = "/v1/chat/completions"\n{option}')
        try:
            with proxy(upstream, "--rules", str(rules), "--cache", "memory://") as base:
                result = await run(base, args.requests, args.prefixes)
        finally:
            await fake.stop()
        label = 'prompt_cache_key = "auto"' if auto else "option off"
        print(f"{label:28} {orjson.dumps(result).decode()}")


if __name__ == "__main__":
    asyncio.run(main())
