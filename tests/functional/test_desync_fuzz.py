"""A desync fuzzer: many tenants at once through the real `python -m proxy` process, against an
upstream that at random sends extra answers (in the same write, later, a 408 on idle),
answers early, drops a request it read, closes mid-answer, stalls, delays, or cuts
compressed bodies. Every answer a client receives names its own credential and its own
prompt, or is an error; no request reaches the upstream twice; no request head ever lands
inside another's body.

Bounded in time: DESYNC_SECONDS (default 15). Reproduce a failure with the DESYNC_SEED it
prints (the timing differs from run to run; the sequence of misbehaviours does not)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.testing.desync import Behaviour, Request, ScriptedUpstream, who
from tests.conftest import BackgroundLoop
from tests.helpers import Proc

WEIGHTS = {
    Behaviour.NORMAL: 30,
    Behaviour.DELAY: 6,
    Behaviour.EXTRA_SAME_WRITE: 8,
    Behaviour.EXTRA_LATE: 8,
    Behaviour.IDLE_408: 6,
    Behaviour.EARLY: 6,
    Behaviour.READ_CLOSE: 4,
    Behaviour.CLOSE_MID: 4,
    Behaviour.HEAD_ONLY: 1,
    Behaviour.CUT_GZIP: 4,
    Behaviour.CUT_BR: 4,
    Behaviour.BODY_AFTER_204: 3,
}
TENANTS = 8
WORKERS = 16
NAMED = re.compile(r"\[who:([0-9a-f]{8})\]")


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("DESYNC_SEED") or random.randrange(2**32))
    print(f"DESYNC_SEED={value}")  # shown by pytest on failure
    return value


@pytest.fixture
def upstream(bg: BackgroundLoop, seed: int) -> Iterator[ScriptedUpstream]:
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())

    def behave(_req: Request) -> Behaviour:
        return rng.choices(kinds, weights)[0]

    up = ScriptedUpstream(behave=behave, late_s=0.02, delay_s=0.1)
    bg.run(up.start())
    yield up
    bg.run(up.stop())


@pytest.fixture
def proc(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[Proc]:
    p = Proc(upstream.base_url, tmp_path / "data", "--upstream-read-timeout-s", "2")
    yield p
    if p.proc.poll() is None:
        p.stop()


def names(got: str, crossed: str) -> bool:
    """`got` is the answer a request crossed (`crossed` names it), whole or cut short; or, for
    the raw bytes of a stream (its content split across events), names only its credential."""
    if crossed in got or (bool(got) and crossed.startswith(got)):
        return True
    return "data: " in got and set(NAMED.findall(got)) == set(NAMED.findall(crossed))


async def streamed(
    client: openai.AsyncOpenAI, messages: list[dict[str, str]], fuzz_id: str
) -> tuple[str, str]:
    """A streamed chat completion: the content received, and how it ended."""
    parts: list[str] = []
    try:
        stream: Any = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Fuzz-Id": fuzz_id},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
    except openai.APIStatusError as exc:
        return exc.response.text, f"stream status {exc.status_code}"
    except Exception:  # openai.APIError, or the transport's own (a cut chunked body)
        return "".join(parts), "stream cut"
    return "".join(parts), "stream 200" if parts else "stream without a body"


async def test_no_answer_ever_reaches_another_request(
    proc: Proc, upstream: ScriptedUpstream, seed: int
) -> None:
    """Under random upstream misbehaviour, every answer names its own tenant and prompt or is
    an error; nothing is sent twice upstream, nothing is spliced into another request."""
    seconds = float(os.environ.get("DESYNC_SECONDS", "15"))
    rng = random.Random(seed ^ 0x5EED)
    keys = [f"sk-fuzz-tenant-{i}" for i in range(TENANTS)]
    clients = [
        openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=key, max_retries=0, timeout=15)
        for key in keys
    ]
    outcomes: Counter[str] = Counter()
    suspects: list[tuple[str, int, str, str, str]] = []  # (fuzz id, tenant, prompt, got, why)
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            tenant = rng.randrange(TENANTS)
            mine = who({"authorization": f"Bearer {keys[tenant]}"})
            # mostly new prompts (MISSes); some repeats within a tenant (HITs, COALESCED)
            # and prompts shared across tenants
            draw = rng.random()
            if draw < 0.1:
                prompt = f"q{rng.randrange(6)}"
            elif draw < 0.2:
                prompt = f"t{tenant}-q{rng.randrange(6)}"
            else:
                prompt = f"new-{rng.getrandbits(64):x}"
            messages = [{"role": "user", "content": prompt}]
            if rng.random() < 0.03:  # now and then a large body (early answers, slow writes)
                messages.insert(0, {"role": "system", "content": "p" * 1_500_000})
            expected = f"[who:{mine}] {prompt}"
            fid = uuid.uuid4().hex

            def wrong(got: str, why: str) -> None:
                suspects.append((fid, tenant, prompt, got, why))  # noqa: B023 (called at once)

            if rng.random() < 0.25:  # streamed: a cut stream must still be a prefix of its own
                content, outcome = await streamed(clients[tenant], messages, fid)
                outcomes[outcome] += 1
                whole = outcome == "stream 200"
                if outcome.startswith("stream status"):
                    pass  # an error body: it may only name this tenant (below)
                elif (content != expected) if whole else not expected.startswith(content):
                    wrong(content, f"tenant {tenant} asked {prompt!r}, streamed {content!r}")
                for name in NAMED.findall(content):
                    if name != mine:
                        wrong(content, f"tenant {tenant} got a stream naming {name}")
                continue
            try:
                got: object = await clients[tenant].chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,  # type: ignore[arg-type]
                    extra_headers={"X-Fuzz-Id": fid},
                )
            except openai.APIStatusError as exc:
                outcomes[f"status {exc.status_code}"] += 1
                for name in NAMED.findall(exc.response.text):
                    if name != mine:
                        wrong(exc.response.text, f"tenant {tenant} got an error naming {name}")
                continue
            except (openai.APIConnectionError, openai.APITimeoutError):
                outcomes["connection error"] += 1
                continue
            except ValueError as exc:  # a 200 whose body is not whole JSON: a broken answer
                wrong(str(exc), f"tenant {tenant} got a broken answer: {exc}")
                continue
            if not isinstance(got, openai.types.chat.ChatCompletion):
                outcomes["no body"] += 1
                for name in NAMED.findall(str(got)):
                    if name != mine:
                        wrong(str(got), f"tenant {tenant} got a body naming {name}")
                continue
            answer = got.choices[0].message.content
            outcomes["200"] += 1
            if answer != expected:
                wrong(str(answer), f"tenant {tenant} asked {prompt!r} and got {answer!r}")

    try:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    finally:
        for client in clients:
            await client.close()
    await asyncio.sleep(0.5)  # the upstream reads (and judges) the last requests that crossed
    # A request that crossed an unsolicited answer on the wire (its bytes had reached the
    # upstream when that answer was written) may have got that very answer: no HTTP/1.1
    # client can tell. It, and the same answer served again for that tenant and prompt (it
    # was stored), are counted apart. Everything else wrong is a failure, and so is any
    # request on a connection after an unsolicited answer that it did not cross (a violation).
    crossed = {
        (t, p, g)
        for f, t, p, g, _ in suspects
        if f in upstream.crossed and names(g, upstream.crossed[f])
    }
    wrong_ones = [why for f, t, p, g, why in suspects if (t, p, g) not in crossed]
    outcomes["crossed on the wire"] = len(suspects) - len(wrong_ones)
    outcomes["requests that crossed"] = len(upstream.crossed)
    report = f"DESYNC_SEED={seed}: {dict(outcomes)}; upstream {dict(upstream.behaviours)}"
    print(report)
    if wrong_ones:  # what happened on the connections that carried them
        report += "\n" + upstream.story({f for f, *_ in suspects} | set(upstream.crossed))
    assert wrong_ones == [], f"{report}\n" + "\n".join(wrong_ones[:20])
    assert upstream.violations == [], f"{report}\n" + "\n".join(upstream.violations[:20])
    assert outcomes["200"] > 50, report  # it did run: most requests were answered
    assert proc.proc.poll() is None, report
