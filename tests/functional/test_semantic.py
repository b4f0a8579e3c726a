"""The semantic cache through the official SDK: paraphrases HIT, the known false hits never do,
shadow mode only measures, and a dead embeddings service costs a bounded wait."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from structlog.testing import capture_logs

from proxy.report import Report
from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, RedisServer, sdk
from tests.helpers import body_of, eventually, post, status_of

CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"
Q = "What is the capital of France?"
PARAPHRASE = "Tell me the capital of France, please"


def rules(tmp_path: Path, mode: str = "on", threshold: float = 0.95, extra: str = "") -> object:
    path = tmp_path / "semantic.toml"
    path.write_text(
        "[defaults]\n"
        f'semantic = "{mode}"\nsemantic_threshold = {threshold}\n{extra}'
        '[[rule]]\nroute = "/v1/chat/completions"\n'
        '[[rule]]\nroute = "/v1/responses"\n'
        '[[rule]]\nroute = "/v1/embeddings"\nsemantic = "off"\n'
    )
    return path


def ask(
    client: openai.OpenAI, text: Any, *, model: str = "gpt-4o-mini", system: str = "", **kw: Any
) -> Any:
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return client.chat.completions.with_raw_response.create(model=model, messages=messages, **kw)


def indexed(proxy: ProxyServer, n: int) -> None:
    semantic = proxy.state.semantic
    assert semantic is not None
    eventually(lambda: semantic.indexed >= n)


def done_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "request.done"]


def test_a_paraphrase_is_a_semantic_hit(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """A paraphrase gets the cached answer with no upstream chat call; HIT with
    detail=semantic, Age, its score and the saving on the line; exact repeats never embed."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    first = ask(client, Q)
    assert first.headers["x-cache-status"] == "MISS"
    indexed(proxy, 1)
    with capture_logs() as logs:
        second = ask(client, PARAPHRASE)
    assert second.headers["x-cache-status"] == "HIT"
    status, _, similarity = second.headers["cache-status"].rpartition("; similarity=")
    assert status == "openai-cache-proxy; hit; detail=semantic"
    assert 0.95 <= float(similarity) <= 1.0 and len(similarity) == 5
    assert "age" in second.headers
    assert second.parse().model_dump() == first.parse().model_dump()
    assert fake.count(CHAT) == 1
    line = done_lines(logs)[-1]
    assert line["cache"] == "hit" and line["semantic_score"] >= 0.95
    assert line["semantic_key"] == line["semantic_key"][:12] and line["saved_usd"] > 0
    assert "Tell me" not in str(logs) and "France" not in str(logs)  # never a prompt
    embeds = fake.count(EMB)
    assert ask(client, Q).headers["x-cache-status"] == "HIT"  # exact first: no embedding
    assert ask(client, PARAPHRASE).headers["x-cache-status"] == "HIT"
    assert fake.count(EMB) == embeds
    emb_call = fake.calls[[c.path for c in fake.calls].index(EMB)]
    assert emb_call.headers["Authorization"] == "Bearer sk-test-a"  # the caller's own key


def test_the_known_false_hits_never_hit(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path) -> None:
    """A negated question, changed numbers, another tenant, system prompt or model: MISS."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    assert ask(client, Q).headers["x-cache-status"] == "MISS"
    assert ask(client, "What is 17 plus 25?").headers["x-cache-status"] == "MISS"
    indexed(proxy, 2)
    with capture_logs() as logs:
        # "not" embeds like nothing at all in the fake (as negations barely move real
        # embeddings): the similarity is 1.0 and only the negation guard stops it
        negated = ask(client, "What is not the capital of France?")
    assert negated.headers["x-cache-status"] == "MISS"
    assert done_lines(logs)[-1]["semantic_guard"] == "negation"
    assert ask(client, "What is 17 plus 26?").headers["x-cache-status"] == "MISS"
    assert ask(sdk(proxy, key="sk-test-b"), PARAPHRASE).headers["x-cache-status"] == "MISS"
    other_system = ask(client, PARAPHRASE, system="Answer in French.")
    assert other_system.headers["x-cache-status"] == "MISS"
    assert ask(client, PARAPHRASE, model="gpt-4.1").headers["x-cache-status"] == "MISS"
    assert ask(client, PARAPHRASE, temperature=0.2).headers["x-cache-status"] == "MISS"
    assert fake.count(CHAT) == 8


def test_the_numbers_guard_turns_down_a_close_candidate(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """With a low threshold, "17 plus 26" is close enough to "17 plus 25" by similarity; the
    numbers guard turns it down (and says so on the line), while "seventeen plus twenty-five"
    is the same numbers."""
    proxy = start_proxy(rules=rules(tmp_path, threshold=0.5))
    client = sdk(proxy)
    ask(client, "What is 17 plus 25 in the classic train puzzle?")
    indexed(proxy, 1)
    with capture_logs() as logs:
        other = ask(client, "What is 17 plus 26 in the classic train puzzle?")
    assert other.headers["x-cache-status"] == "MISS"
    assert done_lines(logs)[-1]["semantic_guard"] == "numbers"
    # the same numbers in words pass the guard (and clear this low threshold)
    words = ask(client, "what's seventeen plus twenty-five in the classic train puzzle")
    assert words.headers["x-cache-status"] == "HIT"


def test_streams_and_responses_replay_a_semantic_hit(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A streamed paraphrase of a stored JSON answer replays as a stream (twins); the
    Responses API has its own partition."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    first = ask(client, Q).parse()
    indexed(proxy, 1)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PARAPHRASE}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == first.choices[0].message.content
    assert fake.count(CHAT) == 1
    r1 = client.responses.with_raw_response.create(model="gpt-4.1", input=Q)
    assert r1.headers["x-cache-status"] == "MISS"
    indexed(proxy, 2)
    r2 = client.responses.with_raw_response.create(model="gpt-4.1", input=PARAPHRASE)
    assert r2.headers["x-cache-status"] == "HIT"
    assert r2.parse().output_text == r1.parse().output_text


def test_only_plain_user_text_is_a_candidate(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A last message that is a tool result, an image or an assistant turn never embeds."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    image = [
        {"type": "text", "text": Q},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]
    ask(client, image)
    ask(client, Q, system="s")
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "user", "content": Q},
            {"role": "assistant", "content": "Paris."},
        ],
    )
    assert fake.count(EMB) == 1


def test_shadow_mode_measures_and_never_serves(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Shadow: the paraphrase is served from upstream; its line carries the score, the
    would-be hit and the candidate's key; the report shows the would-be hit ratio."""
    proxy = start_proxy(rules=rules(tmp_path, mode="shadow"))
    client = sdk(proxy)
    assert ask(client, Q).headers["x-cache-status"] == "MISS"
    indexed(proxy, 1)
    with capture_logs() as logs:
        second = ask(client, PARAPHRASE)
        eventually(lambda: done_lines(logs))
    assert second.headers["x-cache-status"] == "MISS"
    assert fake.count(CHAT) == 2
    line = done_lines(logs)[-1]
    assert line["cache"] == "miss" and line["semantic"] == "shadow"
    assert line["semantic_score"] == pytest.approx(1.0, abs=1e-3) and line["semantic_hit"]
    assert len(line["semantic_key"]) == 12
    report = Report(by="model")
    for entry in logs:
        report.feed(orjson.dumps(entry), None, None)
    row = report.rows()[-1]
    assert (row["shadow_lookups"], row["shadow_would_hit"], row["shadow_hit_ratio"]) == (1, 1, 1.0)
    assert row["shadow_saved_usd"] == line["cost_usd"] > 0
    assert report.scores.rows()[-1]["hits"] == 1  # at 0.99 too


def test_embeddings_that_time_out_or_fail_are_plain_misses(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A slow embeddings service: the answer is a MISS within the usual time plus the
    embedding timeout, with no error; then the breaker skips embeddings (no call, no wait).
    A failing one (500) is a MISS too; one line is logged per burst."""
    proxy = start_proxy(rules=rules(tmp_path), semantic_timeout_s=0.5)
    client = sdk(proxy)
    fake.path_latency[EMB] = 5.0
    with capture_logs() as logs:
        t0 = time.monotonic()
        first = ask(client, Q)
        took = time.monotonic() - t0
        assert first.headers["x-cache-status"] == "MISS" and first.status_code == 200
        assert took < 4.0  # not the embeddings' 5 s
        assert fake.count(EMB) == 1
        t0 = time.monotonic()
        assert ask(client, PARAPHRASE).headers["x-cache-status"] == "MISS"
        assert fake.count(EMB) == 1  # the breaker: no second embedding call to wait for
        assert time.monotonic() - t0 < 4.0
    lines = done_lines(logs)
    assert "no embedding within 0.5 s" in lines[0]["semantic_error"]
    assert [e["event"] for e in logs].count("semantic.embeddings_unavailable") == 1
    assert all("status" in e and e["status"] == 200 for e in lines)


def test_a_failing_embeddings_service_is_a_plain_miss(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """An embeddings service that fails turns a semantic lookup into a plain MISS and leaves the
    exact cache working."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    fake.path_errors[EMB] = 500
    assert ask(client, Q).headers["x-cache-status"] == "MISS"
    assert ask(client, Q).headers["x-cache-status"] == "HIT"  # the exact cache is untouched


def test_a_refused_caller_does_not_open_the_breaker(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A 4xx from embeddings is this caller's problem: the next caller still embeds."""
    proxy = start_proxy(rules=rules(tmp_path))
    fake.path_errors[EMB] = 401
    assert ask(sdk(proxy), Q).headers["x-cache-status"] == "MISS"
    del fake.path_errors[EMB]
    assert ask(sdk(proxy, key="sk-test-b"), Q).headers["x-cache-status"] == "MISS"
    assert fake.count(EMB) == 2


def test_embeddings_go_through_the_exact_cache(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The same text in another partition (another model) reuses the cached embedding."""
    proxy = start_proxy(rules=rules(tmp_path))
    client = sdk(proxy)
    ask(client, Q)
    ask(client, Q, model="gpt-4.1")
    assert fake.count(EMB) == 1


def test_two_instances_on_one_redis_share_candidates(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Indexed on one instance, found by the other."""
    a = start_proxy(rules=rules(tmp_path), cache=redis_server.url, data_dir=tmp_path / "a")
    b = start_proxy(rules=rules(tmp_path), cache=redis_server.url, data_dir=tmp_path / "b")
    assert ask(sdk(a), Q).headers["x-cache-status"] == "MISS"
    indexed(a, 1)
    hit = ask(sdk(b), PARAPHRASE)
    assert hit.headers["x-cache-status"] == "HIT"
    assert "; detail=semantic; similarity=" in hit.headers["cache-status"]
    assert fake.count(CHAT) == 1


def test_purging_an_entry_removes_its_vector(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """SQLite: a purge (and any deletion of an entry) takes its vector with it."""
    db = tmp_path / "c.db"
    proxy = start_proxy(rules=rules(tmp_path), cache=f"sqlite:///{db}", admin_token="t")
    client = sdk(proxy)
    ask(client, Q)
    indexed(proxy, 1)

    def vectors() -> int:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM vectors").fetchone()[0])

    assert vectors() == 1
    port = int(proxy.url.rsplit(":", 1)[1])
    got = post(
        port,
        orjson.dumps({"model": "gpt-4o-mini"}),
        {"Authorization": "Bearer t", "Content-Type": "application/json"},
        path="/_proxy/purge",
    )
    assert status_of(got) == 200 and orjson.loads(body_of(got))["purged"] >= 1
    assert vectors() == 0
    assert ask(client, PARAPHRASE).headers["x-cache-status"] == "MISS"


def test_a_redis_cluster_holds_the_index(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, redis_cluster: str
) -> None:
    """The partition's stream lives on one cluster node; a paraphrase finds it."""
    proxy = start_proxy(rules=rules(tmp_path), cache=redis_cluster)
    client = sdk(proxy)
    assert ask(client, Q).headers["x-cache-status"] == "MISS"
    indexed(proxy, 1)
    assert "detail=semantic; similarity=" in ask(client, PARAPHRASE).headers["cache-status"]


JUDGE = 'semantic_verify = "llm"\nsemantic_verify_model = "{model}"\n'


def test_the_verifier_confirms_a_candidate_once_per_pair(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """With semantic_verify = "llm", a paraphrase is served only after the judge says yes
    (one judge call, with the caller's key), the verdict is reused for the same pair, and
    its calls, latency and cost reach the line and the report."""
    fake.model_replies["gpt-4o-mini"] = "Yes."  # the judge (priced); asked with gpt-4.1
    proxy = start_proxy(rules=rules(tmp_path, extra=JUDGE.format(model="gpt-4o-mini")))
    client = sdk(proxy)
    ask(client, Q, model="gpt-4.1")
    indexed(proxy, 1)
    with capture_logs() as logs:
        hit = ask(client, PARAPHRASE, model="gpt-4.1")
        again = ask(client, PARAPHRASE, model="gpt-4.1")
    assert hit.headers["x-cache-status"] == again.headers["x-cache-status"] == "HIT"
    judged = [c for c in fake.calls if c.path == CHAT and c.json()["model"] == "gpt-4o-mini"]
    assert len(judged) == 1 and judged[0].headers["Authorization"] == "Bearer sk-test-a"
    assert PARAPHRASE in judged[0].json()["messages"][1]["content"]
    first, second = done_lines(logs)
    assert first["semantic_verify"] == "yes" and first["semantic_verify_calls"] == 1
    assert first["semantic_verify_ms"] > 0 and first["semantic_verify_cost_usd"] > 0
    assert second["semantic_verify"] == "yes" and second["semantic_verify_calls"] == 0
    report = Report(by="model")
    for entry in logs:
        report.feed(orjson.dumps(entry), None, None)
    total = report.rows()[-1]
    assert total["verify_calls"] == 1 and total["verify_p50_ms"] > 0
    assert total["verify_usd"] > 0


def test_the_verifier_saying_no_is_a_miss(
    start_proxy: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """A judge that says no (or neither yes nor no) turns the candidate down: a MISS whose
    line names the verifier as the refusal."""
    fake.model_replies["judge-no"] = "no"
    proxy = start_proxy(rules=rules(tmp_path, extra=JUDGE.format(model="judge-no")))
    client = sdk(proxy)
    ask(client, Q)
    indexed(proxy, 1)
    with capture_logs() as logs:
        miss = ask(client, PARAPHRASE)
    assert miss.headers["x-cache-status"] == "MISS"
    line = done_lines(logs)[-1]
    assert line["semantic_guard"] == "verifier" and line["semantic_verify"] == "no"
    fake.model_replies["judge-no"] = "Perhaps."
    with capture_logs() as logs:
        assert ask(client, "Tell me the capital of France").headers["x-cache-status"] == "MISS"
    line = done_lines(logs)[-1]
    assert line.get("semantic_guard") == "verifier"
    assert "neither yes nor no" in line["semantic_verify_error"]
