"""Stream verdicts, prices and the stored answer format: pure functions."""

from __future__ import annotations

import datetime as dt

import pytest

from proxy.cost import Prices
from proxy.models import CachedResponse
from proxy.rules import default_rules_path
from proxy.sse import usage_of_stream, verdict
from proxy.testing.fake_openai import recorded

PRICES = Prices.load(default_rules_path() / "prices.toml")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("chat_completion_stream_prompt_caching_cache_read", ""),
        ("chat_completion_tool_call_streamed", ""),
        ("response_stream", ""),
        ("response_stream_incomplete", ""),
    ],
)
def test_recorded_real_streams_are_whole(name, why):
    """Every recorded real stream (chat, tool calls, responses, incomplete) counts as whole."""
    body = recorded(name)["response"]["body_text"].encode()
    assert verdict(body) == why


def test_broken_streams_are_refused():
    """Cut streams, error events and response.failed are never whole."""
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    assert verdict(chunk * 3) == "stream ended without its terminal event"
    assert verdict(chunk + b'data: {"error": {"message": "boom"}}\n\n') != ""
    failed = b'event: response.failed\ndata: {"type":"response.failed"}\n\n'
    assert verdict(failed).startswith("stream ended with")
    assert verdict(chunk + b": keep-alive\n\n" + b"data: [DONE]\n\n") == ""
    assert verdict(b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n") == ""


def test_usage_from_streams():
    """The usage chunk of a chat stream and response.completed's usage are found."""
    chat = recorded("chat_completion_stream_prompt_caching_cache_read")["response"]["body_text"]
    usage = usage_of_stream(chat.encode())
    assert usage is not None
    details = usage["prompt_tokens_details"]
    assert isinstance(details, dict) and details["cached_tokens"] == 1280
    resp = recorded("response_stream")["response"]["body_text"]
    assert usage_of_stream(resp.encode()) == {
        "input_tokens": 17,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 48,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 65,
    }


def test_prices():
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


def test_cached_response_roundtrip_and_compression():
    """to_bytes/from_bytes keep every field; large bodies are compressed."""
    small = CachedResponse(
        200, (("Content-Type", "application/json"),), b"{}", 1.5, meta={"cost": {"tokens_in": 1}}
    )
    assert CachedResponse.from_bytes(small.to_bytes()) == small
    big = CachedResponse(
        200,
        (),
        b"data: x\n\n" * 5000,
        2.0,
        stream=True,
        chunk_ends=(9, 45000),
        chunk_ms=(0.0, 12.5),
        upstream_ms=99.0,
    )
    raw = big.to_bytes()
    assert raw.startswith(b"OCZ1") and len(raw) < len(big.body) / 10
    back = CachedResponse.from_bytes(raw)
    assert back == big and back.chunks() == [big.body[:9], big.body[9:]]
    with pytest.raises(ValueError):
        CachedResponse.from_bytes(b"junk")
