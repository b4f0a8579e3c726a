"""Cost accounting: the same tokens and dollars in the log lines, `report`, /_proxy/stats
and /_proxy/metrics (issue 7)."""

from __future__ import annotations

import asyncio
import io
import math
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types import CompletionUsage
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from proxy.report import Report, render
from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, async_sdk
from tests.helpers import flight_readers, wait_until

PRICE_IN, PRICE_OUT = 0.15, 0.60  # gpt-4o-mini in rules/prices.toml, per 1M tokens
DALLE2_1024 = 0.020


def chat_cost(usage: CompletionUsage) -> float:
    return float(usage.prompt_tokens * PRICE_IN + usage.completion_tokens * PRICE_OUT) / 1e6


async def get_json(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def test_scripted_workload_adds_up_everywhere(start_proxy: Any, fake: FakeOpenAI) -> None:
    """Misses spend, hits and coalesced duplicates save, errors count nothing; every view of
    the numbers agrees exactly."""
    proxy = start_proxy(image_source_hosts=fake.netloc)
    spent = saved = 0.0
    tokens_spent = tokens_saved = 0
    with capture_logs() as logs:
        async with async_sdk(proxy) as c:
            chat: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "cost me"}],
            }
            miss = await c.chat.completions.create(**chat)
            hit = await c.chat.completions.create(**chat)
            assert hit.id == miss.id
            spent += chat_cost(miss.usage)
            saved += chat_cost(miss.usage)
            tokens_spent += miss.usage.total_tokens
            tokens_saved += miss.usage.total_tokens

            dup = {**chat, "messages": [{"role": "user", "content": "five at once"}]}
            fake.hold()  # until all five are in: one upstream call, four joined to it
            try:
                five = [asyncio.ensure_future(c.chat.completions.create(**dup)) for _ in range(5)]
                # one call more than the miss above, and the 4 others reading its flight
                await wait_until(lambda: fake.count() == 2 and flight_readers(proxy) == 4, 30.0)
            finally:
                fake.release()
            burst = await asyncio.gather(*five)
            one = burst[0].usage
            spent += chat_cost(one)
            saved += 4 * chat_cost(one)
            tokens_spent += one.total_tokens
            tokens_saved += 4 * one.total_tokens

            with pytest.raises(openai.InternalServerError):
                await c.chat.completions.create(**{**chat, "model": "fake-error-500"})

            usage = None
            for _ in range(2):  # a streamed answer with a usage chunk: MISS, then HIT
                stream = await c.chat.completions.create(
                    **{**chat, "messages": [{"role": "user", "content": "stream it"}]},
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if chunk.usage:
                        usage = chunk.usage
                await asyncio.sleep(0.05)
            assert usage is not None
            spent += chat_cost(usage)
            saved += chat_cost(usage)
            tokens_spent += usage.total_tokens
            tokens_saved += usage.total_tokens

            for _ in range(2):  # an image: dall-e-2 1024x1024, then its HIT
                await c.images.generate(prompt="an image", response_format="url")
            spent += DALLE2_1024
            saved += DALLE2_1024

    lines = [e for e in logs if e["event"] == "request.done"]
    assert len(lines) == 2 + 5 + 1 + 2 + 2
    by_cache = {k: [ln for ln in lines if ln["cache"] == k] for k in ("miss", "hit", "coalesced")}
    assert len(by_cache["miss"]) == 5 and len(by_cache["hit"]) == 3  # the 500 is a miss too
    assert len(by_cache["coalesced"]) == 4
    error = next(ln for ln in lines if ln["status"] == 500)
    assert "cost_usd" not in error and "saved_usd" not in error
    assert not any("cost_usd" in ln for ln in by_cache["hit"] + by_cache["coalesced"])
    assert not any("saved_usd" in ln for ln in by_cache["miss"])
    log_spent = sum(ln.get("cost_usd") or 0 for ln in lines)
    log_saved = sum(ln.get("saved_usd") or 0 for ln in lines)
    assert math.isclose(log_spent, spent, rel_tol=1e-9)
    assert math.isclose(log_saved, saved, rel_tol=1e-9)
    charged = [ln for ln in by_cache["miss"] if "cost_usd" in ln]
    assert len(charged) == 4
    assert sum(ln["tokens_in"] + ln["tokens_out"] for ln in charged) == tokens_spent
    saved_lines = by_cache["hit"] + by_cache["coalesced"]
    assert sum(ln["tokens_in"] + ln["tokens_out"] for ln in saved_lines) == tokens_saved
    assert all(ln["saved_ms"] > 0 for ln in saved_lines)

    # report, from the same lines as the proxy writes them
    report = Report(by="route")
    for ln in lines:
        report.feed(orjson.dumps(ln), None, None)
    report.feed(b"not a proxy line\n", None, None)
    total = report.rows()[-1]
    assert report.skipped == 1
    assert math.isclose(total["spent_usd"], round(spent, 6), abs_tol=1e-6)
    assert math.isclose(total["saved_usd"], round(saved, 6), abs_tol=1e-6)
    assert total["tokens_in_spent"] + total["tokens_out_spent"] == tokens_spent
    assert total["tokens_in_saved"] + total["tokens_out_saved"] == tokens_saved
    out = io.StringIO()
    render(report, "json", out)
    assert orjson.loads(out.getvalue())["rows"][-1]["requests"] == len(lines)

    # /_proxy/stats
    status, body = await get_json(proxy.url + "/_proxy/stats")
    stats = orjson.loads(body)
    assert status == 200
    assert math.isclose(stats["spent_usd"], round(spent, 6), abs_tol=1e-6)
    assert math.isclose(stats["saved_usd"], round(saved, 6), abs_tol=1e-6)
    assert stats["tokens"]["in_spent"] + stats["tokens"]["out_spent"] == tokens_spent
    assert stats["tokens"]["in_saved"] + stats["tokens"]["out_saved"] == tokens_saved
    assert (stats["hits"], stats["coalesced"], stats["misses"]) == (3, 4, 5)
    assert stats["errors"] == 1
    assert stats["last_hour"]["saved_usd"] == stats["saved_usd"]

    # /_proxy/metrics, parsed as Prometheus text
    status, body = await get_json(proxy.url + "/_proxy/metrics")
    assert status == 200
    samples = [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]
    usd = {
        k: sum(s.value for s in samples if s.name == "ocp_usd_total" and s.labels["kind"] == k)
        for k in ("spent", "saved")
    }
    assert math.isclose(usd["spent"], spent, rel_tol=1e-6)
    assert math.isclose(usd["saved"], saved, rel_tol=1e-6)
    tokens = {
        k: sum(s.value for s in samples if s.name == "ocp_tokens_total" and s.labels["kind"] == k)
        for k in ("spent", "saved")
    }
    assert tokens == {"spent": tokens_spent, "saved": tokens_saved}
    requests: dict[str, float] = {}
    for s in samples:
        if s.name == "ocp_requests_total":
            requests[s.labels["cache"]] = requests.get(s.labels["cache"], 0) + s.value
    assert requests == {"miss": 5, "hit": 3, "coalesced": 4}
    assert all("sk-" not in str(s.labels) for s in samples)


async def test_unpriced_model_counts_tokens_not_dollars(
    proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """A model with no price: tokens are counted, the cost is reported as unpriced."""
    with capture_logs() as logs:
        async with async_sdk(proxy) as c:
            await c.chat.completions.create(
                model="my-finetune", messages=[{"role": "user", "content": "x"}]
            )
    line = next(e for e in logs if e["event"] == "request.done")
    assert line["tokens_out"] == 8 and line["cost_usd"] is None and line["unpriced"] is True


@pytest.mark.parametrize("path", ["/_proxy/stats", "/_proxy/metrics", "/_proxy/dashboard"])
async def test_admin_token_guards_stats_metrics_dashboard(start_proxy: Any, path: str) -> None:
    """With --admin-token set, the admin pages answer 401 without it, 200 with it."""
    proxy = start_proxy(admin_token="s3cret")
    status, body = await get_json(proxy.url + path)
    assert status == 401 and orjson.loads(body)["error"]["code"] == "admin_token_required"
    assert (await get_json(proxy.url + path, "wrong"))[0] == 401
    assert (await get_json(proxy.url + path, "s3cret"))[0] == 200
    assert (await get_json(proxy.url + "/_proxy/health"))[0] == 200
