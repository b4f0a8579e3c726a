"""Hostile clients and odd upstreams against the real `python -m proxy` process: no wrong
answer, no shared answer, no stall, no leak (issue: hostile input)."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import openai
import orjson
import pytest
import redis

from proxy.testing import FakeOpenAI
from proxy.testing.hostile import HostileUpstream
from tests.conftest import BackgroundLoop, RedisServer, spawn_proxy, start_redis
from tests.helpers import Proc, _complete, body_of, eventually, header, post, raw, status_of

CHAT = "/v1/chat/completions"


@pytest.fixture
def hostile(bg: BackgroundLoop) -> Iterator[HostileUpstream]:
    up = HostileUpstream()
    bg.run(up.start())
    yield up
    bg.run(up.stop())


@pytest.fixture
def proc(hostile: HostileUpstream, tmp_path: Path) -> Iterator[Proc]:
    p = Proc(hostile.base_url, tmp_path / "data")
    yield p
    if p.proc.poll() is None:
        p.stop()


def healthy(port: int) -> bool:
    got = raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return bool(orjson.loads(body_of(got))["status"] == "ok")


def chat(prompt: str, model: str = "gpt-4o-mini") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})


def test_every_credential_partitions_the_cache(proc: Proc, hostile: HostileUpstream) -> None:
    """Clients that share `Authorization` but send different `api-key`s (which is what this
    upstream reads) never get each other's answers."""
    answers: dict[str, Any] = {}
    for key in ("azure-key-1", "azure-key-2", "azure-key-1"):
        c = openai.OpenAI(
            base_url=proc.url + "/v1",
            api_key="sk-shared",
            default_headers={"api-key": key},
            max_retries=0,
        )
        r = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "who am i"}]
        )
        answers.setdefault(key, []).append((r.headers["x-cache-status"], r.parse()))
        c.close()
    (s1, a1), (s1b, a1b) = answers["azure-key-1"]
    ((s2, a2),) = answers["azure-key-2"]
    assert (s1, s2, s1b) == ("MISS", "MISS", "HIT")
    assert a1.choices[0].message.content != a2.choices[0].message.content
    assert a1.choices[0].message.content == a1b.choices[0].message.content
    assert hostile.calls(CHAT) == 2


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain", None])
def test_json_under_another_content_type_is_keyed_by_its_content(
    proc: Proc, hostile: HostileUpstream, ctype: str | None
) -> None:
    """curl -d and text/plain JSON bodies: each prompt gets its own answer; a repeat is a HIT."""
    headers = {"api-key": "k"} | ({"Content-Type": ctype} if ctype else {})
    first = post(proc.port, chat("prompt one"), headers)
    second = post(proc.port, chat("prompt two"), headers)
    again = post(proc.port, chat("prompt one"), headers)
    assert b"echo[" in body_of(first) and b"prompt one" in body_of(first)
    assert b"prompt two" in body_of(second)
    assert header(again, "X-Cache-Status") == "HIT" and b"prompt one" in body_of(again)
    assert hostile.calls(CHAT) == 2


def test_unparsable_bodies_are_never_keyed_as_empty(proc: Proc, hostile: HostileUpstream) -> None:
    """Two different non-JSON bodies both reach the upstream: neither is served the other's
    (or an empty body's) answer."""
    for body in (b"", b"garbage one", b"garbage two", b"garbage one"):
        answer = post(proc.port, body, {"api-key": "k", "Content-Type": "text/plain"})
        assert status_of(answer) == (200 if not body else 400)  # the upstream's own answers
    assert hostile.calls(CHAT) == 4


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_encoded_request_bodies_go_up_decoded_without_the_header(
    proc: Proc, hostile: HostileUpstream, coding: str
) -> None:
    """The upstream receives the decoded body without Content-Encoding; the key is the
    content's (a plain repeat is a HIT)."""
    body = chat("compressed prompt")
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[coding](body)
    headers = {"api-key": "k", "Content-Type": "application/json", "Content-Encoding": coding}
    answer = post(proc.port, packed, headers)
    assert status_of(answer) == 200 and b"compressed prompt" in body_of(answer)
    got = hostile.requests[-1]
    assert got.body == body and "content-encoding" not in got.headers
    plain = post(proc.port, body, {"api-key": "k", "Content-Type": "application/json"})
    assert header(plain, "X-Cache-Status") == "HIT"


def test_a_gzip_bomb_is_a_413_at_once_with_memory_bounded(
    hostile: HostileUpstream, tmp_path: Path
) -> None:
    """1 MB of gzip that would inflate to 1 GiB: 413 while decoding, RSS bounded by the cap."""
    p = Proc(hostile.base_url, tmp_path / "d", "--max-body-mb", "16")
    try:
        bomb = gzip.compress(b"\0" * (1024 * 1024 * 1024), compresslevel=9)
        assert len(bomb) < 1.1 * 1024 * 1024
        before = p.rss_kb()
        t0 = time.monotonic()
        answer = post(
            p.port, bomb, {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )
        took = time.monotonic() - t0
        assert status_of(answer) == 413, answer[:200]
        assert orjson.loads(body_of(answer))["error"]["code"] == "request_too_large"
        assert took < 5 and p.rss_kb() - before < 100 * 1024
        assert hostile.calls(CHAT) == 0
    finally:
        p.stop()


def test_deep_nesting_and_huge_multipart_get_openai_shaped_400s(
    proc: Proc, hostile: HostileUpstream
) -> None:
    """Nesting past the limits and 20k-part multipart bodies: 400 in OpenAI's error shape."""
    for depth in (300, 5000):
        deep = b'{"model":"m","x":' + b"[" * depth + b"]" * depth + b"}"
        answer = post(proc.port, deep, {"Content-Type": "application/json"})
        assert status_of(answer) == 400
        assert set(orjson.loads(body_of(answer))["error"]) == {"message", "type", "param", "code"}
    part = '--bnd\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'
    multipart = (part * 20_000 + "--bnd--\r\n").encode()
    answer = post(
        proc.port,
        multipart,
        {"Content-Type": "multipart/form-data; boundary=bnd"},
        path="/v1/images/edits",
    )
    assert status_of(answer) == 400
    assert orjson.loads(body_of(answer))["error"]["code"] == "too_many_parts"
    assert hostile.calls() == 0


ATTACKER = """
import itertools, os, socket, sys
port = int(sys.argv[1])
numbers = b"0," * 3_000_000 + b'0]}'
for n in itertools.count():  # a new body each time: none is a memoised plan
    body = b'{"model":"m%d-%d","x":[' % (os.getpid(), n) + numbers
    head = (f"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
            f"Content-Type: application/json\\r\\napi-key: k\\r\\n"
            f"Content-Length: {len(body)}\\r\\n\\r\\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head + body)
        while s.recv(65536):
            pass
"""


def test_health_answers_while_pathological_bodies_are_parsed(proc: Proc) -> None:
    """While two other processes keep sending 6 MB flat JSON bodies (3 million numbers),
    /_proxy/health keeps answering: no stall of the event loop (bench/hostile_bench.py
    measures the p99; this guards against the multi-second stalls of parsing on the loop)."""
    attackers = [
        subprocess.Popen([sys.executable, "-c", ATTACKER, str(proc.port)]) for _ in range(2)
    ]
    took: list[float] = []
    try:
        time.sleep(1.0)
        for _ in range(40):
            t0 = time.monotonic()
            answer = raw(
                proc.port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            took.append(time.monotonic() - t0)
            assert status_of(answer) == 200
            time.sleep(0.02)
    finally:
        for a in attackers:
            a.kill()
            a.wait()
    # As in test_every_form's 15 MB test: the slow probes add up to the time the loop could
    # not answer; the budget lets a loaded host pause once.
    took.sort()
    stalled = sum(t for t in took if t > 0.1)
    assert took[len(took) // 2] < 0.1 and stalled < 1.2, (stalled, took[-10:])


def test_client_strings_never_grow_logs_metrics_or_memory(
    proc: Proc, hostile: HostileUpstream
) -> None:
    """Megabyte model names and long namespaces: every log line < 8 KB, metrics < 1 MB, and
    the process does not grow by the names' size."""
    before = proc.rss_kb()
    for i in range(60):
        body = orjson.dumps({"model": f"{i}-" + "m" * 1_000_000, "messages": []})
        post(
            proc.port,
            body,
            {"Content-Type": "application/json", "api-key": "k", "X-Cache-Namespace": "n" * 4000},
        )
    grown = proc.rss_kb() - before
    metrics = raw(
        proc.port, b"GET /_proxy/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    out, _err = proc.stop()
    assert len(body_of(metrics)) < 1024 * 1024
    lines = out.splitlines()
    assert lines and max(len(line) for line in lines) < 8 * 1024
    assert grown < 120 * 1024, grown  # 60 MB of names went through


def test_no_secret_reaches_stdout_or_stderr_for_malformed_http(proc: Proc) -> None:
    """Malformed requests carrying a key and a prompt: aiohttp's error logging is redacted."""
    secret, prompt = "sk-LEAKED-SECRET-123", "LEAKED-PROMPT-TEXT"
    bad = [
        f"POST {CHAT} HTTP/1.1\r\nAuthorization: Bearer {secret}\x01\r\n\r\n".encode(),
        f"POST {CHAT} HTTP/1.1\r\nAuthorization: Bearer {secret}\r\nTransfer-Encoding: chunked\r\n"
        f"\r\nzz\r\n{prompt}\r\n".encode(),
        f"POST {CHAT} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
        f"Authorization: Bearer {secret}\r\n\r\n{prompt}".encode(),
        f"GET /{prompt}\x00 HTTP/1.1\r\nAuthorization: {secret}\r\n\r\n".encode(),
    ]
    for data in bad:
        raw(proc.port, data, read_timeout=2)
    out, err = proc.stop()
    assert secret.encode() not in out + err and prompt.encode() not in out + err
    assert b"http.error" in out  # the failure is still reported, redacted


def test_expect_100_continue_is_answered_here_and_never_forwarded(
    proc: Proc, hostile: HostileUpstream
) -> None:
    """The proxy answers 100 Continue itself, before the body is sent (the upstream ignores
    Expect and never sends one); the upstream never sees the header; a 2 MB body goes
    through without the client's wait."""
    body = chat("x" * 2_000_000)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\napi-key: k\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as s:
        s.sendall(head.encode())
        interim = s.recv(100)  # (a proxy that waits for the body answers nothing: timeout)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        data = b""
        while not _complete(data.partition(b"HTTP/1.1 100 Continue\r\n\r\n")[2] or data):
            got = s.recv(65536)
            if not got:
                break
            data += got
    final = data.split(b"\r\n\r\n", 1)[1] if data.startswith(b"HTTP/1.1 100") else data
    assert status_of(final) == 200
    assert "expect" not in hostile.requests[-1].headers


@pytest.mark.parametrize("model", ["broken-json", "error-200", "lie-long", "lie-short"])
def test_unsound_answers_are_relayed_but_never_stored(
    proc: Proc, hostile: HostileUpstream, model: str
) -> None:
    """A 200 with broken JSON, an error object, or a length that disagrees with its
    Content-Length reaches the client as it came and is never served again from the cache."""
    for _ in range(2):
        answer = post(
            proc.port, chat("p", model), {"api-key": "k", "Content-Type": "application/json"}
        )
        if model in ("broken-json", "error-200"):
            assert status_of(answer) == 200
        elif model == "lie-long":  # aiohttp refuses data past Content-Length: a clear 502
            assert status_of(answer) in (200, 502)
        # lie-short: the body is cut short; the client sees the connection end
        assert header(answer, "X-Cache-Status") != "HIT"
    assert hostile.calls(CHAT) == 2


def test_a_corrupt_entry_is_a_miss_that_replaces_it_and_redis_restarts_are_retried(
    hostile: HostileUpstream, tmp_path: Path
) -> None:
    """Damaged bytes in Redis: a MISS (not BYPASS), the entry is replaced, other keys keep
    hitting and the store stays healthy; after a Redis restart the next call reconnects."""
    server = start_redis()
    port = server.port
    p = Proc(hostile.base_url, tmp_path / "d", "--cache", server.url, "--hot-cache-mb", "0")
    try:
        headers = {"api-key": "k", "Content-Type": "application/json"}
        for prompt in ("one", "two"):
            post(p.port, chat(prompt), headers)
        r = redis.Redis(port=port)
        # each answer is stored just after it is sent (Redis writes never delay an answer)
        eventually(lambda: len(list(r.scan_iter("ocp:resp:*"))) == 2)
        keys = sorted(r.scan_iter("ocp:resp:*"))
        r.set(keys[0], b"OCZ1 this is not zlib")
        statuses = [
            header(post(p.port, chat(x), headers), "X-Cache-Status") for x in ("one", "two")
        ]
        assert sorted(str(s) for s in statuses) == ["HIT", "MISS"]
        assert header(post(p.port, chat("one"), headers), "X-Cache-Status") == "HIT"
        health = orjson.loads(
            body_of(raw(p.port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\n\r\n"))
        )
        assert health["status"] == "ok"
        r.close()
        server.stop()
        server = start_redis(port)
        # the store probe (every second) may have seen Redis down meanwhile: let it see it back
        eventually(lambda: healthy(p.port), within_s=15)
        miss = post(p.port, chat("one"), headers)
        assert header(miss, "X-Cache-Status") == "MISS"  # reconnected: not BYPASS
        assert header(post(p.port, chat("one"), headers), "X-Cache-Status") == "HIT"
    finally:
        p.stop()
        server.stop()


def test_image_links_follow_each_client(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Without --public-url, clients reaching the proxy by two names each get links they can
    open, and a forged Host reaches nobody else."""
    proc, port = spawn_proxy(
        fake.base_url, tmp_path / "d", "--image-source-hosts", fake.netloc, "--auth-recheck-s", "0"
    )
    try:
        body = orjson.dumps({"prompt": "a cat", "response_format": "url"})
        urls = []
        for host in ("evil.example", f"127.0.0.1:{port}", f"localhost:{port}"):
            head = (
                f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer sk-a\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            answer = raw(port, head.encode() + body)
            urls.append(orjson.loads(body_of(answer))["data"][0]["url"])
        assert urls[0].startswith("http://evil.example/_proxy/images/")
        assert urls[1].startswith(f"http://127.0.0.1:{port}/_proxy/images/")
        assert urls[2].startswith(f"http://localhost:{port}/_proxy/images/")
        assert len({u.rsplit("/", 1)[1] for u in urls}) == 1
        assert fake.count("/v1/images/generations") == 1
    finally:
        proc.terminate()
        proc.wait(20)


def test_idempotency_key_conflict_across_instances(
    fake: FakeOpenAI, tmp_path: Path, redis_server: RedisServer
) -> None:
    """The same Idempotency-Key with another body on a second instance, while the first is
    in flight, is a 422; with the same body it follows the first and shares its answer."""
    import threading

    shared = ("--cache", redis_server.url, "--secret", "one-deployment")
    a, pa = spawn_proxy(fake.base_url, tmp_path / "a", *shared)
    b, pb = spawn_proxy(fake.base_url, tmp_path / "b", *shared)
    r = redis.Redis(port=redis_server.port)
    fake.hold()  # A's call waits upstream, holding the lease, until released
    try:
        headers = {
            "Authorization": "Bearer sk-a",
            "Content-Type": "application/json",
            "Idempotency-Key": "order-42",
        }
        results: dict[str, bytes] = {}
        first = threading.Thread(target=lambda: results.update(a=post(pa, chat("one"), headers)))
        first.start()
        eventually(lambda: fake.count(CHAT) == 1)
        other = post(pb, chat("two"), headers)
        second = threading.Thread(target=lambda: results.update(b=post(pb, chat("one"), headers)))
        second.start()
        # B follows A's flight: a blocking read of its Redis stream
        eventually(lambda: r.info("clients")["blocked_clients"] >= 1)
        fake.release()
        first.join(20)
        second.join(20)
        assert status_of(other) == 422
        assert orjson.loads(body_of(other))["error"]["code"] == "idempotency_key_reused"
        same = results["b"]
        assert status_of(same) == 200 and body_of(same) == body_of(results["a"])
        assert fake.count(CHAT) == 1
    finally:
        fake.release()
        r.close()
        for p in (a, b):
            p.terminate()
            p.wait(20)


def test_integers_past_64_bits_never_share_a_key(proc: Proc, hostile: HostileUpstream) -> None:
    """Seeds one apart past 2**64 (read as equal floats by the JSON parser) get two answers."""
    headers = {"api-key": "k", "Content-Type": "application/json"}
    for seed in ("18446744073709551616", "18446744073709551617", "18446744073709551616"):
        body = b'{"model":"gpt-4o-mini","seed":' + seed.encode() + b',"messages":[]}'
        post(proc.port, body, headers)
    assert hostile.calls(CHAT) == 2  # the third repeats the first: a HIT


def test_a_bare_image_host_allows_only_its_default_port(fake: FakeOpenAI, tmp_path: Path) -> None:
    """--image-source-hosts 127.0.0.1 does not allow 127.0.0.1:<other port>: the upstream's
    URL passes through untouched and nothing is stored."""
    proc, port = spawn_proxy(
        fake.base_url, tmp_path / "d", "--image-source-hosts", "127.0.0.1", "--auth-recheck-s", "0"
    )
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-a") as c:
            r = c.images.generate(prompt="a port", response_format="url")
            assert r.data and r.data[0].url and r.data[0].url.startswith(fake.base_url)
            c.images.generate(prompt="a port", response_format="url")
        assert fake.count("/v1/images/generations") == 2 and fake.image_downloads == []
    finally:
        proc.terminate()
        proc.wait(20)
