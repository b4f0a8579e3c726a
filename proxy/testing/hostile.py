"""HostileUpstream: an OpenAI-like upstream on raw asyncio that misbehaves on purpose.

Written on bare sockets (not aiohttp's server) so it can do what no well-behaved server does:
lie about Content-Length, send broken JSON under a 200, ignore `Expect: 100-continue`. What it
answers is chosen by the request's `model`:

- any model: a chat completion whose content echoes the last user message and names the
  credential it saw, Azure-style (`api-key` only; without it: 401), so an answer served to the
  wrong body or the wrong tenant is visible;
- `lie-short`: Content-Length larger than the body it sends, then it closes the connection;
- `lie-long`: Content-Length smaller than the body it sends;
- `broken-json`: 200 with a body that is not JSON;
- `error-200`: 200 with an OpenAI error object as the body;
- `status-NNN`: that status with an OpenAI error body.

Every request is recorded (`requests`: method, path, headers, body as received) for assertions
on what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field

import orjson


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HostileUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def calls(self, path_suffix: str = "") -> int:
        return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                got = await _read_request(reader)
                if got is None:
                    break
                self.requests.append(got)
                keep = await self._answer(got, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, req: Received, writer: asyncio.StreamWriter) -> bool:
        if req.path.endswith("/models"):
            _write(writer, 200, orjson.dumps({"object": "list", "data": []}))
            await writer.drain()
            return True
        key = req.headers.get("api-key")
        if not key:
            _write(writer, 401, _error("Access denied: missing api-key.", "invalid_api_key"))
            await writer.drain()
            return True
        try:
            doc = orjson.loads(req.body) if req.body else {}
        except orjson.JSONDecodeError:
            _write(writer, 400, _error("We could not parse the JSON body.", "invalid_json"))
            await writer.drain()
            return True
        model = str(doc.get("model", "")) if isinstance(doc, dict) else ""
        if model.startswith("status-"):
            _write(writer, int(model[7:]), _error(f"forced {model}", model))
            await writer.drain()
            return True
        answer = _echo(doc, key)
        if model == "broken-json":
            _write(writer, 200, answer[:-7] + b"#broken")
        elif model == "error-200":
            _write(writer, 200, _error("An error under a 200.", "server_error"))
        elif model == "lie-short":
            _write(writer, 200, answer, length=len(answer) + 50, close=True)
            await writer.drain()
            return False  # close: the promised bytes never come
        elif model == "lie-long":
            _write(writer, 200, answer, length=len(answer) - 10, close=True)
            await writer.drain()
            return False
        else:
            _write(writer, 200, answer)
        await writer.drain()
        return True


def _echo(doc: object, api_key: str) -> bytes:
    prompt = ""
    if isinstance(doc, dict):
        messages = doc.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            prompt = str(messages[-1].get("content", ""))
        elif "input" in doc:
            prompt = str(doc["input"])
    who = hashlib.sha256(api_key.encode()).hexdigest()[:8]
    body = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 0,
        "model": doc.get("model", "") if isinstance(doc, dict) else "",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"echo[{who}]: {prompt}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return orjson.dumps(body)


def _error(message: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "x", "param": None, "code": code}})


def _write(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    length: int | None = None,
    close: bool = False,
) -> None:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
    if close:
        head += "Connection: close\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    writer.write(head.encode() + body)


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    """One HTTP/1.1 request; Expect is deliberately ignored (no 100 Continue is ever sent)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        data = bytes(body)
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
    return Received(method, path, headers, data)
