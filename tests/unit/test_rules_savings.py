"""The rule options of issue #28: caller_keys, prompt_cache_key, embeddings_per_item."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.rules import parse_rules


def test_defaults_and_values() -> None:
    """Caller keys and items are on by default, the auto prompt_cache_key is opt-in."""
    (rule,) = parse_rules('[[rule]]\nroute = "/v1/embeddings"\n', "t")
    assert rule.caller_keys and rule.embeddings_per_item and rule.prompt_cache_key == "off"
    text = (
        '[[rule]]\nroute = "/v1/chat/completions"\ncaller_keys = false\n'
        'prompt_cache_key = "auto"\nembeddings_per_item = false\n'
    )
    (rule,) = parse_rules(text, "t")
    assert not rule.caller_keys and not rule.embeddings_per_item
    assert rule.prompt_cache_key == "auto"


@pytest.mark.parametrize(
    "line",
    [
        'prompt_cache_key = "on"',
        "prompt_cache_key = true",
        'caller_keys = "no"',
        "embeddings_per_item = 1",
    ],
)
def test_bad_values_stop_the_boot(line: str) -> None:
    """A value the option does not take is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        parse_rules(f'[[rule]]\nroute = "/v1/chat/completions"\n{line}\n', "t")
