"""Deploying it (issue 26): one key secret per store, the admin door, supervised workers,
start-up failures in one line."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import start_redis

CHAT_PATH = "/v1/chat/completions"
CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "one fleet"}],
}
HEADERS = {"Authorization": "Bearer sk-fleet", "Content-Type": "application/json"}


async def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=orjson.dumps(body), headers={**HEADERS, **(headers or {})}) as r,
    ):
        return r.status, r.headers, await r.read()


@pytest.fixture
def fleet(start_proxy, redis_server, tmp_path):
    """Two instances on one Redis, each with its own data folder and no --secret."""
    a = start_proxy(cache=redis_server.url, secret="", data_dir=tmp_path / "a")
    b = start_proxy(cache=redis_server.url, secret="", data_dir=tmp_path / "b")
    return a, b


async def test_two_instances_without_secret_coalesce_into_one_call(fleet, fake, tmp_path):
    """Two instances on one Redis with no --secret make the same keys: 20 identical requests
    over both are one upstream call, though each data folder holds its own secret file."""
    a, b = fleet
    assert (tmp_path / "a" / "secret.key").read_text() != (
        tmp_path / "b" / "secret.key"
    ).read_text()
    assert a.state.secret == b.state.secret
    fake.latency = 0.5
    urls = [p.url + CHAT_PATH for p in (a, b)]
    results = await asyncio.gather(*(post(urls[i % 2], CHAT) for i in range(20)))
    assert [s for s, _, _ in results] == [200] * 20
    assert fake.count(CHAT_PATH) == 1 and len({body for _, _, body in results}) == 1


async def test_one_idempotency_key_with_two_bodies_across_instances_is_422(fleet, fake):
    """An Idempotency-Key used on A, then on B with another body: 422, one upstream call."""
    a, b = fleet
    key = {"Idempotency-Key": "order-7"}
    first = await post(a.url + CHAT_PATH, CHAT, key)
    other = {**CHAT, "messages": [{"role": "user", "content": "another body"}]}
    second = await post(b.url + CHAT_PATH, other, key)
    assert first[0] == 200 and second[0] == 422
    assert orjson.loads(second[2])["error"]["code"] == "idempotency_key_reused"
    assert fake.count(CHAT_PATH) == 1


def test_an_explicit_secret_that_differs_from_the_store_is_one_line(start_proxy, tmp_path):
    """--secret against a store whose entries were made with another secret (or with a
    generated one) stops start-up with one line naming --secret; the same secret starts."""
    from proxy.errors import ConfigError

    server = start_redis()
    try:
        start_proxy(cache=server.url, secret="one", data_dir=tmp_path / "a")
        start_proxy(cache=server.url, secret="one", data_dir=tmp_path / "b")
        for secret in ("two", ""):
            with pytest.raises(ConfigError) as err:
                start_proxy(cache=server.url, secret=secret, data_dir=tmp_path / "c")
            assert "--secret" in str(err.value) and "\n" not in str(err.value)
    finally:
        server.stop()
