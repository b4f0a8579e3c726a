"""normalize.py on its own: canonical bodies."""

from __future__ import annotations

import re

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.normalize import canonical_json, canonical_multipart, drop_ignored, has_float
from proxy.rules import DEFAULT_IGNORE


def test_canonical_form_ignores_order_whitespace_and_number_spelling() -> None:
    """Sorted keys, one spelling per number: 1 and 1.0 are one value, 0.5 stays 0.5."""
    a = canonical_json({"b": 1, "a": [1.0, {"y": 2.0, "x": 0.5}]}, ())
    b = canonical_json({"a": [1, {"x": 0.5, "y": 2}], "b": 1.0}, ())
    assert a == b == b'{"a":[1,{"x":0.5,"y":2}],"b":1}'


def test_ignore_list_drops_fields_and_dotted_paths() -> None:
    """Default ignores drop user/metadata and stream_options.include_obfuscation only."""
    body = {
        "model": "m",
        "user": "u",
        "metadata": {"k": "v"},
        "stream_options": {"include_obfuscation": False},
        "temperature": 0,
    }
    assert drop_ignored(body, DEFAULT_IGNORE) == {"model": "m", "temperature": 0}
    kept = drop_ignored(
        {"stream_options": {"include_usage": True, "include_obfuscation": True}}, DEFAULT_IGNORE
    )
    assert kept == {"stream_options": {"include_usage": True}}


def test_multipart_canonical_form_keys_files_by_content_in_order() -> None:
    """Files are keyed by their bytes; image[] order matters; file names do not."""
    one = [("prompt", None, b"hat"), ("image[]", "a.png", b"A"), ("image[]", "b.png", b"B")]
    renamed = [("image[]", "x.png", b"A"), ("prompt", None, b"hat"), ("image[]", "y.png", b"B")]
    swapped = [("prompt", None, b"hat"), ("image[]", "a.png", b"B"), ("image[]", "b.png", b"A")]
    assert canonical_multipart(one, ()) == canonical_multipart(renamed, ())
    assert canonical_multipart(one, ()) != canonical_multipart(swapped, ())
    assert canonical_multipart([*one, ("user", None, b"u")], ("user",)) == canonical_multipart(
        one, ()
    )


_FLOAT_LITERAL = re.compile(rb"[0-9][.eE]|[0-9]{20}")
"""What has_float stands for: a digit followed by `.`, `e` or `E`, or 20 digits in a row."""


@settings(max_examples=500)
@given(st.binary(max_size=80) | st.text(alphabet="0123456789.eE x{}", max_size=80).map(str.encode))
def test_has_float_is_the_float_literal_pattern(body: bytes) -> None:
    """The cheap test finds exactly what the regex it replaced finds, on any bytes."""
    assert has_float(body) == (_FLOAT_LITERAL.search(body) is not None)


def test_has_float_on_json_bodies() -> None:
    """Floats, exponents and 20-digit integers need the walk; plain integers and text do not."""
    assert has_float(b'{"temperature":0.5}')
    assert has_float(b'{"n":1e3}')
    assert has_float(b'{"n":123456789012345678901}')
    assert not has_float(b'{"n":12345,"content":"version e. 1 e"}')
    # a float a walk would change, and one it leaves: the canonical forms differ accordingly
    assert canonical_json(orjson.loads(b'{"t":1.0}'), (), has_float(b'{"t":1.0}')) == b'{"t":1}'
