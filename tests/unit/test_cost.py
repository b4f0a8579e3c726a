"""cost.py on its own: prices."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy.cost import Prices
from proxy.rules import default_rules_path

PRICES = Prices.load(default_rules_path() / "prices.toml")


def test_prices() -> None:
    """Tokens, cached tokens, images and speech are priced; unknown models are unpriced."""
    today = dt.date(2026, 1, 1)
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 400},
    }
    cost = PRICES.cost("/v1/chat/completions", "gpt-4o-mini-2024-07-18", usage, {}, today=today)
    assert cost is not None
    assert cost.usd == pytest.approx((600 * 0.15 + 400 * 0.075 + 100 * 0.60) / 1e6)
    big = PRICES.cost("/v1/chat/completions", "gpt-4o", usage, {}, today=today)
    assert big is not None
    assert big.usd == (pytest.approx((600 * 2.5 + 400 * 1.25 + 100 * 10) / 1e6))
    unpriced = PRICES.cost("/v1/chat/completions", "ft:custom", usage, {}, today=today)
    assert unpriced is not None and unpriced.usd is None and unpriced.tokens_in == 1000
    img = PRICES.cost(
        "/v1/images/generations",
        "dall-e-3",
        None,
        {"size": "1792x1024", "quality": "hd"},
        today=today,
        images=2,
    )
    assert img is not None and img.usd == pytest.approx(0.24)
    speech = PRICES.cost("/v1/audio/speech", "tts-1", None, {"input_chars": 1000}, today=today)
    assert speech is not None and speech.usd == pytest.approx(0.015)
    assert PRICES.cost("/v1/chat/completions", "gpt-4o-mini", None, {}, today=today) is None
    assert PRICES.token_price("gpt-4.1-mini", dt.date(2020, 1, 1)) is None  # before `since`
