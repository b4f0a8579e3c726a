"""The dashboard in a real headless Chromium, driven over the DevTools protocol (issue 7)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.testing import FakeOpenAI
from tests.conftest import async_sdk, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


class Page:
    """One Chromium tab over the DevTools protocol (just what the test needs)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> Any:
        msg_id = next(self.ids)
        await self.ws.send_str(
            orjson.dumps({"id": msg_id, "method": method, "params": params}).decode()
        )
        while True:
            msg = orjson.loads((await self.ws.receive()).data)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    async def text(self, element_id: str) -> str:
        result = await self.send(
            "Runtime.evaluate",
            expression=f"document.getElementById({element_id!r}).textContent",
            returnByValue=True,
        )
        return str(result["result"].get("value", ""))

    async def wait_text(
        self, element_id: str, want: Callable[[str], bool], within_s: float = 15.0
    ) -> str:
        deadline = time.monotonic() + within_s
        value = ""
        while time.monotonic() < deadline:
            value = await self.text(element_id)
            if want(value):
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"#{element_id} is {value!r}")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (scripts/test installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def open_page(
    devtools: str, session: aiohttp.ClientSession
) -> aiohttp.ClientWebSocketResponse:
    deadline = time.monotonic() + 20
    while True:
        try:
            async with session.put(devtools + "/json/new?about:blank") as r:
                target = await r.json()
                break
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    return await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)


async def test_dashboard_shows_stats_and_refreshes(
    start_proxy: Any, fake: FakeOpenAI, chromium: str
) -> None:
    """The page loads offline in Chromium, shows the same figures as /_proxy/stats, refreshes
    after new requests, and the test saves a screenshot."""
    proxy = start_proxy(admin_token="tok")
    async with async_sdk(proxy) as c:
        for text in ("a", "a", "b"):
            await c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            )
    async with aiohttp.ClientSession() as s:
        ws = await open_page(chromium, s)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"{proxy.url}/_proxy/dashboard?token=tok&refresh=1")
        async with s.get(proxy.url + "/_proxy/stats", headers={"Authorization": "Bearer tok"}) as r:
            stats = await r.json()
        assert stats["requests"] == 3 and stats["hits"] == 1
        await page.wait_text("requests", lambda v: v == "3")
        assert await page.text("hit-ratio-hour") == f"{100 * stats['last_hour']['hit_ratio']:.1f} %"
        assert await page.text("saved-hour") == f"${stats['last_hour']['saved_usd']:.6f}"
        assert "/v1/chat/completions" in await page.text("routes")
        assert "gpt-4o-mini" in await page.text("models")

        async with async_sdk(proxy) as c:  # new traffic: the page follows
            for _ in range(3):
                await c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "b"}]
                )
        await page.wait_text("requests", lambda v: v == "6")
        async with s.get(proxy.url + "/_proxy/stats", headers={"Authorization": "Bearer tok"}) as r:
            stats = await r.json()
        assert await page.text("hit-ratio-hour") == f"{100 * stats['last_hour']['hit_ratio']:.1f} %"
        assert await page.text("error") == ""

        shot = await page.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG")
        (ARTIFACTS / "dashboard.png").write_bytes(png)
        await ws.close()
