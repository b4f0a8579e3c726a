"""The plan memo (intake._planned) never hands one request the plan made for another."""

from __future__ import annotations

import orjson
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.controls import read_controls
from proxy.intake import _planned
from proxy.keys import Scope, request_digest, tenant_digest
from proxy.plan import Plan, make_plan
from proxy.rules import load_rules
from proxy.state import Planner, Workers

CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def _planner() -> Planner:
    return Planner(load_rules(None), b"s" * 32, 1 << 20, 1.0, 60.0, Workers())


def _plan(pl: Planner, headers: dict[str, str], body: bytes) -> tuple[Plan, Plan]:
    request = make_mocked_request("POST", "/v1/chat/completions", headers=CIMultiDict(headers))
    controls, caller = read_controls(request.headers)
    memo = _planned(pl, request, "/v1/chat/completions", "", controls, caller, None, body)
    _, creds = request_digest(pl.mac_key, request.headers, (), b"")
    tenant = tenant_digest(pl.mac_key, *creds)
    scope = Scope(pl.secret, tenant, "POST", "/v1/chat/completions", "")
    fresh = make_plan(
        pl.rules,
        scope,
        controls.namespace,
        headers["Content-Type"],
        body,
        fingerprint=False,
        caller=caller,
    )
    return memo[0], fresh


def test_a_caller_key_cannot_run_into_the_body_in_the_memo_digest() -> None:
    """A request with X-Cache-Key "abc" and a JSON body, and one without it whose body is
    the caller part of the memo ("3:abc|") followed by that JSON, get their own plans."""
    pl = _planner()
    base = {"Authorization": "Bearer sk-a", "Content-Type": "text/plain"}
    raw_first, raw_fresh = _plan(pl, base, b"3:abc|" + CHAT)
    keyed, keyed_fresh = _plan(pl, {**base, "X-Cache-Key": "abc"}, CHAT)
    assert raw_first.key == raw_fresh.key
    assert keyed.key == keyed_fresh.key, "the memo gave the caller-keyed request another plan"
    pl.workers.close()


HEADER_TEXT = st.sampled_from(["a", "b|", "3:abc|"])
VARIANTS = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": HEADER_TEXT,
        "api-key": HEADER_TEXT,
        "x-api-key": HEADER_TEXT,
        "OpenAI-Organization": HEADER_TEXT,
        "OpenAI-Project": HEADER_TEXT,
        "X-Cache-Namespace": HEADER_TEXT,
        "X-Cache-Key": st.sampled_from(["a", "abc", "3:abc|"]),
        "X-Cache-Ignore-Fields": st.sampled_from(["model", "messages", "a,b", "3:abc|"]),
    },
)
PREFIXES = [b"", b"3:abc|", b"1:a|", b"0:|a,b", b"|", b"a|", b"3:abc|model"]
BODIES = st.sampled_from([p + b for p in PREFIXES for b in (CHAT, b"{}", b"")])


@settings(max_examples=400, deadline=None, print_blob=True)
@given(st.lists(st.tuples(VARIANTS, BODIES), min_size=2, max_size=6))
def test_a_memoised_plan_is_the_plan_made_afresh(
    requests: list[tuple[dict[str, str], bytes]],
) -> None:
    """Whatever mix of credential, namespace and caller headers and bodies comes in (in any
    order, one memo), each request's memoised plan and tenant are the ones made afresh."""
    pl = _planner()
    try:
        for headers, body in requests:
            headers = {k: v.strip() for k, v in headers.items() if v.strip()}
            headers["Content-Type"] = "text/plain"
            memo, fresh = _plan(pl, headers, body)
            assert (memo.key, memo.caller, memo.model) == (fresh.key, fresh.caller, fresh.model)
    finally:
        pl.workers.close()
