"""Twins keep every field the API returns (function_call, audio, annotations, logprobs,
refusal, n > 1, usage), through the official Python and Node SDKs and their own stream
accumulators, against an upstream that answers with all of them."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import BackgroundLoop, sdk
from tests.unit.test_twins_property import completion

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
USAGE = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}
RICH: dict[str, Any] = {
    "id": "chatcmpl-rich",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-audio-preview",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "function_call": {"name": "lookup", "arguments": '{"q": "weather"}'},
                "audio": {
                    "id": "audio_1",
                    "data": "UklGRiQAAABXQVZF",
                    "expires_at": 1_700_003_600,
                    "transcript": "Hello there",
                },
            },
            "logprobs": {
                "content": [
                    {"token": "Hello", "logprob": -0.25, "bytes": [72, 101], "top_logprobs": []},
                    {"token": " there", "logprob": -1.5, "bytes": [32], "top_logprobs": []},
                ],
                "refusal": None,
            },
            "finish_reason": "function_call",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": "See the source.",
                "refusal": None,
                "annotations": [
                    {
                        "type": "url_citation",
                        "url_citation": {
                            "start_index": 8,
                            "end_index": 14,
                            "title": "Source",
                            "url": "https://example.com/source",
                        },
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "stop",
        },
        {
            "index": 2,
            "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": USAGE,
    "system_fingerprint": "fp_rich",
    "service_tier": "default",
}


def rich_stream(include_usage: bool) -> list[bytes]:
    """RICH as the API streams it: every string in pieces, choices interleaved."""
    base = {k: RICH[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")}
    base["object"] = "chat.completion.chunk"
    lp = RICH["choices"][0]["logprobs"]["content"]
    deltas: list[tuple[int, dict[str, Any], Any, Any]] = [
        (0, {"role": "assistant", "content": None, "refusal": None}, None, None),
        (1, {"role": "assistant", "content": "", "refusal": None}, None, None),
        (0, {"annotations": []}, None, None),
        (0, {"function_call": {"name": "lookup", "arguments": ""}}, None, None),
        (1, {"content": "See the "}, None, None),
        (0, {"function_call": {"arguments": '{"q": '}}, None, None),
        (0, {"audio": {"id": "audio_1", "transcript": "Hello", "data": "UklGRiQA"}}, None, None),
        (1, {"content": "source."}, None, None),
        (2, {"role": "assistant", "content": None, "refusal": ""}, None, None),
        (0, {"audio": {"transcript": " there", "data": "AABXQVZF"}}, None, None),
        (0, {"audio": {"expires_at": 1_700_003_600}}, {"content": lp[:1], "refusal": None}, None),
        (1, {"annotations": RICH["choices"][1]["message"]["annotations"]}, None, None),
        (2, {"refusal": "I can't "}, None, None),
        (0, {"function_call": {"arguments": '"weather"}'}}, {"content": lp[1:]}, None),
        (2, {"refusal": "help with that."}, None, None),
        (1, {}, None, "stop"),
        (0, {}, None, "function_call"),
        (2, {}, None, "stop"),
    ]
    out = []
    for i, delta, logprobs, finish in deltas:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunk: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if include_usage:
        out.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": USAGE}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


class RichUpstream:
    """An upstream whose every chat answer is RICH, whole or streamed; it counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(RICH, dumps=lambda o: orjson.dumps(o).decode())
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for chunk in rich_stream(usage):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
def rich(bg: BackgroundLoop) -> Iterator[RichUpstream]:
    up = RichUpstream()
    bg.run(up.start())
    yield up
    bg.run(up.stop())


def ask(prompt: str) -> dict[str, Any]:
    return {"model": "gpt-4o-audio-preview", "messages": [{"role": "user", "content": prompt}]}


def test_the_stream_as_json_keeps_every_field(start_proxy: Any, rich: RichUpstream) -> None:
    """A stored stream (with its usage), asked for whole through the Python SDK, is a HIT
    with function_call, audio, annotations (also []), logprobs, refusals and all choices."""
    proxy = start_proxy(upstream=rich.url)
    with sdk(proxy) as c:
        with c.chat.completions.stream(
            **ask("s->j"), stream_options={"include_usage": True}
        ) as stream:
            streamed = stream.get_final_completion()
        raw = c.chat.completions.with_raw_response.create(**ask("s->j"))
    assert raw.headers["x-cache-status"] == "HIT" and rich.calls == 1
    got = raw.parse()
    assert completion(got.model_dump(mode="json")) == completion(RICH)
    assert completion(streamed.model_dump(mode="json")) == completion(RICH)
    msg = got.choices[0].message
    assert msg.function_call is not None and msg.function_call.name == "lookup"
    assert msg.audio is not None and msg.audio.transcript == "Hello there"
    assert msg.annotations == [] and got.choices[0].finish_reason == "function_call"
    assert got.usage is not None and got.usage.total_tokens == 30


def test_the_json_as_a_stream_keeps_every_field(start_proxy: Any, rich: RichUpstream) -> None:
    """A stored JSON answer, asked for as a stream, is a HIT that the Python SDK's own
    accumulator adds up to the stored object, field for field."""
    proxy = start_proxy(upstream=rich.url)
    with sdk(proxy) as c:
        first = c.chat.completions.with_raw_response.create(**ask("j->s"))
        assert first.headers["x-cache-status"] == "MISS"
        with c.chat.completions.stream(
            **ask("j->s"), stream_options={"include_usage": True}
        ) as stream:
            final = stream.get_final_completion()
    assert rich.calls == 1  # (the helper hides its response's headers: no upstream call)
    assert completion(final.model_dump(mode="json")) == completion(RICH)


def test_a_stream_without_usage_is_not_served_as_json(start_proxy: Any, rich: RichUpstream) -> None:
    """A stream stored without include_usage cannot give a JSON answer its usage: the JSON
    request goes upstream (its answer replaces the entry), never a HIT without usage."""
    proxy = start_proxy(upstream=rich.url)
    with sdk(proxy) as c:
        with c.chat.completions.with_streaming_response.create(**ask("bare"), stream=True) as r:
            assert r.headers["x-cache-status"] == "MISS"
            list(r.parse())
        raw = c.chat.completions.with_raw_response.create(**ask("bare"))
        assert raw.headers["x-cache-status"] == "MISS"
        got = raw.parse()
        assert got.usage is not None and got.usage.total_tokens == 30
        again = c.chat.completions.with_raw_response.create(**ask("bare"))
        assert again.headers["x-cache-status"] == "HIT"
        with c.chat.completions.with_streaming_response.create(**ask("bare"), stream=True) as r:
            assert r.headers["x-cache-status"] == "HIT"  # the JSON serves the bare stream
    assert rich.calls == 2


@pytest.fixture(scope="session")
def node() -> Path:
    found = shutil.which("node")
    if found is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        npm = shutil.which("npm")
        if found is None or npm is None:
            pytest.fail("node and npm are needed for the Node SDK test")
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    assert found is not None
    return Path(found)


def test_node_sdk_twins_keep_every_field(node: Path, start_proxy: Any, rich: RichUpstream) -> None:
    """Through the official Node SDK: a stored stream asked for whole, and a stored JSON answer
    asked for as a stream (the SDK's finalChatCompletion), both equal the upstream's object."""
    proxy = start_proxy(upstream=rich.url)
    done = subprocess.run(
        [str(node), "twins.mjs", proxy.base_url],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    assert out["stream_to_json"]["status"] == "HIT"
    assert completion(out["stream_to_json"]["completion"]) == completion(RICH)
    assert out["json_to_stream"]["status"] == "HIT"
    # The Node SDK's finalChatCompletion keeps only content, function_call and audio of a
    # legacy function_call message (not its annotations), whatever the stream carried.
    node_view = orjson.loads(orjson.dumps(RICH))
    del node_view["choices"][0]["message"]["annotations"]
    assert completion(out["json_to_stream"]["completion"]) == completion(node_view)
    assert rich.calls == 2
