"""The caller's say over the key through the official SDK: X-Cache-Key, X-Cache-Ignore-Fields,
X-Cache-TTL and the Cloudflare AI Gateway / Helicone aliases; a rule may forbid them."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import openai
from structlog.testing import capture_logs

from proxy.caller_keys import CALLER_HEADERS
from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, sdk
from tests.helpers import HEADERS, body_of, header, post, status_of

CHAT = "/v1/chat/completions"


def ask(client: openai.OpenAI, text: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        extra_headers=headers or {},
        **kw,
    )


def done_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "request.done"]


def test_a_caller_key_names_the_entry(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Two bodies under one X-Cache-Key share one answer (one upstream call); the HIT says
    detail=caller-key, the line says caller_key, and the header never goes upstream."""
    client = sdk(proxy)
    first = ask(client, "first body", {"X-Cache-Key": "faq:shipping"})
    with capture_logs() as logs:
        second = ask(client, "another body", {"X-Cache-Key": "faq:shipping"})
    assert first.headers["x-cache-status"] == "MISS"
    assert first.headers["cache-status"].endswith("; detail=caller-key")
    assert second.headers["x-cache-status"] == "HIT"
    assert second.headers["cache-status"] == "openai-cache-proxy; hit; detail=caller-key"
    assert second.parse().model_dump() == first.parse().model_dump()
    assert fake.count(CHAT) == 1
    assert not CALLER_HEADERS & {k.lower() for k in fake.calls[0].headers}
    line = done_lines(logs)[-1]
    assert line["caller_key"] is True and "faq:shipping" not in str(logs)


def test_a_caller_key_stays_in_its_tenant_and_namespace(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """The same caller key from another API key, or another namespace, is another entry."""
    ask(sdk(proxy), "a", {"X-Cache-Key": "k1"})
    other = ask(sdk(proxy, key="sk-test-b"), "a", {"X-Cache-Key": "k1"})
    spaced = ask(sdk(proxy), "a", {"X-Cache-Key": "k1", "X-Cache-Namespace": "n2"})
    assert other.headers["x-cache-status"] == "MISS"
    assert spaced.headers["x-cache-status"] == "MISS"
    assert fake.count(CHAT) == 3


def test_the_cloudflare_cache_key_alias(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """cf-aig-cache-key names the entry as X-Cache-Key does (the same entry)."""
    client = sdk(proxy)
    ask(client, "one", {"cf-aig-cache-key": "same"})
    second = ask(client, "two", {"X-Cache-Key": "same"})
    assert second.headers["x-cache-status"] == "HIT" and fake.count(CHAT) == 1


def test_ignored_fields_leave_the_key(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """X-Cache-Ignore-Fields (and Helicone-Cache-Ignore-Keys) leave the named fields out of
    this request's key: another temperature is a HIT with them, a MISS without."""
    client = sdk(proxy)
    ask(client, "q", temperature=0.1)
    with capture_logs() as logs:
        hit = ask(client, "q", {"X-Cache-Ignore-Fields": "temperature, user"}, temperature=0.7)
    helicone = ask(client, "q", {"Helicone-Cache-Ignore-Keys": "user,temperature"}, temperature=1)
    miss = ask(client, "q", temperature=0.7)
    assert fake.count(CHAT) == 3  # the first, the first under the shaped key, the last
    statuses = [r.headers["x-cache-status"] for r in (hit, helicone, miss)]
    assert statuses == ["MISS", "HIT", "MISS"]
    assert helicone.headers["cache-status"].endswith("detail=ignored-fields")
    assert done_lines(logs)[-1]["ignored_fields"] == 2


def test_cache_ttl_is_a_max_age(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """X-Cache-TTL: 0 is max-age=0: a stored answer is too old for it, so it goes upstream."""
    client = sdk(proxy)
    ask(client, "ttl")
    assert ask(client, "ttl").headers["x-cache-status"] == "HIT"
    assert ask(client, "ttl", {"X-Cache-TTL": "0"}).headers["x-cache-status"] == "MISS"
    assert fake.count(CHAT) == 2


def test_skip_aliases_bypass(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """cf-aig-skip-cache: true and Helicone-Cache-Enabled: false bypass the cache."""
    client = sdk(proxy)
    ask(client, "skip")
    skipped = ask(client, "skip", {"cf-aig-skip-cache": "true"})
    disabled = ask(client, "skip", {"Helicone-Cache-Enabled": "false"})
    enabled = ask(client, "skip", {"Helicone-Cache-Enabled": "true"})
    assert skipped.headers["x-cache-status"] == "BYPASS"
    assert disabled.headers["x-cache-status"] == "BYPASS"
    assert enabled.headers["x-cache-status"] == "HIT"
    assert fake.count(CHAT) == 3


def test_a_rule_may_forbid_caller_keys(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """With caller_keys = false, a caller key and ignored fields change nothing (the body is
    the key) and the line says the caller key was refused."""
    rules = tmp_path / "r.toml"
    rules.write_text('[[rule]]\nroute = "/v1/chat/completions"\ncaller_keys = false\n')
    proxy = start_proxy(rules=rules)
    client = sdk(proxy)
    ask(client, "one", {"X-Cache-Key": "k"})
    with capture_logs() as logs:
        two = ask(client, "two", {"X-Cache-Key": "k"})
    again = ask(client, "two", {"X-Cache-Ignore-Fields": "messages"})
    assert two.headers["x-cache-status"] == "MISS" and "detail" not in two.headers["cache-status"]
    assert again.headers["x-cache-status"] == "HIT"
    assert fake.count(CHAT) == 2
    assert done_lines(logs)[-1]["caller_key"] == "refused"


def test_bad_cache_headers_are_openai_shaped_400s(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """A TTL that is no whole number or a key past 1024 characters: 400, OpenAI's shape."""
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"x"}]}'
    for extra in ({"X-Cache-TTL": "soon"}, {"X-Cache-Key": "k" * 1025}):
        answer = post(int(proxy.url.rsplit(":", 1)[1]), body, {**HEADERS, **extra})
        assert status_of(answer) == 400, answer
        assert b'"code":"invalid_cache_header"' in body_of(answer)
        assert header(answer, "Content-Type") == "application/json"
        assert b'"type":"invalid_request_error"' in body_of(answer)
    assert fake.count(CHAT) == 0


def test_a_caller_key_never_spans_two_forms(proxy: ProxyServer, fake: FakeOpenAI) -> None:
    """Under one X-Cache-Key a /v1/completions stream is not served to a JSON request (the
    SDK gets a Completion), and base64 and float embeddings are two entries; on chat a stream
    (with its usage) and a JSON request still share one answer (the twin)."""
    client = sdk(proxy)
    key = {"X-Cache-Key": "faq-7"}
    streamed = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="a", stream=True, extra_headers=key
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices)
    plain = client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="b", extra_headers=key
    )
    assert plain.headers["x-cache-status"] == "MISS"
    assert isinstance(plain.parse(), openai.types.Completion)
    floats = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="x", encoding_format="float", extra_headers=key
    )
    b64 = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="y", encoding_format="base64", extra_headers=key
    )
    assert floats.headers["x-cache-status"] == "MISS" and b64.headers["x-cache-status"] == "MISS"
    assert isinstance(floats.parse().data[0].embedding, list)
    chat_stream = ask(client, "c", key, stream=True, stream_options={"include_usage": True})
    chat_stream.parse().close()
    chat_json = ask(client, "d", key)
    assert chat_json.headers["x-cache-status"] == "HIT"
