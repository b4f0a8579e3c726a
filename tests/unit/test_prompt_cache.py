"""prompt_cache: the auto key, the splice that adds it, the provider's savings."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cost import Prices, TokenPrice
from proxy.prompt_cache import auto_prompt_cache_key, provider_saved, with_prompt_cache_key

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, print_blob=True)
@given(
    st.dictionaries(
        st.text(max_size=6).filter(lambda k: k != "prompt_cache_key"), JSON, max_size=5
    ),
    st.sampled_from([b"", b" ", b"\n  "]),
)
def test_the_splice_adds_exactly_one_field(obj: dict[str, Any], pad: bytes) -> None:
    """Whatever the object and the whitespace around it, the spliced body parses to the same
    object plus prompt_cache_key (print_blob: a failure prints its reproduction)."""
    body = pad + orjson.dumps(obj) + pad
    spliced = with_prompt_cache_key(body, "ocp-x")
    assert orjson.loads(spliced) == {"prompt_cache_key": "ocp-x", **obj}


def test_the_splice_leaves_non_objects_alone() -> None:
    """A body that is not a JSON object's text goes up as it came."""
    for body in (b"", b"[1]", b"null", b"x"):
        assert with_prompt_cache_key(body, "k") == body


def test_the_auto_key_is_per_tenant_and_prefix() -> None:
    """The key depends on the tenant and the stable prefix, not on the last user message;
    a request with no system prompt or tools gets none."""

    def key(tenant: bytes, system: str, user: str) -> str | None:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": user})
        return auto_prompt_cache_key(b"s", tenant, "chat", {"model": "m", "messages": msgs})

    assert key(b"t1", "sys", "a") == key(b"t1", "sys", "b")
    assert key(b"t1", "sys", "a") != key(b"t2", "sys", "a")
    assert key(b"t1", "sys", "a") != key(b"t1", "other", "a")
    assert key(b"t1", "", "a") is None
    tools = {"model": "m", "tools": [{"type": "function"}], "input": "hi"}
    assert auto_prompt_cache_key(b"s", b"t", "responses", tools) is not None


def test_cached_tokens_are_priced_at_the_cached_price() -> None:
    """A usage with cached tokens costs them at cached_input and says what that saved."""
    price = TokenPrice(("m",), __import__("datetime").date(2000, 1, 1), 2.0, 0.5, 8.0)
    prices = Prices((price,))
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 1024},
    }
    cost = prices.cost("/v1/chat/completions", "m", usage, {})
    assert cost is not None and cost.tokens_cached == 1024
    assert cost.provider_saved_usd == provider_saved(1024, 2.0, 0.5) == round(1024 * 1.5e-6, 8)
    assert cost.usd == round((976 * 2.0 + 1024 * 0.5 + 10 * 8.0) / 1e6, 8)
    assert cost.fields()["cached_tokens"] == 1024
    plain = prices.cost("/v1/chat/completions", "m", {"prompt_tokens": 5}, {})
    assert plain is not None and "cached_tokens" not in plain.fields()
