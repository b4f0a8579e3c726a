"""The semantic layer's pure parts: guards, what is compared, partitions, the index records
and rows, the stores' vector records, rule options and the report's semantic columns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ConfigError
from proxy.guards import features, refusal
from proxy.guards import pack as pack_guards
from proxy.guards import unpack as unpack_guards
from proxy.keys import Scope
from proxy.models import CachedResponse
from proxy.plan import make_plan
from proxy.report import Report
from proxy.rules import Rules, parse_rules
from proxy.semantic import TEXT_MAX, query_of
from proxy.stores import MemoryStore
from proxy.stores.sqlite import SQLiteStore
from proxy.vectors import Partition, pack, top, unpack

KEY = b"k" * 32


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        ("Is Paris the capital of France?", "Is Paris not the capital of France?", "negation"),
        ("Is it safe?", "Isn't it safe?", "negation"),
        ("Do I need a visa?", "I don't need a visa?", "negation"),
        ("Should I go?", "Should I never go?", "negation"),
        ("What is 17 and 25?", "What is 17 and 26?", "numbers"),
        ("Split 1,000 dollars", "Split 1,001 dollars", "numbers"),
        ("Three apples", "Four apples", "numbers"),
        ("twenty five", "twenty six", "numbers"),
        ("Give me 2 ideas", "Give me ideas", "numbers"),
        ("a hundred", "a thousand", "numbers"),
    ],
)
def test_guards_turn_down_the_known_false_hits(a: str, b: str, why: str) -> None:
    """Each known false hit is turned down by the guard named, from its stored form too."""
    assert refusal(features(a, KEY), features(b, KEY)) == why
    assert refusal(unpack_guards(pack_guards(features(a, KEY))), features(b, KEY)) == why


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 17 and 25?", "what's seventeen and twenty-five"),
        ("Split 1,000 dollars", "split 1000 dollars"),
        ("0.50 or 2.0", "0.5 or 2"),
        ("two hundred and five", "205"),
        ("one thousand two hundred", "1200"),
        ("Isn't it safe?", "Is it not safe?"),
        ("What is the capital of France?", "Tell me France's capital"),
    ],
)
def test_guards_let_the_same_numbers_and_negations_through(a: str, b: str) -> None:
    """The same numbers and negations, written otherwise, pass."""
    assert refusal(features(a, KEY), features(b, KEY)) is None


@given(st.text(max_size=200), st.text(max_size=200))
def test_signatures_agree_with_the_guards(a: str, b: str) -> None:
    """The stored digests decide exactly as the features do (and never raise)."""
    fa, fb = features(a, KEY), features(b, KEY)
    assert refusal(unpack_guards(pack_guards(fa)), unpack_guards(pack_guards(fb))) == refusal(
        fa, fb
    )
    assert refusal(fa, fa) is None


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": list(messages), **extra}


USER = {"role": "user", "content": "hello there"}


@pytest.mark.parametrize(
    ("twin", "fields", "text"),
    [
        ("chat", chat(USER), "hello there"),
        (
            "chat",
            chat(
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ),
            "a\nb",
        ),
        ("chat", chat({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}), None),
        ("chat", chat({"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}), None),
        ("chat", chat({"role": "tool", "tool_call_id": "1", "content": "42"}), None),
        ("chat", chat(USER, {"role": "assistant", "content": "hi"}), None),
        ("chat", chat({"role": "user", "content": "   "}), None),
        ("chat", chat({"role": "user", "content": "x" * (TEXT_MAX + 1)}), None),
        ("chat", {"model": "m"}, None),
        ("responses", {"model": "m", "input": "hello"}, "hello"),
        (
            "responses",
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}],
            },
            "q",
        ),
        (
            "responses",
            {"model": "m", "input": [{"type": "function_call_output", "output": "1"}]},
            None,
        ),
        (
            "responses",
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            None,
        ),
    ],
)
def test_only_plain_user_text_is_compared(
    twin: str, fields: dict[str, Any], text: str | None
) -> None:
    """Only the plain text of a last user message is compared; images, tools, other roles, blank or
    oversize text are not."""
    found = query_of(twin, fields)
    assert (found[0] if found else None) == text


RULES = Rules(
    parse_rules(
        '[[rule]]\nroute = "/v1/chat/completions"\nsemantic = "on"\n'
        '[[rule]]\nroute = "/v1/responses"\n',
        "t",
    )
)


def partition(
    body: dict[str, Any],
    *,
    tenant: bytes = b"t" * 32,
    namespace: str = "",
    route: str = "/v1/chat/completions",
) -> str | None:
    scope = Scope(b"s", tenant, "POST", route, "")
    plan = make_plan(RULES, scope, namespace, "application/json", orjson.dumps(body))
    return plan.semantic.partition if plan.semantic else None


def test_partitions_hold_everything_but_the_last_user_text() -> None:
    """A semantic partition covers every part of the request but the last user text, so any other
    difference separates partitions."""
    base = partition(chat({"role": "user", "content": "What is the capital of France?"}))
    assert base is not None and base.rpartition(".")[2].startswith("s")
    assert partition(chat({"role": "user", "content": "France's capital?"})) == base
    # twins share one partition, as they share one key; ignored fields do not count
    assert partition(chat({"role": "user", "content": "x"}, stream=True, user="u")) == base
    others = [
        partition(chat({"role": "system", "content": "s"}, {"role": "user", "content": "x"})),
        partition({**chat({"role": "user", "content": "x"}), "model": "gpt-4.1"}),
        partition(chat({"role": "user", "content": "x"}, temperature=0.5)),
        partition(chat({"role": "user", "content": "x"}, tools=[{"type": "function"}])),
        partition(chat({"role": "user", "content": "x"}), tenant=b"u" * 32),
        partition(chat({"role": "user", "content": "x"}), namespace="n"),
    ]
    assert base not in others and len(set(others)) == len(others)
    assert partition({"model": "m", "input": "x"}, route="/v1/responses") is None  # rule off


def test_rule_options_are_validated() -> None:
    """Semantic rule options are parsed and bad values are refused with ConfigError."""
    rule = parse_rules(
        '[[rule]]\nroute = "/x"\nsemantic = "shadow"\nsemantic_threshold = 0.9\n', "t"
    )[0]
    assert (rule.semantic, rule.semantic_threshold, rule.semantic_model) == (
        "shadow",
        0.9,
        "text-embedding-3-small",
    )
    for bad in (
        'semantic = "yes"',
        "semantic_threshold = 0",
        "semantic_threshold = 1.5",
        'semantic_model = " "',
    ):
        with pytest.raises(ConfigError):
            parse_rules(f'[[rule]]\nroute = "/x"\n{bad}\n', "t")


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_records_round_trip_without_the_text() -> None:
    """A vector record round-trips its member, signature, expiry and vector, and a truncated record
    is refused."""
    record = pack("v2:a.b.c.d.e", b"s" * 16, 123.5, unit(1, 2, 3))
    member, sig, expires, vector = unpack(record)
    assert (member, sig, expires) == ("v2:a.b.c.d.e", b"s" * 16, 123.5)
    assert np.allclose(vector, unit(1, 2, 3), atol=1e-3)
    with pytest.raises(ValueError):
        unpack(record[:-1])


def test_a_partition_keeps_the_newest_and_ranks_by_cosine() -> None:
    """A partition keeps about its newest records without doubling, ranks by cosine, and forgets a
    dropped member."""
    part = Partition(keep=100)
    future = time.time() + 60
    rows = [(i + 1, pack(f"m{i}", b"s" * 16, future, unit(1, i, 0))) for i in range(200)]
    part.add(rows)
    part.add(rows[-5:])  # read twice (two syncs at once): nothing doubles
    assert part.n <= 100 + 64 and part.members[-1] == "m199"
    view = part.view()
    scores = view.scores(unit(1, 0, 0), time.time())
    best = top(scores, 3)
    assert view.members[best[0]] == part.members[0]  # the smallest angle left
    assert scores[best[0]] >= scores[best[1]] >= scores[best[2]]
    view.forget(best[0])
    assert part.view().scores(unit(1, 0, 0), time.time())[best[0]] == -2.0


def test_an_expired_or_other_sized_record_is_never_a_candidate() -> None:
    """An expired record or a vector of another size never becomes a candidate."""
    part = Partition(keep=10)
    part.add([(1, pack("old", b"s" * 16, time.time() - 1, unit(1, 0)))])
    part.add([(2, pack("odd", b"s" * 16, time.time() + 60, unit(1, 0, 0)))])
    assert part.n == 1
    assert part.view().scores(unit(1, 0), time.time())[0] == -2.0


def entry() -> CachedResponse:
    return CachedResponse(status=200, headers=(), body=b"{}", created=time.time(), stream=False)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_stores_keep_records_and_drop_them_with_their_entry(kind: str, tmp_path: Path) -> None:
    """Memory and SQLite stores keep vector records in order and drop them with their entry or a
    purge."""

    async def go() -> None:
        store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "v.db")
        later = time.time() + 60
        for i in range(3):
            await store.set(f"v2:t.n.m.r.{i}", entry(), 60)
            await store.vectors_add("v2:t.n.m.r.sP", f"v2:t.n.m.r.{i}", b"r%d" % i, later, 10)
        got = await store.vectors_since("v2:t.n.m.r.sP", 0, 100)
        assert [r for _, r in got] == [b"r0", b"r1", b"r2"]
        assert [r for _, r in await store.vectors_since("v2:t.n.m.r.sP", got[0][0], 100)] == [
            b"r1",
            b"r2",
        ]
        await store.delete("v2:t.n.m.r.1")
        assert [r for _, r in await store.vectors_since("v2:t.n.m.r.sP", 0, 100)] == [b"r0", b"r2"]
        await store.purge("v2:t.*")
        assert await store.vectors_since("v2:t.n.m.r.sP", 0, 100) == []
        await store.aclose()

    asyncio.run(go())


def test_the_report_shows_would_be_hits_and_the_score_distribution() -> None:
    """The report counts shadow semantic would-be hits, their savings and the score distribution."""
    report = Report(by="route")
    lines = [
        {
            "cache": "miss",
            "semantic": "shadow",
            "semantic_score": 0.97,
            "semantic_hit": True,
            "cost_usd": 0.25,
        },
        {
            "cache": "miss",
            "semantic": "shadow",
            "semantic_score": 0.91,
            "semantic_hit": False,
            "cost_usd": 0.5,
        },
        {"cache": "miss", "semantic": "shadow", "cost_usd": 1.0},
        {"cache": "miss", "cost_usd": 1.0},
    ]
    for line in lines:
        report.feed(
            orjson.dumps({"event": "request.done", "route": "/v1/chat/completions", **line}),
            None,
            None,
        )
    row = report.rows()[-1]
    assert (row["shadow_lookups"], row["shadow_would_hit"], row["shadow_hit_ratio"]) == (
        3,
        1,
        0.3333,
    )
    assert row["shadow_saved_usd"] == 0.25
    at = {r["threshold"]: r for r in report.scores.rows()}
    assert report.scores.lookups == 3
    assert (at[0.90]["hits"], at[0.90]["usd"]) == (2, 0.75)
    assert (at[0.95]["hits"], at[0.99]["hits"]) == (1, 0)


def test_sqlite_index_records_count_against_the_cap(tmp_path: Path) -> None:
    """A record adds its bytes to the store's total; deleting its entry takes them back."""

    async def go() -> None:
        store = SQLiteStore(tmp_path / "c.db", max_bytes=None)
        await store.set("v2:a", entry(), 60)
        before = await store.total_bytes()
        await store.vectors_add("p", "v2:a", b"x" * 1000, time.time() + 60, 10)
        await store.vectors_add("p", "v2:gone", b"y" * 1000, time.time() + 60, 10)  # no entry
        assert await store.total_bytes() == before + 1000
        await store.vectors_add("p", "v2:a", b"z" * 500, time.time() + 60, 10)  # replaced
        assert await store.total_bytes() == before + 500
        await store.delete("v2:a")
        assert await store.total_bytes() == 0
        assert await store.vectors_since("p", 0, 10) == []
        await store.aclose()

    asyncio.run(go())


def test_the_text_is_read_from_the_body_not_kept_in_the_plan() -> None:
    """Plans are memoised: a plan holds the partition, the lookup reads the text anew."""
    from proxy.semantic import text_of

    body = orjson.dumps(chat({"role": "system", "content": "s"}, {"role": "user", "content": "q?"}))
    assert text_of("chat", body) == "q?"
    assert text_of("responses", orjson.dumps({"model": "m", "input": "r"})) == "r"
    scope = Scope(b"s", b"t" * 32, "POST", "/v1/chat/completions", "")
    plan = make_plan(RULES, scope, "", "application/json", body)
    assert plan.semantic is not None and not hasattr(plan.semantic, "text")


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b'{"data": []}',
        b'{"data": [{"embedding": [0, 0, 0]}]}',
        b'{"data": [{"embedding": [1e400, 1]}]}',
        b'{"data": [{"embedding": [[1, 2], [3, 4]]}]}',
        orjson.dumps({"data": [{"embedding": [1.0] * 9000}]}),
    ],
)
def test_a_broken_embeddings_answer_is_refused(answer: bytes) -> None:
    """An upstream's odd answer never becomes a vector (the request is a plain MISS)."""
    from proxy.errors import EmbeddingFailed
    from proxy.vectors import _vector_of

    with pytest.raises(EmbeddingFailed):
        _vector_of(answer)


def test_the_judge_request_and_verdict() -> None:
    """The judge is asked for one word, deterministically; only yes or no is a verdict, and
    the rule option takes only "off" or "llm"."""
    from proxy.semantic import answer_text, judge_body, judge_says

    body = orjson.loads(judge_body("gpt-4o-mini", "Capital of France?", "Paris."))
    assert body["temperature"] == 0 and body["max_tokens"] == 2
    assert "Capital of France?" in body["messages"][1]["content"]

    def said(text: str) -> bool | None:
        return judge_says(orjson.dumps({"choices": [{"message": {"content": text}}]}))

    assert (said("Yes."), said(" no"), said("maybe"), judge_says(b"{}")) == (
        True,
        False,
        None,
        None,
    )
    chat_answer = orjson.dumps({"choices": [{"message": {"content": "Paris."}}]})
    assert answer_text("chat", chat_answer, stream=False) == "Paris."
    assert answer_text("chat", b"not json", stream=False) is None
    (rule,) = parse_rules('[[rule]]\nroute = "/x"\nsemantic_verify = "llm"\n', "t")
    assert rule.semantic_verify == "llm" and rule.semantic_verify_model == "gpt-4o-mini"
    with pytest.raises(ConfigError):
        parse_rules('[[rule]]\nroute = "/x"\nsemantic_verify = "yes"\n', "t")
    with pytest.raises(ConfigError, match="semantic_embeddings_url"):
        parse_rules('[[rule]]\nroute = "/x"\nsemantic_embeddings_url = "localhost:8000"\n', "t")
