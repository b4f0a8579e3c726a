"""Stream/JSON twins: the recorded real answers converted both ways keep their content."""

from __future__ import annotations

import orjson

from proxy import twins
from proxy.sse import events, verdict
from proxy.testing.fake_openai import recorded


def body(name: str) -> bytes:
    text: str = recorded(name)["response"]["body_text"]
    return text.encode()


def test_recorded_chat_stream_to_json_and_back() -> None:
    """The recorded tool-call stream assembles to the object the API returns, and that object
    streams back to the same content."""
    for name in (
        "chat_completion_tool_call_streamed",
        "chat_completion_stream_prompt_caching_cache_read",
    ):
        stream = body(name)
        doc = orjson.loads(twins.chat_to_json(stream))
        again = orjson.loads(twins.chat_to_json(twins.chat_to_sse(orjson.dumps(doc), True)))
        assert again == doc
        assert doc["usage"] and doc["object"] == "chat.completion"
    calls = orjson.loads(twins.chat_to_json(body("chat_completion_tool_call_streamed")))
    msg = calls["choices"][0]["message"]
    assert msg["tool_calls"][0]["function"]["name"] == "extract_student_info"
    assert orjson.loads(msg["tool_calls"][0]["function"]["arguments"])  # whole JSON arguments
    assert calls["choices"][0]["finish_reason"] == "tool_calls"


def test_recorded_chat_json_to_stream_is_a_clean_stream() -> None:
    """A recorded chat JSON answer turns into a clean stream, with or without usage, and back to the
    same choices."""
    doc = recorded("chat_completion_tool_call")["response"]["body_text"].encode()
    for usage in (True, False):
        stream = twins.chat_to_sse(doc, usage)
        assert verdict(stream) == "" and stream.endswith(b"data: [DONE]\n\n")
        assert (b'"usage":{' in stream) is usage
        back = orjson.loads(twins.chat_to_json(stream))["choices"]
        original = orjson.loads(doc)["choices"]
        assert [(c["message"], c["finish_reason"]) for c in back] == [
            (c["message"], c["finish_reason"]) for c in original
        ]


def test_recorded_responses_both_ways() -> None:
    """A recorded Responses stream turns into JSON and back into a clean stream that gives the same
    JSON and text."""
    stream = body("response_stream")
    doc = orjson.loads(twins.responses_to_json(stream))
    assert doc["object"] == "response" and doc["status"] == "completed"
    again = twins.responses_to_sse(orjson.dumps(doc))
    assert verdict(again) == ""
    kinds = [name for name, _ in events(again)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert orjson.loads(twins.responses_to_json(again)) == doc
    text = "".join(
        orjson.loads(d)["delta"] for n, d in events(again) if n == "response.output_text.delta"
    )
    assert text == doc["output"][0]["content"][0]["text"]
