"""The provider's own prompt cache: `prompt_cache_key = "auto"` and what its hits saved. Pure.

OpenAI discounts input tokens that hit its prompt cache (`usage.prompt_tokens_details.
cached_tokens`, `usage.input_tokens_details.cached_tokens`) and routes requests by a hash of
the prompt's start and the request's `prompt_cache_key`. Requests that share a long prefix
(system prompt, tools) but name no key spread over machines and miss each other's cache. With
a rule's `prompt_cache_key = "auto"`, a request that names none goes upstream with one
derived from the tenant and that stable prefix: a keyed hash (it reveals nothing, and two
tenants never share one). The field stays out of the proxy's own key: it is added to the
body after the key is made, and only on the way upstream.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

PREFIX_ROLES = ("system", "developer")
"""Leading messages with these roles make the stable prefix, with the tools."""


def stable_prefix(twin: str, fields: dict[str, Any]) -> Any:
    """The part of a chat or Responses request that many requests share: its leading system
    and developer messages (Responses: `instructions` and the leading such input items) and
    its tools; None when it has none (nothing worth routing by)."""
    lead: list[Any] = []
    items = fields.get("messages") if twin == "chat" else fields.get("input")
    if isinstance(items, list):
        for item in items:
            if not isinstance(item, dict) or item.get("role") not in PREFIX_ROLES:
                break
            lead.append(item)
    instructions = fields.get("instructions") if twin == "responses" else None
    tools = fields.get("tools")
    if not lead and not instructions and not tools:
        return None
    return [fields.get("model"), instructions, lead, tools]


def auto_prompt_cache_key(
    secret: bytes, tenant: bytes, twin: str, fields: dict[str, Any]
) -> str | None:
    """The `prompt_cache_key` for a request with none: "ocp-" and 32 hex characters of an
    HMAC over the tenant and the stable prefix; None when the request has no stable prefix."""
    prefix = stable_prefix(twin, fields)
    if prefix is None:
        return None
    try:
        canonical = orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past orjson's limit: no key, as without one
        return None
    mac = hmac.new(secret, b"prompt-cache-key\0" + tenant + b"\0" + canonical, hashlib.sha256)
    return "ocp-" + mac.hexdigest()[:32]


def with_prompt_cache_key(body: bytes, value: str) -> bytes:
    """The JSON object `body` with `"prompt_cache_key": value` added first (the body's own
    bytes otherwise untouched); `body` itself when it is not a JSON object's text."""
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        return body
    rest = stripped[1:]
    field = b'"prompt_cache_key":' + orjson.dumps(value)
    if rest.lstrip().startswith(b"}"):
        return b"{" + field + rest
    return b"{" + field + b"," + rest


def provider_saved(
    cached_tokens: int, input_price: float | None, cached_price: float | None
) -> float | None:
    """Dollars the provider's cache saved on `cached_tokens` input tokens (per-1M prices):
    what they would have cost at the input price less what they cost at the cached one."""
    if input_price is None or cached_price is None:
        return None
    return round(cached_tokens * (input_price - cached_price) / 1e6, 8)
