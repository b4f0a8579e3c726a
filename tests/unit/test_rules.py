"""rules.py on its own: loading, validation, matching, memos."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.rules import Rules, load_rules, parse_rules


def test_shipped_rules_load_and_match() -> None:
    """The shipped rules cache the documented routes; others pass through."""
    rules = load_rules(None)
    for route in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/speech",
        "/v1/moderations",
    ):
        assert rules.match("POST", route, "gpt-4o") is not None, route
    assert rules.match("GET", "/v1/models", None) is None
    assert rules.match("POST", "/v1/files", None) is None
    assert rules.match("POST", "/openai/deployments/d1/chat/completions", "d1") is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nroute = "v1/x"', "must be a path"),
        ('[[rule]]\nroute = "/v1/x"\nttl_s = -1', "'ttl_s' must be a number >= 0"),
        ('[[rule]]\nroute = "/v1/x"\nreplay = "slow"', "'replay'"),
        ('[[rule]]\nroute = "/v1/x"\ncolor = 1', "unknown field"),
        ('[rule]\nroute = "/v1/x"', "use [[rule]]"),
        ("[[rule]\n", "not valid TOML"),
        ('[[rule]]\nroute = "/v1/x"\nenabled = "yes"', "true or false"),
    ],
)
def test_bad_rules_stop_the_boot_with_one_clear_line(text: str, message: str) -> None:
    """A bad rule raises ConfigError naming the file, the rule and what is wrong."""
    with pytest.raises(ConfigError, match=r"rules f\.toml") as info:
        parse_rules(text, "f.toml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_globs_and_first_match_wins() -> None:
    """A model-specific rule listed first wins over the route's general rule."""
    rules = Rules(
        parse_rules(
            '[[rule]]\nroute = "/v1/chat/*"\nmodels = ["gpt-4o-mini*"]\nttl_s = 5\n'
            '[[rule]]\nroute = "/v1/chat/*"\nttl_s = 9\n',
            "t",
        )
    )
    ttls = [
        getattr(rules.match("POST", "/v1/chat/completions", m), "ttl_s", None)
        for m in ("gpt-4o-mini-2024", "gpt-4o", None)
    ]
    assert ttls == [5, 9, 9]


def test_rule_memos_never_keep_a_clients_long_strings() -> None:
    """A megabyte model name or path is matched but not memoised (the memos stay small)."""
    from proxy.rules import Rules, parse_rules

    rules = Rules(parse_rules('[[rule]]\nroute = "/v1/*"\nmodels = ["gpt-*"]\n', "t"))
    for i in range(50):
        assert rules.match("POST", "/v1/chat", f"gpt-{i}" + "m" * 100_000) is not None
        assert rules.has_route("POST", "/v1/" + "p" * 100_000 + str(i))
    assert rules.match("POST", "/v1/chat", "gpt-4o") is not None
    kept = list(rules._match_cache) + list(rules._route_cache)
    assert kept and all(len(str(k)) < 1024 for k in kept)
