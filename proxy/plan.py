"""Request -> Plan: which rule applies, the cache key, and how the client wants it cached. Pure.

Everything the data path decides about a request before any I/O is decided here, from the
method, path, query, headers and body bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, NamedTuple

from proxy.caller_keys import NO_CALLER, CallerControls, caller_canonical
from proxy.controls import ClientControls, Mode
from proxy.embeddings import per_item
from proxy.errors import BadBody, Inexact
from proxy.keys import Scope, cache_key, key_id, partition_key, tag
from proxy.normalize import (
    canonical_json,
    canonical_multipart,
    has_float,
    multipart_fields,
    parse_json,
    parse_multipart,
    raw_canonical,
    try_json,
)
from proxy.prompt_cache import auto_prompt_cache_key
from proxy.record import bounded
from proxy.rules import Rule, Rules
from proxy.semantic import query_of
from proxy.twins import kind_of

TWIN_FIELDS = ("stream", "stream_options")
"""What tells a twin route's two forms apart (twins.py): never part of its key."""


class Plan(NamedTuple):
    """What the proxy does with one request body on one route for one tenant."""

    rule: Rule | None
    """None: a plain pass-through."""
    key: str
    """Cache key; "" when no rule applies."""
    model: str | None
    stream: bool
    fingerprint: str
    """Keyed digest of the whole request, used to spot an Idempotency-Key reused for another
    ("" when make_plan was not asked for it)."""
    hints: dict[str, Any] | None = None
    """What pricing needs from the request: image size and quality, speech input length."""
    twin: str | None = None
    """"chat" or "responses": the streamed and the non-streamed form share this key (twins.py)."""
    form: str = ""
    """For twins, the form this request wants: "json", "sse" or "sse+usage"."""
    semantic: SemanticQuery | None = None
    """With a rule's `semantic` on or shadow: what a semantic lookup compares, and where."""
    caller: str = ""
    """How the caller shaped the key (caller_keys.py): "", "caller-key", "ignored-fields",
    both joined by a comma, or "refused" (the rule forbids it)."""
    prompt_cache_key: str | None = None
    """With a rule's prompt_cache_key = "auto" and none in the body: the value the request
    goes upstream with (prompt_cache.py); never part of the key."""
    per_item: bool = False
    """An embeddings list answered item by item (embeddings.py)."""
    kid: str = ""
    """The key's id in log lines (keys.key_id), computed with the key."""


@dataclass(frozen=True, slots=True)
class SemanticQuery:
    partition: str
    """Store key of the vectors of every request that differs from this one only in its
    last user message's text (same tenant, namespace, model, route, every other field).
    The text itself is not kept here (plans are memoised): semantic.text_of reads it from
    the body when a lookup runs."""


@dataclass(frozen=True, slots=True)
class PassThrough:
    """Forward as is: no rule, or Cache-Control: no-store."""


class Keyed(NamedTuple):
    """Answer through the cache under `key`."""

    key: str
    controls: ClientControls
    ttl_s: float
    """How long a stored answer is fresh."""
    keep_s: float
    """How much longer it is kept, stale, for stale-if-error."""
    store: bool
    fingerprint: str = ""
    """For Idempotency-Key: the request the key must keep answering (another body: 422)."""
    kid: str = ""
    """The key's id in log lines (keys.key_id)."""


PASS_THROUGH = PassThrough()


def decide(
    plan: Plan,
    controls: ClientControls,
    *,
    idempotency: tuple[str, str] | None = None,
    idempotency_ttl_s: float = 86400.0,
) -> PassThrough | Keyed:
    """What the data path does with a planned request. `idempotency` is (its store key, the
    request's fingerprint) when it carries an Idempotency-Key: then it is keyed on any route,
    looked up and stored whatever Cache-Control says."""
    if idempotency is not None:
        key, fingerprint = idempotency
        lookup = ClientControls(Mode.LOOKUP, None, controls.namespace)
        return Keyed(key, lookup, idempotency_ttl_s, 0.0, True, fingerprint, key_id(key))
    rule = plan.rule
    if rule is None or controls.mode is Mode.BYPASS:
        return PASS_THROUGH
    ttl = rule.ttl_s if controls.max_age is None else min(rule.ttl_s, controls.max_age)
    # kept past freshness for stale-if-error: the rule's window, or the request's directive
    keep = max(rule.stale_if_error_s, controls.stale_if_error or 0.0)
    return Keyed(plan.key, controls, ttl, keep, rule.store, kid=plan.kid)


def _azure_deployment(route: str) -> str | None:
    if route.startswith("/openai/deployments/"):
        return route.split("/")[3] or None
    return None


def make_plan(
    rules: Rules,
    scope: Scope,
    namespace: str,
    content_type: str,
    body: bytes,
    *,
    fingerprint: bool = True,
    caller: CallerControls = NO_CALLER,
) -> Plan:
    """Decide the rule and the key, within `scope` (secret, tenant, request line). Raises
    BadBody for a body that claims a type it is not (JSON, multipart) or is out of bounds.
    `fingerprint=False` leaves Plan.fingerprint empty (it costs a second canonical form and
    HMAC; only an Idempotency-Key needs it).

    A body that parses as a JSON object is keyed by its content whatever its Content-Type
    says (curl -d sends form encoding); any other body is keyed by its exact bytes and type,
    never as an empty body."""
    method, route = scope.method, scope.route
    if not rules.has_route(method, route):
        return Plan(None, "", None, False, "")
    ctype = content_type.split(";", 1)[0].strip().lower()
    fields, parts, raw = _fields_of(ctype, content_type, body)
    model = _model_of(fields, route)
    rule = rules.match(method, route, model)
    label = bounded(model) if model is not None else None
    stream = fields.get("stream") in (True, "true", "True")
    hints = _hints(route, fields)
    keyed = rule is not None and rule.enabled and not any(fields.get(f) for f in rule.never_if)
    twin = kind_of(route) if not raw and not parts else None
    # an Idempotency-Key names a request in every form: not by `stream`, `stream_options`
    forms = TWIN_FIELDS if twin and keyed else ()
    canonical_all, digest = b"", ""
    if fingerprint:
        canonical_all = (
            raw_canonical(ctype, body) if raw else _canonical(fields, parts, forms, ctype, body)
        )
        # (a fingerprint's digest has the body's media type where a key has its namespace)
        digest = scope.key(ctype, canonical_all)
    if rule is None or not keyed:
        return Plan(None, "", label, stream, digest, hints)
    used, ignore = _caller_shape(rule, caller, rule.ignore_fields + (TWIN_FIELDS if twin else ()))
    if used and used != "refused" and caller.key is not None:
        canonical = caller_canonical(caller.key, fields, twin, route)
    elif fingerprint and (raw or ignore == forms):
        canonical = canonical_all
    else:
        canonical = (
            raw_canonical(ctype, body) if raw else _canonical(fields, parts, ignore, ctype, body)
        )
    key, kid = scope.stored(namespace, model, canonical)
    form = _form_of(twin, stream, fields)
    semantic, pck, items = _extras(
        rule, scope, namespace, model, twin, fields, ignore, body, caller, raw or bool(parts)
    )
    return Plan(
        rule, key, label, stream, digest, hints, twin, form, semantic, used, pck, items, kid
    )


def _model_of(fields: dict[str, Any], route: str) -> str | None:
    """The model the body names (or the Azure deployment the route names)."""
    model = fields.get("model")
    return model if isinstance(model, str) else _azure_deployment(route)


def _caller_shape(
    rule: Rule, caller: CallerControls, ignore: tuple[str, ...]
) -> tuple[str, tuple[str, ...]]:
    """How the caller's cache headers shape the key (Plan.caller) and the fields it ignores."""
    used = "" if not caller.keys else "refused" if not rule.caller_keys else _caller_used(caller)
    if used and used != "refused" and caller.ignore:
        ignore = ignore + caller.ignore
    return used, ignore


def _extras(
    rule: Rule,
    scope: Scope,
    namespace: str,
    model: str | None,
    twin: str | None,
    fields: dict[str, Any],
    ignore: tuple[str, ...],
    body: bytes,
    caller: CallerControls,
    unparsed: bool,
) -> tuple[SemanticQuery | None, str | None, bool]:
    """What a keyed request also gets: its semantic lookup, the prompt_cache_key to add,
    whether embeddings go item by item."""
    secret, tenant = scope.secret, scope.tenant
    pck = None
    if rule.prompt_cache_key == "auto" and twin and "prompt_cache_key" not in fields:
        pck = auto_prompt_cache_key(secret, tenant, twin, fields)
    semantic = None
    if twin and rule.semantic != "off" and not (caller.key and rule.caller_keys):
        semantic = _semantic(
            rule,
            secret,
            tenant,
            scope.method,
            scope.route,
            scope.query,
            namespace,
            model,
            twin,
            fields,
            ignore,
            body,
        )
    items = (
        rule.embeddings_per_item
        and not unparsed
        and scope.route.endswith("/embeddings")
        and not (caller.key and rule.caller_keys)
        and per_item(fields)
        and _exact_besides_input(fields, ignore, body)
    )
    return semantic, pck, bool(items)


def _fields_of(
    ctype: str, content_type: str, body: bytes
) -> tuple[dict[str, Any], list[tuple[str, str | None, bytes]], bool]:
    """The body's fields (a JSON object, or multipart's), its multipart parts, and whether
    it is neither (keyed by its raw bytes)."""
    if ctype == "multipart/form-data":
        parts = parse_multipart(body, content_type)
        return multipart_fields(parts), parts, False
    if ctype == "application/json" or ctype.endswith("+json"):
        parsed = parse_json(body) if body else {}
        if not isinstance(parsed, dict):
            raise BadBody("The request body must be a JSON object.")
        return parsed, [], False
    if body:
        parsed = try_json(body)
        if isinstance(parsed, dict):
            return parsed, [], False
        return {}, [], True
    return {}, [], False


def _form_of(twin: str | None, stream: bool, fields: dict[str, Any]) -> str:
    """The form a twin route's answer is asked in: json, sse, sse+usage ("" off twin routes)."""
    if not twin:
        return ""
    if not stream:
        return "json"
    options = fields.get("stream_options")
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return "sse+usage" if usage and twin == "chat" else "sse"


def _exact_besides_input(fields: dict[str, Any], ignore: tuple[str, ...], body: bytes) -> bool:
    """Can the fields other than `input` be keyed exactly (no float past what a double
    holds)? If not, the list is keyed whole, by its exact bytes, never item by item."""
    try:
        canonical_json({k: v for k, v in fields.items() if k != "input"}, ignore, has_float(body))
    except Inexact:
        return False
    return True


def _caller_used(caller: CallerControls) -> str:
    """The Plan.caller label of a caller that shapes the key."""
    if caller.key is not None and caller.ignore:
        return "caller-key,ignored-fields"
    return "caller-key" if caller.key is not None else "ignored-fields"


def _semantic(
    rule: Rule,
    secret: bytes,
    tenant: bytes,
    method: str,
    route: str,
    query: str,
    namespace: str,
    label: str | None,
    twin: str,
    fields: dict[str, Any],
    ignore: tuple[str, ...],
    body: bytes,
) -> SemanticQuery | None:
    """The request's semantic query, or None when it is not a candidate (semantic.query_of)."""
    found = query_of(twin, fields)
    if found is None:
        return None
    _text, rest = found
    try:
        canonical = canonical_json(rest, ignore, has_float(body))
    except Inexact:
        return None
    scope = b"semantic\0" + rule.semantic_model.encode() + b"\0" + canonical
    digest = cache_key(secret, tenant, method, route, query, namespace, scope)
    return SemanticQuery(partition_key(tenant.hex()[:12], namespace, label, route, digest))


def _canonical(
    fields: dict[str, Any],
    parts: list[tuple[str, str | None, bytes]],
    ignore: tuple[str, ...],
    ctype: str,
    body: bytes,
) -> bytes:
    """The canonical bytes of a parsed body; its exact bytes where a number has no exact form."""
    if parts or ctype == "multipart/form-data":
        return canonical_multipart(parts, ignore)
    if not fields and not body:
        return b""
    try:
        return canonical_json(fields, ignore, has_float(body))
    except Inexact:
        return raw_canonical(ctype, body)


def _hints(route: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    if "/images/" in route:
        return {"size": _short(fields.get("size")), "quality": _short(fields.get("quality"))}
    if route.endswith("/audio/speech"):
        text = fields.get("input")
        return {"input_chars": len(text) if isinstance(text, str) else 0}
    return None


def _short(value: Any) -> str | None:
    """A pricing hint as a short string (hints are kept in memos and entries)."""
    return bounded(value, 32) if isinstance(value, str) else None


def passthrough_fingerprint(
    secret: bytes, tenant: bytes, method: str, route: str, query: str, body: bytes
) -> str:
    """Fingerprint of a request on a route with no rule (raw bytes; for Idempotency-Key)."""
    return cache_key(secret, tenant, method, route, query, "raw", body)


def idempotency_key(secret: bytes, tenant: bytes, value: str, namespace: str = "") -> str:
    """Store key for an Idempotency-Key value: `idem:<tenant>.<ns>.<hmac>`, partitioned by
    tenant and namespace, whose tags let a purge of either find it (keys.idem_pattern)."""
    mac = hmac.new(secret, tenant + value.encode(), hashlib.sha256).hexdigest()
    return f"idem:{tenant.hex()[:12]}.{tag(namespace)}.{mac}"
