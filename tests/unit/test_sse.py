"""sse.py on its own: stream verdicts and usage."""

from __future__ import annotations

import pytest

from proxy.sse import usage_of_stream, verdict
from proxy.testing.fake_openai import recorded


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("chat_completion_stream_prompt_caching_cache_read", ""),
        ("chat_completion_tool_call_streamed", ""),
        ("response_stream", ""),
        ("response_stream_incomplete", ""),
    ],
)
def test_recorded_real_streams_are_whole(name: str, why: str) -> None:
    """Every recorded real stream (chat, tool calls, responses, incomplete) counts as whole."""
    body = recorded(name)["response"]["body_text"].encode()
    assert verdict(body) == why


def test_broken_streams_are_refused() -> None:
    """Cut streams, error events and response.failed are never whole."""
    chunk = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    assert verdict(chunk * 3) == "stream ended without its terminal event"
    assert verdict(chunk + b'data: {"error": {"message": "boom"}}\n\n') != ""
    failed = b'event: response.failed\ndata: {"type":"response.failed"}\n\n'
    assert verdict(failed).startswith("stream ended with")
    assert verdict(chunk + b": keep-alive\n\n" + b"data: [DONE]\n\n") == ""
    assert verdict(b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n") == ""


def test_usage_from_streams() -> None:
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
