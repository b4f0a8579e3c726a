"""The provider's own prompt cache through the official SDK: prompt_cache_key = "auto" and the
savings its cached tokens bring, apart from the proxy's own, in the line, stats, metrics and
report."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import openai
import orjson
from structlog.testing import capture_logs

from proxy.report import Report
from proxy.testing import FakeOpenAI
from tests.conftest import sdk

CHAT = "/v1/chat/completions"
SYSTEM = "You are a careful assistant for the ACME help desk. " * 120  # ~1500 fake tokens


def rules(tmp_path: Path, auto: bool = True, extra: str = "") -> Path:
    path = tmp_path / "r.toml"
    option = 'prompt_cache_key = "auto"\n' if auto else ""
    path.write_text(
        f'[[rule]]\nroute = "/v1/chat/completions"\n{option}{extra}'
        f'[[rule]]\nroute = "/v1/responses"\n{option}'
    )
    return path


def ask(client: openai.OpenAI, text: str, system: str = SYSTEM, **kw: Any) -> Any:
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, **kw
    )


def sent(fake: FakeOpenAI, i: int) -> dict[str, Any]:
    body: dict[str, Any] = fake.calls[i].json()
    return body


def test_auto_sets_one_key_per_tenant_and_prefix(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """With "auto", requests sharing a system prompt go up with one prompt_cache_key; another
    tenant or another prefix gets another; a request's own key is left as it is."""
    proxy = start_proxy(rules=rules(tmp_path))
    a, b = sdk(proxy), sdk(proxy, key="sk-test-b")
    ask(a, "first question")
    ask(a, "second question")
    ask(b, "first question")
    ask(a, "first question", system="Another system prompt.")
    ask(a, "mine", prompt_cache_key="my-own-key")
    ask(a, "no prefix", system="")
    keys = [sent(fake, i).get("prompt_cache_key") for i in range(6)]
    assert isinstance(keys[0], str)
    assert keys[0].startswith("ocp-") and len(keys[0]) == 36
    assert keys[0] == keys[1]
    assert len({keys[0], keys[2], keys[3]}) == 3
    assert keys[4] == "my-own-key" and keys[5] is None
    assert "ocp-" not in str(sent(fake, 0)["messages"])  # only the one field was added


def test_the_auto_key_stays_out_of_the_proxy_key(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Even with a rule that keys every field, the added prompt_cache_key does not enter the
    proxy's key: the same request again is a HIT, whatever the fake answered with."""
    proxy = start_proxy(rules=rules(tmp_path, extra="ignore_fields = []\n"))
    client = sdk(proxy)
    first = ask(client, "same")
    second = ask(client, "same")
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert fake.count(CHAT) == 1


def test_without_auto_nothing_is_added(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """A rule without the option sends the body as the client wrote it."""
    proxy = start_proxy(rules=rules(tmp_path, auto=False))
    ask(sdk(proxy), "q")
    assert "prompt_cache_key" not in sent(fake, 0)


def test_provider_cached_tokens_are_counted_apart(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Cached input tokens the provider reports are priced at the cached-input price and
    shown apart from the proxy's savings: on the line, in stats, metrics and the report."""
    fake.prompt_cache_machines = 4
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    with capture_logs() as logs:
        ask(client, "one")
        ask(client, "two")  # same prefix, same auto key: the provider's cache serves it
        ask(client, "two")  # the proxy's own HIT
        client.responses.create(model="gpt-4.1", instructions=SYSTEM, input="r1")
        client.responses.create(model="gpt-4.1", instructions=SYSTEM, input="r2")
    lines = [e for e in logs if e["event"] == "request.done"]
    assert "cached_tokens" not in lines[0]
    assert lines[1]["cached_tokens"] >= 1024 and lines[1]["provider_saved_usd"] > 0
    # 0.15 - 0.075 $ per 1M input tokens saved on gpt-4o-mini
    assert abs(lines[1]["provider_saved_usd"] - lines[1]["cached_tokens"] * 0.075e-6) < 1e-9
    assert lines[2]["cache"] == "hit" and "cached_tokens" not in lines[2]
    assert lines[4]["cached_tokens"] >= 1024 and lines[4]["provider_saved_usd"] > 0
    with urllib.request.urlopen(proxy.url + "/_proxy/stats") as r:
        stats = orjson.loads(r.read())
    cached = lines[1]["cached_tokens"] + lines[4]["cached_tokens"]
    assert stats["provider_cache"]["cached_tokens"] == cached
    assert stats["provider_cache"]["saved_usd"] > 0
    assert stats["per_model"]["gpt-4o-mini"]["provider_cached_tokens"] == lines[1]["cached_tokens"]
    with urllib.request.urlopen(proxy.url + "/_proxy/metrics") as r:
        metrics = r.read().decode()
    assert 'kind="provider_cached"' in metrics and 'kind="provider_saved"' in metrics
    report = Report("route")
    for line in lines:
        report.feed(orjson.dumps({**line, "event": "request.done"}), None, None)
    total = report.rows()[-1]
    assert total["provider_cached_tokens"] == cached and total["provider_saved_usd"] > 0
