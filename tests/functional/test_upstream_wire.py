"""The upstream connection against a raw upstream that misbehaves on purpose, through the real
`python -m proxy` process (issue 23): no answer reaches a request it was not made for, no
POST is sent twice, writing has a deadline, a cut compressed answer is never stored,
hop-by-hop headers stay, any OpenAI-compatible base URL works, HEAD, egress proxies, and the
credential re-check."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import orjson
import pytest

from proxy.testing.desync import SPEECH, Behaviour, Request, ScriptedUpstream, who
from tests.conftest import BackgroundLoop
from tests.helpers import Proc, body_of, eventually, header, raw, status_of

CHAT = "/v1/chat/completions"


@pytest.fixture
def upstream(bg: BackgroundLoop) -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    bg.run(up.start())
    yield up
    bg.run(up.stop())


@pytest.fixture
def start(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory: `python -m proxy` in front of `upstream` (or another base URL), with flags."""
    procs: list[Proc] = []

    def run(*flags: str, base: str | None = None) -> Proc:
        p = Proc(base or upstream.base_url, tmp_path / f"data{len(procs)}", *flags)
        procs.append(p)
        return p

    yield run
    for p in procs:
        if p.proc.poll() is None:
            p.stop()


def script(*steps: Behaviour) -> Callable[[Request], Behaviour]:
    """Behaviours for the chat requests in turn (then NORMAL); other routes are NORMAL."""
    queue = iter(steps)

    def behave(req: Request) -> Behaviour:
        if not req.path.endswith("/chat/completions"):
            return Behaviour.NORMAL
        return next(queue, Behaviour.NORMAL)

    return behave


def sdk(proc: Proc, key: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url + "/v1", api_key=key, max_retries=0, **kw)  # type: ignore[arg-type]


def ask(client: openai.OpenAI, prompt: str) -> str:
    got: object = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
    )
    if not isinstance(got, openai.types.chat.ChatCompletion):
        return ""  # an answer without a body (a 204)
    return got.choices[0].message.content or ""


def named(key: str) -> str:
    return f"[who:{who({'authorization': f'Bearer {key}'})}]"


def dropped(proc: Proc) -> None:
    """Wait until the proxy has logged closing a connection for bytes no request asked for
    (http1's upstream.unsolicited), however slow the machine: the next request then comes
    after them, on a new connection."""
    eventually(lambda: b'"upstream.unsolicited"' in b"".join(proc._out))


@pytest.mark.parametrize(
    "misbehaviour",
    [Behaviour.EXTRA_SAME_WRITE, Behaviour.EXTRA_LATE, Behaviour.BODY_AFTER_204],
    ids=lambda b: b.value,
)
def test_an_answer_nobody_asked_for_never_reaches_a_request(
    upstream: ScriptedUpstream, start: Callable[..., Proc], misbehaviour: Behaviour
) -> None:
    """An extra whole answer (in the answer's write, or later on the idle connection) or a body
    after a 204 closes that connection: the next tenant gets its own answer, and so does its
    repeat (a HIT of its own answer, not of the stray one)."""
    upstream.behave = script(misbehaviour)
    proc = start()
    b, c = sdk(proc, "sk-tenant-b"), sdk(proc, "sk-tenant-c")
    try:
        first = ask(b, "B's private question")
    except openai.APIError:
        first = ""  # (a 204 with a body: whatever B gets, it is B's or an error)
    assert first in ("", f"{named('sk-tenant-b')} B's private question")
    dropped(proc)  # (the late one arrives while the connection idles)
    for _ in range(2):
        assert ask(c, "C's question") == f"{named('sk-tenant-c')} C's question"
    assert upstream.connections == 2
    assert upstream.behaviours[misbehaviour.value] == 1


def test_a_408_on_an_idle_connection_is_never_an_answer(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """The everyday form: an idle keep-alive connection gets a 408 and is closed; the next
    request goes on a new connection and gets its answer."""
    upstream.behave = script(Behaviour.IDLE_408)
    proc = start()
    client = sdk(proc, "sk-a")
    assert ask(client, "one") == f"{named('sk-a')} one"
    dropped(proc)
    assert ask(client, "two") == f"{named('sk-a')} two"
    assert upstream.connections == 2


def test_an_early_answer_ends_the_connections_reuse(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """A 401 to a large POST before its body was read: the client gets the 401, the rest of
    the body is not sent, and the next tenant's request never goes on that socket."""
    upstream.behave = script(Behaviour.EARLY)
    proc = start()
    big = "x" * (24 * 1024 * 1024)
    with pytest.raises(openai.AuthenticationError) as refused:
        ask(sdk(proc, "sk-tenant-a", timeout=60), big)
    assert named("sk-tenant-a") in refused.value.response.text
    assert ask(sdk(proc, "sk-tenant-b"), "mine") == f"{named('sk-tenant-b')} mine"
    assert [r.connection for r in upstream.requests] == [1, 2]
    assert upstream.violations == []


def test_a_post_the_upstream_read_is_never_resent(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """A reused connection closed after the upstream read a POST: the client gets a 502 and
    the upstream saw the request once (RFC 9112 9.3.1)."""
    upstream.behave = script(Behaviour.NORMAL, Behaviour.READ_CLOSE)
    proc = start()
    client = sdk(proc, "sk-a")
    assert ask(client, "one") == f"{named('sk-a')} one"
    with pytest.raises(openai.InternalServerError) as failed:
        ask(client, "two")
    assert failed.value.status_code == 502
    assert [prompt for r in upstream.requests if (prompt := r.body)].count(
        orjson.dumps({"messages": [{"role": "user", "content": "two"}], "model": "gpt-4o-mini"})
    ) <= 1
    assert sum(b'"two"' in r.body for r in upstream.requests) == 1


def test_an_upstream_that_never_reads_the_body_gets_a_504_in_bounded_time(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """The upstream reads the head of a large POST and never its body: the write stalls, and
    after --upstream-read-timeout-s without progress the client gets the proxy's 504."""
    upstream.behave = script(Behaviour.HEAD_ONLY)
    proc = start("--upstream-read-timeout-s", "1.5")
    rss = proc.rss_kb()
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        ask(sdk(proc, "sk-a", timeout=60), "y" * (32 * 1024 * 1024))
    took = time.monotonic() - t0
    assert failed.value.status_code == 504
    assert took < 20
    time.sleep(0.5)
    assert proc.rss_kb() - rss < 200_000  # the 32 MB body (and its copies) was freed


@pytest.mark.parametrize("coding", [Behaviour.CUT_GZIP, Behaviour.CUT_BR], ids=["gzip", "br"])
def test_a_compressed_chat_answer_cut_short_is_never_stored(
    upstream: ScriptedUpstream, start: Callable[..., Proc], coding: Behaviour
) -> None:
    """A gzip/br body cut short but framed right: the client sees an error, and the same
    request again goes upstream (nothing was stored)."""
    upstream.behave = script(coding)
    proc = start()
    client = sdk(proc, "sk-a")
    with pytest.raises(openai.APIError):
        ask(client, "cut me")
    assert ask(client, "cut me") == f"{named('sk-a')} cut me"
    assert ask(client, "cut me") == f"{named('sk-a')} cut me"
    assert sum(b"cut me" in r.body for r in upstream.requests) == 2


@pytest.mark.parametrize("coding", [Behaviour.CUT_GZIP, Behaviour.CUT_BR], ids=["gzip", "br"])
def test_a_cut_compressed_speech_answer_is_never_stored_nor_served(
    upstream: ScriptedUpstream, start: Callable[..., Proc], coding: Behaviour
) -> None:
    """/v1/audio/speech answered with gzip/br cut short (framed right): the client sees an
    error, never half the audio, and the next identical request goes upstream again."""
    steps = iter([coding])
    upstream.behave = lambda _req: next(steps, Behaviour.NORMAL)
    proc = start()
    client = sdk(proc, "sk-a")
    with pytest.raises(openai.APIError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="hello").read()
    for _ in range(2):
        got = client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
        assert got.read() == SPEECH
    assert len(upstream.requests) == 2


def test_headers_named_in_connection_are_not_forwarded_and_absolute_targets_get_400(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """`Connection: X-Private` makes X-Private hop-by-hop (RFC 9110 7.6.1); an absolute-form
    request target is refused with OpenAI's error shape, not glued to a path."""
    proc = start()
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "h"}]})
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n"
        "Connection: keep-alive, X-Private\r\nX-Private: secret\r\nX-Kept: 1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    answer = raw(proc.port, head.encode() + body)
    assert status_of(answer) == 200
    sent = upstream.requests[-1].headers
    assert "x-private" not in sent and sent["x-kept"] == "1"
    absolute = head.replace(f"POST {CHAT} ", f"POST http://evil.example{CHAT} ")
    refused = raw(proc.port, absolute.encode() + body)
    assert status_of(refused) == 400
    assert orjson.loads(body_of(refused))["error"]["type"] == "invalid_request_error"
    assert len(upstream.requests) == 1


BASES = [
    # (--upstream path, client base path, route, path seen upstream)
    ("", "/v1", "chat/completions", "/v1/chat/completions"),
    ("", "", "chat/completions", "/v1/chat/completions"),
    ("/v1", "/v1", "chat/completions", "/v1/chat/completions"),
    ("/v1", "", "chat/completions", "/v1/chat/completions"),
    ("/api/v1", "/v1", "chat/completions", "/api/v1/chat/completions"),
    ("/api/v1", "", "models", "/api/v1/models"),
    (
        "/openai",
        "/openai",
        "deployments/gpt4/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt4/chat/completions?api-version=2024-10-21",
    ),
    ("/openai/v1", "/openai/v1", "chat/completions", "/openai/v1/chat/completions"),
]


def test_any_openai_compatible_base_url(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """The README's table: each client base URL x --upstream path reaches the right path
    upstream (the base path's end is never repeated; the Azure api-version query is kept)."""
    by_base: dict[str, Proc] = {}
    for up_path, client_path, route, expected in BASES:
        proc = by_base.get(up_path) or start(base=upstream.base_url + up_path)
        by_base[up_path] = proc
        target = f"{client_path}/{route}"
        method = "GET" if route == "models" else "POST"
        body = b"" if method == "GET" else b'{"model":"m","messages":[]}'
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: x\r\napi-key: k\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        answer = raw(proc.port, head.encode() + body)
        assert status_of(answer) == 200, (up_path, target)
        assert upstream.requests[-1].path == expected, (up_path, target)


def test_head_goes_through_the_one_client_without_a_body(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """HEAD: the answer's Content-Length describes a body that is not sent; the proxy relays
    the head and the next request still gets its own answer."""
    proc = start()
    head = b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-a\r\n\r\n"
    answer = raw(proc.port, head, read_timeout=3)
    assert status_of(answer) == 200 and body_of(answer) == b""
    assert header(answer, "X-Cache-Status") == "BYPASS"
    assert ask(sdk(proc, "sk-a"), "after") == f"{named('sk-a')} after"
    assert upstream.requests[0].method == "HEAD"


def test_the_credential_recheck_sends_every_credential_header(
    upstream: ScriptedUpstream, start: Callable[..., Proc]
) -> None:
    """--auth-recheck-s: an `x-api-key` client's credential is re-checked with its x-api-key
    (an upstream that needs it says 200), so its HIT is served, not refused."""
    proc = start("--auth-recheck-s", "1")
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "k"}]})
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nx-api-key: sk-anthropic-style\r\n"
        f"Connection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    first = raw(proc.port, head.encode() + body)
    assert status_of(first) == 200 and header(first, "X-Cache-Status") == "MISS"
    time.sleep(1.3)
    again = raw(proc.port, head.encode() + body)
    assert status_of(again) == 200, body_of(again)
    assert header(again, "X-Cache-Status") == "HIT"
    checks = [r for r in upstream.requests if r.path.endswith("/models")]
    assert checks and checks[-1].headers.get("x-api-key") == "sk-anthropic-style"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class ConnectProxy:
    """A small egress proxy that only tunnels (CONNECT), recording each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.targets.append(target)
        host, _, port = target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


def test_https_upstream_through_an_egress_proxy_and_no_proxy(
    bg: BackgroundLoop, start: Callable[..., Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: the proxy reaches an https upstream through a CONNECT tunnel (TLS checked
    against the upstream's own name inside it); NO_PROXY naming the host goes direct."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    secure = ScriptedUpstream(ssl_context=server_ctx)
    bg.run(secure.start())
    tunnel = ConnectProxy()
    bg.run(tunnel.start())
    try:
        base = f"https://localhost:{secure.port}/v1"
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{tunnel.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        via = start("--upstream-ca-file", str(ca_file), base=base)
        assert ask(sdk(via, "sk-a"), "tunnelled") == f"{named('sk-a')} tunnelled"
        assert tunnel.targets == [f"localhost:{secure.port}"]
        assert secure.requests[-1].path == "/v1/chat/completions"
        monkeypatch.setenv("NO_PROXY", "example.com,localhost")
        direct = start("--upstream-ca-file", str(ca_file), base=base)
        assert ask(sdk(direct, "sk-a"), "direct") == f"{named('sk-a')} direct"
        assert len(tunnel.targets) == 1 and len(secure.requests) == 2
    finally:
        bg.run(tunnel.stop())
        bg.run(secure.stop())


async def test_a_slow_first_byte_is_one_upstream_call_not_one_per_duplicate(
    upstream: ScriptedUpstream, start: Callable[..., Proc], tmp_path: Path
) -> None:
    """An upstream that takes longer to its first byte than lock_timeout_s: five identical
    requests are one upstream POST (the leader is working, not silent), all answered alike."""
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\nlock_timeout_s = 0.3\n')
    upstream.behave = lambda _req: Behaviour.DELAY
    upstream.delay_s = 1.5
    proc = start("--rules", str(rules))
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key="sk-a", max_retries=0)

    async def one() -> str:
        got = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "slow"}]
        )
        return got.choices[0].message.content or ""

    try:
        answers = await asyncio.gather(*(one() for _ in range(5)))
    finally:
        await client.close()
    assert answers == [f"{named('sk-a')} slow"] * 5
    assert sum(r.path.endswith("/chat/completions") for r in upstream.requests) == 1
