"""FakeOpenAI: an aiohttp app that answers like the OpenAI API and counts every call.

It serves chat (JSON and SSE, with usage), legacy completions, the Responses API (JSON and
named SSE events), embeddings (float or base64), models, images (URLs that expire, b64_json,
multipart edits), speech and moderations, plus the real recorded answers under recorded/.
Knobs, set on the instance while it runs:

- `latency` (seconds before the head; `latencies` for the next calls one by one),
  `chunk_delay` (between stream chunks), `chunks`;
- `errors`: a list of (status, body) answers to give next, one per request;
- `cut_after`: streams stop after N chunks without their terminal event (and the connection
  is cut); `error_after`: an `error` event after N chunks; `fail_responses`: a Responses
  stream ends with `response.failed`;
- `hold(*paths)` / `release()` (from any thread): requests (to those paths) are counted, then
  wait until released;
- `path_latency` / `path_errors`: one path is slow, or answers an error status;
- embeddings are a hashed bag of words (`bag_of_words`): paraphrases embed alike;
- `image_ttl_s`: how long image URLs work (like OpenAI's 60 minutes).

Per request, the model name can ask for a behaviour too: `fake-error-429` answers that status;
`recorded` replays the recorded real stream for chat and responses; `recorded-tools` answers
the recorded real tool call (JSON, or streamed when asked).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.normalize import multipart_fields, parse_multipart

RECORDED = Path(__file__).parent / "recorded"
CALL_N = web.RequestKey("n", int)
BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("json", dict)


@functools.cache
def recorded(name: str) -> dict[str, Any]:
    """The first interaction of a recorded fixture: {"request": ..., "response": ...}."""
    data: dict[str, Any] = orjson.loads((RECORDED / f"{name}.json").read_bytes())
    interaction: dict[str, Any] = data["interactions"][0]
    return interaction


EMBEDDING_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
"""The real models' dimensions, so the semantic index is measured at its real size."""
STOPWORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "and",
        "or",
        "what",
        "what's",
        "whats",
        "which",
        "who",
        "how",
        "do",
        "does",
        "did",
        "me",
        "my",
        "i",
        "you",
        "your",
        "please",
        "tell",
        "can",
        "could",
        "would",
        "will",
        "it",
        "its",
        "it's",
        "this",
        "that",
        "about",
        "give",
        "say",
        "show",
        "explain",
        "not",
        "no",
        "never",
        "n't",
    }
)
"""Left out of the fake's embeddings: a paraphrase in other small words embeds the same. So
do negations, as with real embeddings, where "is X" and "is X not" are close: the proxy's
guards have to tell them apart."""


def bag_of_words(item: Any, dims: int) -> list[float]:
    """A deterministic "semantic" embedding: hashed bag of words (lower-case, plural -s
    dropped, stopwords left out), unit length. Texts with the same content words embed the
    same; one different word in a few lowers the cosine clearly."""
    text = item if isinstance(item, str) else orjson.dumps(item).decode()
    vec = [0.0] * dims
    for word in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dims
        vec[index] += 1.0 if digest[4] & 1 else -1.0
    norm = sum(v * v for v in vec) ** 0.5
    if norm == 0:
        vec[0], norm = 1.0, 1.0
    return [v / norm for v in vec]


def make_png(seed: int, size: int = 16) -> bytes:
    """A small valid PNG whose colour depends on `seed` (so images differ)."""
    r, g, b = (seed * 73) % 256, (seed * 151) % 256, (seed * 199 + 40) % 256
    row = b"\x00" + bytes((r, g, b)) * size
    raw = row * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def error_json(status: int, message: str, type_: str, code: str | None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return web.Response(status=status, body=body, content_type="application/json")


@dataclass
class Call:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class FakeOpenAI:
    latency: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 8
    image_ttl_s: float = 3600.0
    image_url: str | None = None
    """If set, every image answer carries this URL instead of one on the fake's blob host."""
    errors: list[tuple[int, bytes]] = field(default_factory=list)
    gzip: bool = False
    """Compress JSON answers (Content-Encoding: gzip), as the real API does."""
    revoked_keys: set[str] = field(default_factory=lambda: {"sk-bad"})
    """API keys this fake answers 401 to (like revoked or wrong keys)."""
    latencies: list[float] = field(default_factory=list)
    """Per-call latencies for the next calls, used before `latency`."""
    path_latency: dict[str, float] = field(default_factory=dict)
    """Seconds before answering one path, instead of `latency` (a slow or a fast embeddings
    service, say)."""
    path_errors: dict[str, int] = field(default_factory=dict)
    """A status every call to one path answers (a failing embeddings service, say)."""
    cut_after: int | None = None
    error_after: int | None = None
    fail_responses: bool = False
    _gate: asyncio.Event | None = None
    _held_paths: frozenset[str] = frozenset()
    _loop: asyncio.AbstractEventLoop | None = None
    calls: list[Call] = field(default_factory=list)
    image_downloads: list[str] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    """time.monotonic() at which each stream chunk was written (all streams, in order)."""
    base_url: str = ""
    speech_mb: float = 0.0
    """When above 0, /v1/audio/speech answers this many MB (a large answer)."""
    model_replies: dict[str, str] = field(default_factory=dict)
    """Chat Completions for these models answer this text (a judge model saying yes, say)."""
    prompt_cache_machines: int = 0
    """When above 0, chat and Responses simulate the provider's prompt cache over this many
    machines (see `_prompt_cached`); their usage then reports `cached_tokens`."""
    prompt_cache_min_tokens: int = 1024
    """The shortest stable prefix (in the fake's tokens, 4 bytes each) that is cached."""
    _prompt_caches: list[set[bytes]] = field(default_factory=list)
    _spread: int = 0
    _runner: web.AppRunner | None = None
    _n: int = 0

    @property
    def netloc(self) -> str:
        """host:port, as --image-source-hosts takes it for a non-default port."""
        return self.base_url.split("://", 1)[1]

    # -- running it ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for path in RECORDED.glob("*.json"):  # read now, not later on the event loop
            recorded(path.stem)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/openai/deployments/{deployment}/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/responses", self.responses)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model)
        r.add_post("/v1/images/generations", self.images)
        r.add_post("/v1/images/edits", self.images)
        r.add_post("/v1/images/variations", self.images)
        r.add_get("/blob/{name}", self.blob)
        r.add_get("/_fake/stats", self.fake_stats)
        r.add_post("/v1/audio/speech", self.speech)
        r.add_post("/v1/moderations", self.moderations)
        r.add_route("*", "/{tail:.*}", self.not_found)
        app.middlewares.append(self._middleware)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0: a free port); returns the base URL (no /v1)."""
        self._loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sock = server.sockets[0]  # type: ignore[attr-defined]
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        self.release()  # a request still held would keep the runner's cleanup waiting
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def hold(self, *paths: str) -> None:
        """From now on every request (to one of `paths`, if given) is counted, then waits
        until release(): a test orders what happens while an answer is pending by the
        upstream's own count, not by a sleep."""
        self._held_paths = frozenset(paths)
        if self._gate is None:  # (held again: the requests already waiting keep their gate)
            self._gate = asyncio.Event()

    def release(self) -> None:
        """Let the held requests go on, from any thread (the gate is set on the fake's loop:
        asyncio.Event is not thread-safe)."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        if self._loop is None or self._loop.is_closed():
            gate.set()
        else:
            self._loop.call_soon_threadsafe(gate.set)

    def count(self, path: str | None = None) -> int:
        """Calls so far, to one path or to any API path (image downloads are not calls)."""
        return sum(1 for c in self.calls if path is None or c.path == path)

    # -- plumbing -----------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(("/blob/", "/_fake/")):
            result: web.StreamResponse = await handler(request)
            return result
        body = await request.read()
        self.calls.append(
            Call(request.method, request.path, request.query_string, dict(request.headers), body)
        )
        self._n += 1
        request[CALL_N] = self._n
        gate = self._gate
        if gate is not None and (not self._held_paths or request.path in self._held_paths):
            await gate.wait()
        delay = self.latencies.pop(0) if self.latencies else self.latency
        delay = self.path_latency.get(request.path, delay)
        if delay:
            await asyncio.sleep(delay)
        if request.path in self.path_errors:
            status = self.path_errors[request.path]
            return error_json(status, f"Fake error {status}.", "fake_error", f"fake_{status}")
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") in self.revoked_keys:
            rec = recorded("chat_completion_error")["response"]
            return web.Response(
                status=401, body=rec["body_text"].encode(), content_type="application/json"
            )
        if self.errors:
            status, err = self.errors.pop(0)
            return web.Response(status=status, body=err, content_type="application/json")
        parsed = orjson.loads(body) if body and request.content_type.endswith("json") else {}
        request[BODY] = parsed if isinstance(parsed, dict) else {}
        model = request[BODY].get("model", "")
        if isinstance(model, str) and model.startswith("fake-error-"):
            status = int(model.rsplit("-", 1)[1])
            return error_json(status, f"Fake error {status}.", "fake_error", f"fake_{status}")
        result = await handler(request)
        if self.gzip and isinstance(result, web.Response):
            result.enable_compression(web.ContentCoding.gzip)
        return result

    def _headers(self, n: int) -> dict[str, str]:
        return {
            "x-request-id": f"req_fake_{n}",
            "openai-processing-ms": "12",
            "openai-version": "2020-10-01",
            "x-ratelimit-remaining-requests": str(10000 - n),
            "x-ratelimit-limit-requests": "10000",
        }

    async def _sse(
        self, request: web.Request, events: list[bytes], terminal: bytes | None
    ) -> web.StreamResponse:
        """Send events one by one, honouring cut_after / error_after / chunk_delay."""
        headers = self._headers(request[CALL_N])
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        resp = web.StreamResponse(status=200, headers=headers)
        await resp.prepare(request)
        for i, event in enumerate(events):
            if self.cut_after is not None and i >= self.cut_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            if self.error_after is not None and i >= self.error_after:
                err = {"error": {"message": "The server had an error.", "type": "server_error"}}
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
                return resp
            if i and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            try:
                await resp.write(event)
            except ConnectionResetError:  # the client (a proxy instance) went away
                return resp
            self.sent.append(time.monotonic())
        if terminal is not None:
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            await resp.write(terminal)
        await resp.write_eof()
        return resp

    def _words(self, prompt: str, n: int) -> list[str]:
        base = f"Answer {n} to {hashlib.sha256(prompt.encode()).hexdigest()[:8]}:"
        words = [base] + [f" word{i}" for i in range(1, self.chunks)]
        return words[: self.chunks]

    def _prompt_cached(self, req: dict[str, Any], items_key: str) -> tuple[int, int]:
        """(prompt tokens of the stable prefix, of them cached) under the simulated provider
        prompt cache. The prefix is the leading system/developer messages (or input items),
        `instructions` and `tools`. A request with a `prompt_cache_key` is routed to the
        machine that key hashes to; one without is spread over the machines in turn (as the
        provider spreads load it cannot pin). A machine reports the prefix cached when it has
        seen that prefix before, in steps of 128 tokens from `prompt_cache_min_tokens`."""
        if self.prompt_cache_machines <= 0:
            return 0, 0
        items = req.get(items_key)
        lead = []
        if isinstance(items, list):
            for item in items:
                if not isinstance(item, dict) or item.get("role") not in ("system", "developer"):
                    break
                lead.append(item)
        prefix = orjson.dumps([lead, req.get("instructions"), req.get("tools")])
        tokens = len(prefix) // 4
        if tokens < self.prompt_cache_min_tokens:
            return tokens, 0
        while len(self._prompt_caches) < self.prompt_cache_machines:
            self._prompt_caches.append(set())
        key = req.get("prompt_cache_key")
        if isinstance(key, str):
            machine = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        else:
            machine, self._spread = self._spread, self._spread + 1
        seen = self._prompt_caches[machine % self.prompt_cache_machines]
        digest = hashlib.sha256(prefix).digest()
        if digest in seen:
            return tokens, tokens - tokens % 128
        seen.add(digest)
        return tokens, 0

    # -- routes -------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        """Chat Completions: a chat.completion, or its chunk stream (with a usage chunk when
        `stream_options.include_usage` asks); the "recorded" models replay real answers."""
        req, n = request[BODY], request[CALL_N]
        model = req.get("model", "gpt-4o-mini")
        if model in ("recorded", "recorded-tools"):
            return await self._recorded_chat(request, model)
        prompt = orjson.dumps(req.get("messages", []))
        words = self._words(prompt.decode(), n)
        if model in self.model_replies:
            words = [self.model_replies[model]]
        usage: dict[str, Any] = {
            "prompt_tokens": len(prompt) // 4 + 1,
            "completion_tokens": len(words),
            "total_tokens": len(prompt) // 4 + 1 + len(words),
        }
        if self.prompt_cache_machines:
            _, cached = self._prompt_cached(req, "messages")
            usage["prompt_tokens_details"] = {"cached_tokens": min(cached, len(prompt) // 4)}
        base = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": 1_700_000_000 + n,
            "model": model,
        }
        if not req.get("stream"):
            body = {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(words)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return web.json_response(body, headers=self._headers(n), dumps=_dumps)
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        events = _chat_chunks(
            {**base, "object": "chat.completion.chunk"}, words, usage, include_usage
        )
        return await self._sse(request, events, b"data: [DONE]\n\n")

    async def _recorded_chat(self, request: web.Request, model: str) -> web.StreamResponse:
        """A real recorded answer: a stream using the prompt cache ("recorded"), or a tool
        call in the form asked for ("recorded-tools")."""
        if model == "recorded-tools" and not request[BODY].get("stream"):
            rec = recorded("chat_completion_tool_call")["response"]
            return web.Response(body=rec["body_text"].encode(), content_type="application/json")
        name = (
            "chat_completion_stream_prompt_caching_cache_read"
            if model == "recorded"
            else "chat_completion_tool_call_streamed"
        )
        rec = recorded(name)["response"]
        events = [e + b"\n\n" for e in rec["body_text"].encode().split(b"\n\n") if e]
        return await self._sse(request, events, None)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req, n = request[BODY], request[CALL_N]
        words = self._words(str(req.get("prompt", "")), n)
        base = {
            "id": f"cmpl-fake-{n}",
            "object": "text_completion",
            "created": n,
            "model": req.get("model", "gpt-3.5-turbo-instruct"),
        }
        if not req.get("stream"):
            body = {
                **base,
                "choices": [
                    {"index": 0, "text": "".join(words), "finish_reason": "stop", "logprobs": None}
                ],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(words),
                    "total_tokens": 5 + len(words),
                },
            }
            return web.json_response(body, headers=self._headers(n), dumps=_dumps)
        events = [
            b"data: "
            + orjson.dumps(
                {
                    **base,
                    "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}],
                }
            )
            + b"\n\n"
            for w in words
        ]
        return await self._sse(request, events, b"data: [DONE]\n\n")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: a response, or its event stream (ending in response.failed
        with `fail_responses`); the "recorded" model replays a real stream."""
        req, n = request[BODY], request[CALL_N]
        model = req.get("model", "gpt-4.1")
        if model == "recorded":
            rec = recorded("response_stream")["response"]
            events = [e + b"\n\n" for e in rec["body_text"].encode().split(b"\n\n") if e]
            return await self._sse(request, events, None)
        words = self._words(orjson.dumps(req.get("input", "")).decode(), n)
        prefix_tokens, cached = self._prompt_cached(req, "input")
        usage = {
            "input_tokens": 11 + prefix_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": len(words),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 11 + len(words),
        }
        answer = _Answer(f"resp_fake_{n}", f"msg_fake_{n}", 1_700_000_000 + n, model, usage, words)
        if not req.get("stream"):
            body = answer.response("completed", [answer.message()], True)
            return web.json_response(body, headers=self._headers(n), dumps=_dumps)
        stream = _Numbered()
        events = answer.events(stream)
        if self.fail_responses:
            failed = answer.response("failed", [], False)
            failed["error"] = {"code": "server_error", "message": "The model failed."}
            terminal = stream.event("response.failed", response=failed)
        else:
            done = answer.response("completed", [answer.message()], True)
            terminal = stream.event("response.completed", response=done)
        return await self._sse(request, events, terminal)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        req, n = request[BODY], request[CALL_N]
        inputs = req.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        model = str(req.get("model", ""))
        dims = int(req.get("dimensions") or EMBEDDING_DIMS.get(model, 256))
        data = []
        for i, item in enumerate(items):
            vec = bag_of_words(item, dims)
            emb: Any = vec
            if req.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        body = {
            "object": "list",
            "data": data,
            "model": req.get("model", ""),
            "usage": {"prompt_tokens": 4 * len(items), "total_tokens": 4 * len(items)},
        }
        return web.json_response(body, headers=self._headers(n), dumps=_dumps)

    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}
            for m in ("gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "dall-e-3")
        ]
        return web.json_response(
            {"object": "list", "data": data}, headers=self._headers(request[CALL_N]), dumps=_dumps
        )

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if name.startswith("missing"):
            return error_json(
                404,
                f"The model '{name}' does not exist",
                "invalid_request_error",
                "model_not_found",
            )
        return web.json_response(
            {"id": name, "object": "model", "created": 1, "owned_by": "fake"},
            headers=self._headers(request[CALL_N]),
            dumps=_dumps,
        )

    async def images(self, request: web.Request) -> web.StreamResponse:
        n = request[CALL_N]
        if request.content_type == "multipart/form-data":
            raw = await request.read()  # already read by the middleware: no second read
            parts = parse_multipart(raw, request.headers["Content-Type"])
            req: dict[str, Any] = multipart_fields(parts)
        else:
            req = request[BODY]
        if req.get("stream") in (True, "true"):
            return await self._image_stream(request, req)
        count = int(req.get("n") or 1)
        model = str(req.get("model") or "dall-e-2")
        fmt = req.get("response_format") or ("b64_json" if model.startswith("gpt-image") else "url")
        expires = int(time.time() + self.image_ttl_s)
        data: list[dict[str, Any]] = []
        for i in range(count):
            if fmt == "b64_json":
                data.append({"b64_json": base64.b64encode(make_png(n * 10 + i)).decode()})
            else:
                url = self.image_url or (
                    f"{self.base_url}/blob/img-{n}-{i}.png?se={expires}&sig=fake{n}"
                )
                data.append({"url": url, "revised_prompt": req.get("prompt")})
        body: dict[str, Any] = {"created": 1_700_000_000 + n, "data": data}
        if model.startswith("gpt-image"):
            body["usage"] = {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}
        return web.json_response(body, headers=self._headers(n), dumps=_dumps)

    async def _image_stream(self, request: web.Request, req: dict[str, Any]) -> web.StreamResponse:
        """gpt-image streaming: partial images, then image_generation.completed (edits:
        image_edit.*)."""
        n = request[CALL_N]
        kind = "image_edit" if request.path.endswith("/edits") else "image_generation"
        partials = int(req.get("partial_images") or 2)
        events = []
        for i in range(partials):
            data = {
                "type": f"{kind}.partial_image",
                "partial_image_index": i,
                "b64_json": base64.b64encode(make_png(n * 10 + i)).decode(),
            }
            events.append(
                f"event: {kind}.partial_image\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
            )
        done = {
            "type": f"{kind}.completed",
            "b64_json": base64.b64encode(make_png(n)).decode(),
            "usage": {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170},
        }
        terminal = f"event: {kind}.completed\n".encode() + b"data: " + orjson.dumps(done) + b"\n\n"
        return await self._sse(request, events, terminal)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """The image host: serves PNGs until their `se` expiry, then 403 like Azure Blob."""
        name = request.match_info["name"]
        self.image_downloads.append(name)
        try:
            expires = int(request.query.get("se", "0"))
        except ValueError:
            expires = 0
        if time.time() > expires:
            return web.Response(
                status=403,
                content_type="application/xml",
                text="<Error><Code>AuthenticationFailed</Code></Error>",
            )
        parts = name.removesuffix(".png").split("-")
        seed = int(parts[1]) * 10 + int(parts[2])
        return web.Response(body=make_png(seed), content_type="image/png")

    async def fake_stats(self, request: web.Request) -> web.StreamResponse:
        """Not an OpenAI route: how many calls the fake has answered (for benchmarks, the demo)."""
        by_path: dict[str, int] = {}
        for call in self.calls:
            by_path[call.path] = by_path.get(call.path, 0) + 1
        return web.json_response(
            {
                "calls": len(self.calls),
                "by_path": by_path,
                "image_downloads": len(self.image_downloads),
            },
            dumps=_dumps,
        )

    async def speech(self, request: web.Request) -> web.StreamResponse:
        req, n = request[BODY], request[CALL_N]
        audio = b"ID3\x04\x00" + hashlib.sha256(str(req.get("input")).encode()).digest() * 64
        resp = web.StreamResponse(headers={**self._headers(n), "Content-Type": "audio/mpeg"})
        await resp.prepare(request)
        if self.speech_mb > 0:  # a large answer, sent in 1 MB pieces
            piece = (audio * (1024 * 1024 // len(audio) + 1))[: 1024 * 1024]
            for _ in range(int(self.speech_mb)):
                await resp.write(piece)
            await resp.write_eof()
            return resp
        for i in range(0, len(audio), 512):
            await resp.write(audio[i : i + 512])
        await resp.write_eof()
        return resp

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        rec = recorded("moderation")["response"]
        return web.Response(
            body=rec["body_text"].encode(),
            content_type="application/json",
            headers=self._headers(request[CALL_N]),
        )

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return error_json(
            404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None
        )


def _chat_chunks(
    base: dict[str, Any], words: list[str], usage: dict[str, Any], include_usage: bool
) -> list[bytes]:
    """A fake chat stream's chunk events: a word each (the role in the first, the
    finish_reason in the last), then the usage chunk when asked."""
    events = []
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": word}
        if i == 0:
            delta["role"] = "assistant"
        finish = "stop" if i == len(words) - 1 else None
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if include_usage:
        last = {**base, "choices": [], "usage": usage}
        events.append(b"data: " + orjson.dumps(last) + b"\n\n")
    return events


class _Numbered:
    """Responses API events, numbered in the order they are made."""

    def __init__(self) -> None:
        self.seq = 0

    def event(self, kind: str, **data: Any) -> bytes:
        """One event of type `kind` with the next sequence number."""
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass(frozen=True, slots=True)
class _Answer:
    """One fake Responses API answer: a single message of `words`."""

    rid: str
    mid: str
    created_at: int
    model: str
    usage: dict[str, Any]
    words: list[str]

    def message(self) -> dict[str, Any]:
        """The answer's one output item."""
        text = "".join(self.words)
        return {
            "type": "message",
            "id": self.mid,
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }

    def response(self, status: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        """The response object in `status` with this output."""
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "temperature": 1.0,
            "top_p": 1.0,
            "metadata": {},
            "usage": self.usage if with_usage else None,
        }

    def events(self, stream: _Numbered) -> list[bytes]:
        """The stream's events up to the terminal one: created, in progress, the message
        added, its text a word per delta, done."""
        message, text = self.message(), "".join(self.words)
        at = {"item_id": self.mid, "output_index": 0, "content_index": 0}
        start = self.response("in_progress", [], False)
        events = [
            stream.event("response.created", response=start),
            stream.event("response.in_progress", response=start),
            stream.event(
                "response.output_item.added",
                output_index=0,
                item={**message, "status": "in_progress", "content": []},
            ),
            stream.event(
                "response.content_part.added",
                **at,
                part={"type": "output_text", "text": "", "annotations": []},
            ),
        ]
        events += [
            stream.event("response.output_text.delta", **at, delta=w, logprobs=[])
            for w in self.words
        ]
        events += [
            stream.event("response.output_text.done", **at, text=text, logprobs=[]),
            stream.event(
                "response.content_part.done",
                **at,
                part={"type": "output_text", "text": text, "annotations": []},
            ),
            stream.event("response.output_item.done", output_index=0, item=message),
        ]
        return events


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def main(argv: list[str]) -> int:
    """python -m proxy fake-upstream: serve the fake OpenAI API until Ctrl-C."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m proxy fake-upstream",
        description="Serve the fake OpenAI API the tests and the demo use: chat (streamed or "
        "not), completions, responses, embeddings, images, models, moderations, speech, "
        "from recorded real answers. Any API key works but sk-bad (401). Run the proxy in "
        "front of it with --upstream http://HOST:PORT to try everything without a key.",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address [default: 127.0.0.1]")
    p.add_argument("--port", type=int, default=8081, help="listen port [default: 8081]")
    p.add_argument(
        "--latency", type=float, default=0.25, help="seconds before each answer [default: 0.25]"
    )
    args = p.parse_args(argv)
    fake = FakeOpenAI(latency=args.latency)

    async def run() -> None:
        try:
            url = await fake.start(args.host, args.port)
        except OSError as exc:
            print(
                f"openai-cache-proxy fake-upstream: cannot listen on {args.host}:{args.port}: "
                f"{exc.strerror or exc}; choose another --port",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        print(
            f"fake OpenAI upstream on {url}: python -m proxy --upstream {url} "
            f"(clients: any key; sk-bad is refused)",
            file=sys.stderr,
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
