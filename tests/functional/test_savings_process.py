"""The savings past the exact key, against `python -m proxy` as users run it, with the
official SDK: a caller key, embeddings item by item (PARTIAL) and prompt_cache_key = "auto",
as the JSON log lines tell them, with no caller key, prompt or API key in the output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import orjson

from proxy.testing import FakeOpenAI
from tests.helpers import Proc

SYSTEM = "You answer questions about the ACME returns policy, briefly and politely. " * 80


def test_caller_keys_items_and_auto_prompt_cache_key_in_a_real_process(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """One process: X-Cache-Key HITs across bodies, a re-sent embeddings list is PARTIAL with
    only its new item upstream, the chat request goes up with an auto prompt_cache_key and
    the provider's cached tokens are logged; the lines say so, and leak nothing."""
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nroute = "/v1/chat/completions"\nprompt_cache_key = "auto"\n'
        '[[rule]]\nroute = "/v1/embeddings"\n'
    )
    fake.prompt_cache_machines = 8
    proc = Proc(fake.base_url, tmp_path / "data", "--rules", str(rules), "--cache", "memory://")
    try:
        with openai.OpenAI(base_url=proc.url + "/v1", api_key="sk-secret-77", max_retries=0) as c:
            chat = c.chat.completions.with_raw_response

            def ask(text: str, **headers: str) -> Any:
                messages: list[Any] = [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": text},
                ]
                return chat.create(model="gpt-4o-mini", messages=messages, extra_headers=headers)

            first = ask("private question one", **{"X-Cache-Key": "ticket-4242"})
            second = ask("private question two", **{"X-Cache-Key": "ticket-4242"})
            third = ask("private question three")
            docs = [f"private document {i}" for i in range(50)]
            emb = c.embeddings.with_raw_response
            one = emb.create(model="text-embedding-3-small", input=docs, dimensions=8)
            two = emb.create(
                model="text-embedding-3-small", input=[*docs, "one more"], dimensions=8
            )
    finally:
        out, err = proc.stop()
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert second.headers["cache-status"].endswith("detail=caller-key")
    assert third.headers["x-cache-status"] == "MISS"
    assert one.headers["x-cache-status"] == "MISS" and two.headers["x-cache-status"] == "PARTIAL"
    assert [len(c.json()["input"]) for c in fake.calls if c.path == "/v1/embeddings"] == [50, 1]
    chats = [c.json() for c in fake.calls if c.path == "/v1/chat/completions"]
    assert chats[0]["prompt_cache_key"] == chats[1]["prompt_cache_key"]
    assert all("x-cache-key" not in {k.lower() for k in c.headers} for c in fake.calls)
    lines = [orjson.loads(x) for x in out.splitlines() if x.startswith(b"{")]
    done = [x for x in lines if x.get("event") == "request.done"]
    assert [d["cache"] for d in done] == ["miss", "hit", "miss", "miss", "partial"]
    assert done[0]["caller_key"] is True and done[0]["prompt_cache_key"] == "auto"
    assert done[2]["cached_tokens"] > 0 and done[2]["provider_saved_usd"] > 0
    assert (done[4]["items"], done[4]["items_cached"], done[4]["items_sent"]) == (51, 50, 1)
    for secret in (b"sk-secret-77", b"ticket-4242", b"private question", b"private document"):
        assert secret not in out + err
