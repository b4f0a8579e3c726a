"""Cache keys and tenant ids: keyed hashes (HMAC-SHA256 with the server secret). Pure.

No credential is ever kept: the tenant is an HMAC of the credential, organisation and project,
and every key is an HMAC over the tenant, the request line and the canonical body, so a key
reveals nothing and one tenant's keys can never equal another's.
"""

from __future__ import annotations

import hashlib
import hmac


def _frame(*parts: bytes) -> bytes:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") can never collide.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def tenant_digest(secret: bytes, credential: str, org: str, project: str) -> bytes:
    """32 bytes naming the tenant: the credential plus OpenAI-Organization and OpenAI-Project."""
    msg = _frame(b"tenant", credential.encode(), org.encode(), project.encode())
    return hmac.new(secret, msg, hashlib.sha256).digest()


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
    return "v1:" + hmac.new(secret, msg, hashlib.sha256).hexdigest()


def raw_digest(tenant: bytes, method: str, path: str, query: str, extra: str, body: bytes) -> bytes:
    """A fast digest of the request as it arrived, to skip re-parsing a body seen before.

    It includes the tenant digest, so a memo keyed on it can never cross tenants.
    """
    h = hashlib.blake2b(digest_size=20)
    h.update(_frame(tenant, method.encode(), path.encode(), query.encode(), extra.encode()))
    h.update(body)
    return h.digest()
