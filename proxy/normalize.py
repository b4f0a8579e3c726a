"""Request body -> canonical bytes for the cache key. Pure functions, no I/O.

The canonical form keeps every field except the rule's ignore list (a key built from an
allow-list would silently merge requests that differ in a field the API adds later), with
sorted keys, no insignificant whitespace and one form per number (1.0 and 1 are one value).
Multipart bodies are keyed by their parsed fields and file digests, never by the boundary.
"""

from __future__ import annotations

import hashlib
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import orjson


class BadBody(ValueError):
    """The body could not be parsed as what its content type says."""


def parse_json(body: bytes) -> Any:
    """Parse a JSON body; BadBody if it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"We could not parse the JSON body of your request: {exc}") from None


def _canon_value(value: Any) -> Any:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _canon_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon_value(v) for v in value]
    return value


def drop_ignored(obj: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `obj` without the ignored dotted paths; a table left empty by it goes too."""
    out = dict(obj)
    for path in ignore:
        head, _, rest = path.partition(".")
        if head not in out:
            continue
        if not rest:
            del out[head]
            continue
        inner = out[head]
        if isinstance(inner, dict):
            pruned = drop_ignored(inner, (rest,))
            if pruned or not inner:
                out[head] = pruned
            else:
                del out[head]
    return out


def canonical_json(obj: Any, ignore: tuple[str, ...]) -> bytes:
    """Canonical bytes of a JSON body: ignored fields gone, keys sorted, numbers unified."""
    if isinstance(obj, dict):
        obj = drop_ignored(obj, ignore)
    return orjson.dumps(_canon_value(obj), option=orjson.OPT_SORT_KEYS)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, bytes) for every part of a multipart/form-data body, in order."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BadBody("The multipart/form-data body of your request could not be parsed.")
    parts: list[tuple[str, str | None, bytes]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise BadBody("A part of the multipart/form-data body has no field name.")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        parts.append((name, part.get_filename(), data))
    return parts


def multipart_fields(parts: list[tuple[str, str | None, bytes]]) -> dict[str, Any]:
    """The plain (non-file) fields, as a JSON-like dict for rule matching (model, stream...)."""
    out: dict[str, Any] = {}
    for name, filename, data in parts:
        if filename is None:
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return out


def canonical_multipart(
    parts: list[tuple[str, str | None, bytes]], ignore: tuple[str, ...]
) -> bytes:
    """Canonical bytes of multipart fields: ignored names dropped, files by their sha256.

    Parts are sorted by name; parts that share a name (image[]) keep their order, which matters.
    File names are not keyed: the bytes are what the model sees.
    """
    ignored = set(ignore)
    rows: list[list[str]] = []
    for name, filename, data in parts:
        if name in ignored:
            continue
        if filename is None:
            try:
                rows.append([name, "v", data.decode("utf-8")])
                continue
            except UnicodeDecodeError:
                pass
        rows.append([name, "f", hashlib.sha256(data).hexdigest()])
    rows.sort(key=lambda r: r[0])
    return orjson.dumps(rows)
