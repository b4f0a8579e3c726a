"""plan.py on its own: Cache-Control, routes, make_plan (keys, twins, fingerprints) and
decide (what the data path does with a planned request)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.controls import DEFAULT_CONTROLS, ClientControls, Mode, parse_cache_control
from proxy.errors import BadBody
from proxy.intake import route_of
from proxy.keys import Scope, key_id
from proxy.plan import (
    Keyed,
    PassThrough,
    Plan,
    decide,
    make_plan,
)
from proxy.rules import Rules, parse_rules

RULES = Rules(
    parse_rules(
        '[[rule]]\nroute = "/v1/chat/completions"\nttl_s = 100\nstale_if_error_s = 50\n'
        '[[rule]]\nroute = "/v1/embeddings"\nstore = false\n'
        '[[rule]]\nroute = "/v1/moderations"\nenabled = false\n',
        "t",
    )
)
TENANT = b"t" * 32
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def plan(
    body: object, route: str = "/v1/chat/completions", *, ctype: str = "application/json", **kw: Any
) -> Plan:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return make_plan(RULES, Scope(b"s", TENANT, "POST", route, ""), "", ctype, raw, **kw)


@pytest.mark.parametrize(
    ("value", "mode", "max_age", "stale"),
    [
        (None, Mode.LOOKUP, None, None),
        ("no-cache", Mode.REFRESH, None, None),
        ("no-store, no-cache", Mode.BYPASS, None, None),
        ("max-age=30, max-age=10", Mode.LOOKUP, 10.0, None),
        ("max-age=-1, max-age=1.5, max-age=nan", Mode.LOOKUP, None, None),
        ("max-age=99999999999999", Mode.LOOKUP, 2.0**31, None),
        ('stale-if-error="60"', Mode.LOOKUP, None, 60.0),
    ],
)
def test_cache_control(
    value: str | None, mode: Mode, max_age: float | None, stale: float | None
) -> None:
    """Cache-Control parses to the right mode, max-age and stale-if-error, taking the smallest sane
    max-age and capping huge ones."""
    c = parse_cache_control(value, None)
    assert (c.mode, c.max_age, c.stale_if_error) == (mode, max_age, stale)


def test_stale_window_is_the_smaller_of_rule_and_request() -> None:
    """The stale window is the smaller of the rule's and the request's, and either one alone when
    the other is zero or absent."""
    assert ClientControls(Mode.LOOKUP, None, "", 30.0).stale_window(50.0) == 30.0
    assert ClientControls(Mode.LOOKUP, None, "", 80.0).stale_window(50.0) == 50.0
    assert ClientControls(Mode.LOOKUP, None, "", 80.0).stale_window(0.0) == 80.0
    assert DEFAULT_CONTROLS.stale_window(50.0) == 50.0


@pytest.mark.parametrize(
    ("path", "route", "upstream"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
        ("/chat/completions", "/v1/chat/completions", "/v1/chat/completions"),
        ("/openai/v1/responses", "/v1/responses", "/openai/v1/responses"),
        ("/openai/deployments/d/chat/completions", "/openai/deployments/d/chat/completions", None),
    ],
)
def test_routes(path: str, route: str, upstream: str | None) -> None:
    """Paths with or without /v1 and under /openai map to their route and the upstream path."""
    assert route_of(path) == (route, upstream or path)


def test_keys_ignore_field_order_whitespace_and_ignored_fields() -> None:
    """Keys ignore field order, whitespace and ignored fields, but change with any other field."""
    a = plan(CHAT)
    b = plan(b' { "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o-mini" } ')
    c = plan({**CHAT, "user": "u1", "metadata": {"x": 1}})
    assert a.key == b.key == c.key and a.rule is not None
    assert plan({**CHAT, "temperature": 0.5}).key != a.key


def test_twins_share_a_key_and_differ_in_form() -> None:
    """JSON and stream twins (with or without usage) share a key and differ only in their form."""
    json_plan = plan(CHAT)
    sse = plan({**CHAT, "stream": True})
    usage = plan({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert json_plan.key == sse.key == usage.key
    assert (json_plan.form, sse.form, usage.form) == ("json", "sse", "sse+usage")
    assert sse.stream and not json_plan.stream


def test_the_fingerprint_is_computed_only_when_asked() -> None:
    """The body fingerprint is computed only when asked, covers ignored fields, and never changes
    the key."""
    assert plan(CHAT, fingerprint=False).fingerprint == ""
    with_fp = plan(CHAT)
    assert with_fp.fingerprint and with_fp.fingerprint != plan({**CHAT, "user": "u"}).fingerprint
    assert plan(CHAT, fingerprint=False).key == with_fp.key


def test_bodies_that_lie_about_their_type_are_refused() -> None:
    """JSON bodies that do not parse to an object are refused, while form bodies are keyed by their
    content."""
    with pytest.raises(BadBody):
        plan(b"not json")
    with pytest.raises(BadBody):
        plan(b"[1, 2]")
    form = plan(b"a=1&b=2", ctype="application/x-www-form-urlencoded")
    assert form.key and form.key != plan(b"a=1&b=3", ctype="application/x-www-form-urlencoded").key


def test_no_rule_or_a_disabled_rule_is_a_plain_plan() -> None:
    """A route without a rule, a disabled rule, or a never_if field gives a plan without a rule."""
    assert plan({"input": "x"}, "/v1/files").rule is None
    assert plan({"model": "m", "input": "x"}, "/v1/moderations").rule is None
    assert plan({**CHAT, "background": True}).rule is None  # never_if


def test_decide() -> None:
    """decide keys ruled requests with their TTL and stale window, passes others through, and keys
    any route with an Idempotency-Key."""
    p = plan(CHAT)
    keyed = decide(p, DEFAULT_CONTROLS)
    assert keyed == Keyed(p.key, DEFAULT_CONTROLS, 100.0, 50.0, True, kid=p.kid)
    short = parse_cache_control("max-age=10, stale-if-error=80", None)
    assert decide(p, short) == Keyed(p.key, short, 10.0, 80.0, True, kid=p.kid)
    assert isinstance(decide(p, parse_cache_control("no-store", None)), PassThrough)
    assert isinstance(decide(plan({"input": "x"}, "/v1/files"), DEFAULT_CONTROLS), PassThrough)
    unstored = decide(plan({"model": "e", "input": "x"}, "/v1/embeddings"), DEFAULT_CONTROLS)
    assert isinstance(unstored, Keyed) and not unstored.store
    # an Idempotency-Key keys any route, looks up whatever Cache-Control says, for its TTL
    idem = decide(
        plan({"input": "x"}, "/v1/files"),
        parse_cache_control("no-store", "ns"),
        idempotency=("idem:k", "fp"),
        idempotency_ttl_s=60.0,
    )
    lookup = ClientControls(Mode.LOOKUP, None, "ns")
    assert idem == Keyed("idem:k", lookup, 60.0, 0.0, True, "fp", key_id("idem:k"))
