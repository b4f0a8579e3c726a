"""Cache keys and tenant ids: keyed hashes (HMAC-SHA256 with the server secret). Pure.

No credential is ever kept: the tenant is an HMAC of the credential, organisation and project,
and every key is an HMAC over the tenant, the request line and the canonical body, so a key
reveals nothing and one tenant's keys can never equal another's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import NamedTuple, Protocol

CREDENTIAL_HEADERS = ("Authorization", "api-key", "x-api-key")
"""Every header an OpenAI-compatible upstream may read a credential from (OpenAI, Azure, and
the gateways that take x-api-key). All of them, every value, make the tenant."""


class Headers(Protocol):
    def getall(self, key: str, default: tuple[()], /) -> list[str] | tuple[()]: ...


def header_values(headers: Headers, name: str) -> str:
    """Every value of one header, framed so that no two lists of values give one string."""
    values = headers.getall(name, ())
    if not values:
        return ""
    if len(values) == 1:
        v = values[0]
        return f"{len(v)}:{v}"
    return "".join(f"{len(v)}:{v}" for v in values)


def credential_of(headers: Headers) -> str:
    """The tenant's credential part: every credential header (CREDENTIAL_HEADERS, in that
    order), never the first one present. Spelled out: on every request, and a generator
    over the three cost twice as much."""
    return (
        f"{header_values(headers, 'Authorization')}|{header_values(headers, 'api-key')}"
        f"|{header_values(headers, 'x-api-key')}"
    )


def _frame(*parts: bytes) -> bytes:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") can never collide.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def mac_key(secret: bytes) -> bytes:
    """The 32-byte key for the per-request keyed BLAKE2b digests, derived from the secret."""
    return hmac.new(secret, b"openai-cache-proxy/blake2b", hashlib.sha256).digest()


def tenant_digest(key: bytes, credential: str, org: str, project: str) -> bytes:
    """32 bytes naming the tenant: a keyed BLAKE2b (a MAC, like HMAC) of the credential plus
    OpenAI-Organization and OpenAI-Project. Computed on every request, so it is the cheap one."""
    msg = f"{len(credential)}:{credential}{len(org)}:{org}{project}".encode()
    return hashlib.blake2b(msg, key=key, digest_size=32, person=b"tenant").digest()


def cache_key(
    secret: bytes,
    tenant: bytes,
    method: str,
    route: str,
    query: str,
    namespace: str,
    canonical_body: bytes,
) -> str:
    """ "v1:" + hex HMAC over the tenant, method, route, query, namespace and canonical body."""
    msg = _frame(
        tenant, method.encode(), route.encode(), query.encode(), namespace.encode(), canonical_body
    )
    mac = _keyed_sha256(secret).copy()  # the key's pads are hashed once per secret
    mac.update(msg)
    return "v1:" + mac.hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed_sha256(secret: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 keyed with `secret`, to copy (a process has one or two secrets)."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def raw_digest(key: bytes, head: str, body: bytes) -> bytes:
    """A keyed digest of the request as it arrived, to skip re-parsing a body seen before.

    `head` joins the credential, organisation, project, method, path, query and the headers
    that matter with NUL, which no header value, path or query can hold, so no two requests
    share a head; the memo keyed on it therefore never crosses tenants. The head goes in
    behind its length: its last part (the caller's key and ignored fields) and the body
    could otherwise run into each other ("3:abc|" + body and "" + "3:abc|" + body).
    """
    data = head.encode()
    h = hashlib.blake2b(len(data).to_bytes(4, "big"), key=key, digest_size=24, person=b"raw")
    h.update(data)
    h.update(body)
    return h.digest()


def request_digest(
    key: bytes, headers: Headers, parts: tuple[str, ...], body: bytes
) -> tuple[bytes, tuple[str, str, str]]:
    """The request as it arrived, digested (raw_digest over its credentials, then `parts`,
    then the body), and its credentials (for tenant_digest when the plan memo misses)."""
    creds = (  # what names the tenant: the credential, organisation and project, framed
        credential_of(headers),
        header_values(headers, "OpenAI-Organization"),
        header_values(headers, "OpenAI-Project"),
    )
    return raw_digest(key, "\0".join((*creds, *parts)), body), creds


class Scope(NamedTuple):
    """What a request's keys are computed within: the secret, the tenant, the request line.
    (One object, not five positional parameters that are easy to shift by one.)"""

    secret: bytes
    tenant: bytes
    method: str
    route: str
    query: str

    def key(self, namespace: str, canonical: bytes) -> str:
        """The cache key of a canonical body in a namespace (cache_key)."""
        return cache_key(
            self.secret, self.tenant, self.method, self.route, self.query, namespace, canonical
        )

    def stored(self, namespace: str, model: str | None, canonical: bytes) -> tuple[str, str]:
        """The key an answer to a canonical body is stored under (store_key, with the whole
        model name: a purge by the name the client sent finds it), and its id for logs."""
        hmac_key = self.key(namespace, canonical)
        key = store_key(self.tenant.hex()[:12], namespace, model, self.route, hmac_key)
        return key, key_id(key)


def tag(value: str) -> str:
    """8 hex characters standing for a namespace, model or route inside a store key."""
    if len(value) <= TAG_MEMO_LEN:
        return _tag_memo(value)
    return _tag(value)


TAG_MEMO_LEN = 256
"""Values up to this long are memoised (three per store key, the same few over and over)."""


def _tag(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=4, person=b"tag").hexdigest()


_tag_memo = functools.lru_cache(maxsize=1024)(_tag)


def store_key(tenant_id: str, namespace: str, model: str | None, route: str, key: str) -> str:
    """The key an answer is stored under: `v2:<tenant>.<ns>.<model>.<route>.<hmac>`.

    The HMAC (`cache_key`) decides what is the same request; the tags in front let a purge
    find every answer of a tenant, namespace, model or route by key pattern (Redis SCAN
    MATCH, SQLite GLOB) without reading values or keeping an index. `tenant_id` is the
    12-character id of the log lines; the tags are short digests, never the values."""
    return f"v2:{tenant_id}.{tag(namespace)}.{tag(model or '')}.{tag(route)}.{key[3:]}"


def partition_key(tenant_id: str, namespace: str, model: str | None, route: str, key: str) -> str:
    """Where a semantic partition's vectors are kept: `v2:<tenant>.<ns>.<model>.<route>.s<id>`,
    beside the entries it indexes, so a purge pattern takes both."""
    return f"v2:{tenant_id}.{tag(namespace)}.{tag(model or '')}.{tag(route)}.s{key[3:35]}"


def is_partition(key: str) -> bool:
    """A store key of a semantic partition (vectors), not of an answer."""
    return key.rpartition(".")[2].startswith("s")


def purge_pattern(
    *,
    tenant: str | None = None,
    namespace: str | None = None,
    model: str | None = None,
    route: str | None = None,
) -> str:
    """The glob (`*` only) that matches the store keys of every filter given (ANDed)."""
    parts = [
        tenant or "*",
        tag(namespace) if namespace is not None else "*",
        tag(model) if model is not None else "*",
        tag(route) if route is not None else "*",
    ]
    return "v2:" + ".".join(parts) + ".*"


def idem_pattern(*, tenant: str | None = None, namespace: str | None = None) -> str:
    """The glob that matches the Idempotency-Key entries of a tenant and / or namespace
    (`idem:<tenant>.<ns>.<hmac>`, see plan.idempotency_key)."""
    return f"idem:{tenant or '*'}.{tag(namespace) if namespace is not None else '*'}.*"


def key_id(key: str) -> str:
    """The 12-character id of a key in log lines (the start of its HMAC)."""
    return key.partition("#")[0][-64:-52]
