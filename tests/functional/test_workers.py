"""--workers N: N processes on one port sharing the store (issue 5)."""

from __future__ import annotations

import time
from pathlib import Path

import openai

from proxy.testing import FakeOpenAI
from tests.conftest import spawn_proxy

ROOT = Path(__file__).resolve().parents[2]


def test_two_workers_share_the_embedded_store(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Two worker processes on one port answer from one SQLite store: 1 upstream call for
    20 sequential identical requests, whichever worker takes each."""
    proc, port = spawn_proxy(fake.base_url, tmp_path, "--workers", "2")
    try:
        base = f"http://127.0.0.1:{port}/v1"
        labels = []
        for _ in range(20):
            with openai.OpenAI(base_url=base, api_key="sk-w", max_retries=0) as c:
                r = c.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "workers"}]
                )
                labels.append(r.headers["x-cache-status"])
            if len(labels) == 1:  # the other worker sees it once its SQLite batch is written
                time.sleep(0.2)
        assert labels[0] == "MISS" and set(labels[1:]) == {"HIT"}
        assert fake.count("/v1/chat/completions") == 1
    finally:
        proc.terminate()
        assert proc.wait(15) is not None


def test_two_workers_stats_add_up_whichever_answers(fake: FakeOpenAI, tmp_path: Path) -> None:
    """With --workers 2, /_proxy/stats and /_proxy/metrics count every request sent, whichever
    worker answers (each shares its counters in the data folder every second)."""
    import re
    import time

    import orjson

    from tests.helpers import body_of, post, raw

    proc, port = spawn_proxy(fake.base_url, tmp_path, "--workers", "2")
    try:
        deadline = time.monotonic() + 20  # both workers up (each writes its counters)
        while len(list((tmp_path / "stats").glob("*/*.json"))) < 2:
            assert time.monotonic() < deadline, "the second worker did not start"
            time.sleep(0.1)
        headers = {"Authorization": "Bearer sk-w", "Content-Type": "application/json"}
        for i in range(30):  # a new connection each: the kernel spreads them over the workers
            body = orjson.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i % 10}"}]}
            )
            post(port, body, headers)
            if i == 9:  # the other worker sees an answer once its SQLite batch is written
                time.sleep(0.2)
        time.sleep(2.5)
        for _ in range(8):
            snap = orjson.loads(
                body_of(
                    raw(port, b"GET /_proxy/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                )
            )
            assert snap["requests"] == 30 and snap["misses"] == 10 and snap["hits"] == 20
            metrics = body_of(
                raw(port, b"GET /_proxy/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            ).decode()
            total = sum(
                float(v) for v in re.findall(r"^ocp_requests_total\{.*\} (\S+)$", metrics, re.M)
            )
            assert total == 30
        shares = [orjson.loads(p.read_bytes()) for p in (tmp_path / "stats").glob("*/*.json")]
        per_worker = [sum(c[3][0] for c in share["cells"]) for share in shares]
        assert len(per_worker) == 2 and sum(per_worker) == 30 and min(per_worker) > 0
    finally:
        proc.terminate()
        assert proc.wait(15) is not None
