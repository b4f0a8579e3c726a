"""`python -m proxy demo`: the proxy doing its job in seconds, with no OpenAI key.

It starts the packaged fake OpenAI upstream and the proxy in one process (embedded store,
local image store, in a temporary folder), runs a short tour through the official `openai`
SDK and prints what happened, with numbers measured in this run. `--serve` keeps the proxy
running afterwards (in front of the fake upstream) for your own client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from rich.console import Console
from rich.table import Table

from proxy.app import ProxyApp, running
from proxy.coalesce import Flights
from proxy.log import configure_logging
from proxy.settings import Settings
from proxy.testing import FakeOpenAI


@dataclass
class Row:
    step: str
    status: str
    ms: float
    calls: int
    note: str = ""
    measures: str = "the whole call"
    """What `ms` is the time of (SDK overhead is always inside it)."""
    link: str = ""
    """A URL (or the question asked) printed whole under the table."""


def calls(fake: FakeOpenAI) -> int:
    """Upstream calls for answers (the semantic cache's embedding calls are not counted)."""
    return fake.count() - fake.count("/v1/embeddings")


def _http_status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


async def tour(client: openai.AsyncOpenAI, fake: FakeOpenAI, flights: Flights) -> list[Row]:
    """Every step of the demo in order, one row each."""
    chat: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Invent a user persona for a bakery app"}],
    }
    rows = await _chat_steps(client, fake, chat)
    rows += await _stream_steps(client, fake, chat)
    rows.append(await _coalesce_step(client, fake, chat, flights))
    rows += await semantic_steps(client, fake, chat)
    generated = await _image_step(client, fake)
    rows.append(generated)
    rows.append(await _expired_image_step(fake, generated.link))
    return rows


async def _chat_steps(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, chat: dict[str, Any]
) -> list[Row]:
    """One chat call, then the same call again (a HIT)."""
    rows: list[Row] = []
    for step in ("chat: first call", "chat: same call again"):
        t0 = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(**chat)
        ms = (time.perf_counter() - t0) * 1000
        rows.append(Row(step, raw.headers["x-cache-status"], ms, calls(fake)))
    return rows


async def _stream_steps(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, chat: dict[str, Any]
) -> list[Row]:
    """The same question streamed, twice (the second replayed), timed to the first byte."""
    rows: list[Row] = []
    for step in ("stream: first call", "stream: replayed"):
        t0 = time.perf_counter()
        async with client.chat.completions.with_streaming_response.create(
            **chat, stream=True, stream_options={"include_usage": True}
        ) as resp:
            first_ms = 0.0
            async for _line in resp.iter_lines():
                if not first_ms:
                    first_ms = (time.perf_counter() - t0) * 1000
            rows.append(
                Row(
                    step,
                    resp.headers["x-cache-status"],
                    first_ms,
                    calls(fake),
                    measures="to the first byte",
                )
            )
    return rows


async def _coalesce_step(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, chat: dict[str, Any], flights: Flights
) -> Row:
    """Twenty identical calls at once: one goes upstream, the rest join it."""
    dup = {**chat, "messages": [{"role": "user", "content": "Same question, 20 clicks"}]}
    t0 = time.perf_counter()
    async with _answer_held_until_joined(fake, flights, 19):
        batch = asyncio.gather(
            *(client.chat.completions.with_raw_response.create(**dup) for _ in range(20))
        )
    answers = await batch
    ms = (time.perf_counter() - t0) * 1000
    labels = [a.headers["x-cache-status"] for a in answers]
    summary = f"{labels.count('MISS')} MISS + {labels.count('COALESCED')} COALESCED"
    same = len({a.parse().choices[0].message.content for a in answers}) == 1
    return Row(
        "20 identical calls at once",
        summary,
        ms,
        calls(fake),
        f"identical answers: {same}",
        measures="the batch of 20",
    )


POLL_S = 0.005
"""How often the demo's burst step looks whether its duplicates have all joined."""


@contextlib.asynccontextmanager
async def _answer_held_until_joined(
    fake: FakeOpenAI, flights: Flights, joiners: int, within_s: float = 5.0
) -> AsyncIterator[None]:
    """Hold the fake upstream's chat answers until `joiners` requests read its flight (or
    `within_s` passed): a real upstream takes seconds, longer than a burst takes to arrive
    even on a busy machine; the fake's 250 ms may not be."""
    fake.hold("/v1/chat/completions")
    try:
        yield
        for _ in range(int(within_s / POLL_S)):
            if flights.readers() >= joiners:
                break
            await asyncio.sleep(POLL_S)
    finally:
        fake.release()


async def _image_step(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> Row:
    """An image generated, its URL (ours: the image was rehosted) as the row's link."""
    t0 = time.perf_counter()
    raw_img = await client.images.with_raw_response.generate(
        prompt="portrait of the persona", model="dall-e-2", response_format="url"
    )
    ms = (time.perf_counter() - t0) * 1000
    images = raw_img.parse().data or []
    url = (images[0].url if images else None) or ""
    return Row(
        "image: generate",
        raw_img.headers["x-cache-status"],
        ms,
        calls(fake),
        "link below",
        link=url,
    )


async def _expired_image_step(fake: FakeOpenAI, url: str) -> Row:
    """Once the upstream's image URL has expired, ours still serves the image."""
    upstream_url = next(
        (f"{fake.base_url}/blob/{n}?se={int(time.time()) + 1}" for n in fake.image_downloads), ""
    )
    await asyncio.sleep(max(0.0, fake.image_ttl_s) + 1.2)  # let the upstream URL expire
    expired_url = upstream_url.split("?")[0] + f"?se={int(time.time()) - 1}"
    up_status, _ = await asyncio.to_thread(_http_status, expired_url)
    t0 = time.perf_counter()
    kept_status, data = await asyncio.to_thread(_http_status, url)
    ms = (time.perf_counter() - t0) * 1000
    return Row(
        "image: after upstream URL expired",
        f"upstream {up_status}, ours {kept_status}",
        ms,
        calls(fake),
        f"{len(data)} PNG bytes still served",
        measures="one image download",
    )


async def semantic_steps(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, chat: dict[str, Any]
) -> list[Row]:
    """The semantic cache (the demo's rules turn it on for chat): a paraphrase of the first
    question is a HIT; the same words with another number are not (the numbers guard)."""
    rows: list[Row] = []
    steps = (
        ("semantic: a paraphrase", "Please invent a user persona for the bakery app"),
        ("semantic: another number", "Invent 2 user personas for a bakery app"),
    )
    for step, text in steps:
        chat_calls = fake.count("/v1/chat/completions")
        t0 = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model=chat["model"], messages=[{"role": "user", "content": text}]
        )
        ms = (time.perf_counter() - t0) * 1000
        detail = "semantic" if "detail=semantic" in raw.headers.get("cache-status", "") else ""
        went = fake.count("/v1/chat/completions") - chat_calls
        note = "served by meaning" if detail else f"{went} chat call (numbers guard)"
        rows.append(Row(step, raw.headers["x-cache-status"], ms, calls(fake), note, link=text))
    return rows


def demo_rules(work: Path) -> Path:
    """The shipped rules with the semantic cache on (it is off unless a rule asks)."""
    from proxy.rules import default_rules_path

    folder = work / "rules"
    folder.mkdir()
    shipped = default_rules_path()
    for source in shipped.glob("*.toml"):
        text = source.read_text(encoding="utf-8")
        if source.name != "prices.toml":
            text = text.replace("[defaults]\n", '[defaults]\nsemantic = "on"\n', 1)
        (folder / source.name).write_text(text, encoding="utf-8")
    return folder


def print_table(rows: list[Row], console: Console) -> None:
    table = Table(
        title="openai-cache-proxy demo (fake upstream, no key, no network)",
        caption="Times are as the official SDK sees them, its own overhead included; the "
        "fake upstream takes 250 ms to answer (embeddings 20 ms). The semantic cache is on "
        "for chat here: a first call waits for its embedding too (embedding calls are not "
        "counted as upstream calls).",
    )
    table.add_column("step")
    table.add_column("X-Cache-Status")
    table.add_column("ms", justify="right")
    table.add_column("the time of")
    table.add_column("upstream calls so far", justify="right")
    table.add_column("note")
    for r in rows:
        table.add_row(r.step, r.status, f"{r.ms:.1f}", r.measures, str(r.calls), r.note)
    console.print(table)
    for r in rows:
        if r.link:
            console.print(f"{r.step}: {r.link}", soft_wrap=True)  # whole, to copy


async def run(
    app: ProxyApp, fake: FakeOpenAI, serve: bool, port: int, log_path: Path | None = None
) -> int:
    console = Console(width=None if sys.stdout.isatty() else 170)
    host = app.settings.host if serve else "127.0.0.1"
    async with running(app, host, port) as url:
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="sk-demo-not-a-real-key", max_retries=0
        ) as client:
            rows = await tour(client, fake, app.state.flights)
        print_table(rows, console)
        if serve:
            console.print(
                f"\nThe proxy keeps running in front of the fake upstream. Try it:\n"
                f"  export OPENAI_BASE_URL={url}/v1 OPENAI_API_KEY=sk-anything\n"
                f"Its request log (one JSON line per request): {log_path}\n"
                f"Ctrl-C (or SIGTERM) to stop; the demo's temporary folder goes with it."
            )
            print(f"OPENAI_BASE_URL={url}/v1", flush=True)
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM (see _interrupt)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (`kill`, `docker stop`) ends the demo as Ctrl-C does, through main's cleanup,
    so no temporary folder (with its key secret) is left behind, at any step."""
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    def serve_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--serve",
            action="store_true",
            help="keep the proxy running afterwards, with the server's flags below (the "
            "upstream is always the fake one; --data-dir and --rules default to the demo's)",
        )

    given, args = Settings.parse(
        argv, prog="python -m proxy demo", description=__doc__, epilog=None, extra=serve_flag
    )
    previous = signal.signal(signal.SIGTERM, _interrupt)  # before the folder is made
    work = Path(tempfile.mkdtemp(prefix="openai-cache-proxy-demo-"))
    log = (work / "requests.log").open("wb")
    log_sink = configure_logging("json", out=log)  # the tour's request lines go to this file
    fake = FakeOpenAI(latency=0.25, chunk_delay=0.04, image_ttl_s=1.0)
    fake.path_latency["/v1/embeddings"] = 0.02

    async def main_async() -> int:
        await fake.start()
        flags = set(argv)
        settings = dataclasses.replace(
            given,
            upstream=fake.base_url,
            image_source_hosts=fake.netloc,
            data_dir=given.data_dir if "--data-dir" in flags else work,
            rules=given.rules if "--rules" in flags else demo_rules(work),
        )
        app = await asyncio.to_thread(ProxyApp, settings, None, log_sink)
        try:
            port = settings.port if args.serve else 0
            return await run(app, fake, args.serve, port, work / "requests.log")
        finally:
            await fake.stop()

    try:
        return asyncio.run(main_async())
    except KeyboardInterrupt:
        return 0
    finally:
        log.close()
        shutil.rmtree(work, ignore_errors=True)  # the store, images and log of the tour
        signal.signal(signal.SIGTERM, previous)
