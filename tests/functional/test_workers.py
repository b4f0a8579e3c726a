"""--workers N: N processes on one port sharing the store (issue 5)."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import orjson

from proxy.testing import FakeOpenAI
from tests.conftest import spawn_proxy
from tests.helpers import body_of, eventually, post, raw

ROOT = Path(__file__).resolve().parents[2]

FOLLOWED_S = 1.0
"""Once an answer is in the file: twenty times FOLLOW_EVERY_S (0.05 s), the period at which
the other worker's key filter reads what was written there (before, it is rightly a MISS)."""


def both_up(data_dir: Path) -> None:
    """Wait until both workers serve (each writes its counters file as it starts): a worker
    that starts after an answer is written would load it with its key filter, not follow it."""
    eventually(lambda: len(list((data_dir / "stats").glob("*/*.json"))) >= 2, within_s=20.0)


def stored(data_dir: Path) -> int:
    """Answers in the workers' SQLite file, read as a third process would (read-only)."""
    db = data_dir / "cache.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        ) as conn:
            return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
    except sqlite3.Error:  # not created yet, or busy: ask again
        return 0


def written(data_dir: Path, answers: int) -> None:
    """Wait until `answers` answers are in the file (one batch write, WRITE_DELAY_S after
    the answer), then FOLLOWED_S for every worker's key filter to read them (the one wait
    that no state outside the workers shows the end of)."""
    eventually(lambda: stored(data_dir) >= answers, within_s=10.0)
    time.sleep(FOLLOWED_S)


def get_json(port: int, path: str) -> Any:
    return orjson.loads(
        body_of(raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()))
    )


def test_two_workers_share_the_embedded_store(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Two worker processes on one port answer from one SQLite store: 1 upstream call for
    20 sequential identical requests, whichever worker takes each."""
    proc, port = spawn_proxy(fake.base_url, tmp_path, "--workers", "2")
    try:
        both_up(tmp_path)
        base = f"http://127.0.0.1:{port}/v1"
        labels = []
        for _ in range(20):
            with openai.OpenAI(base_url=base, api_key="sk-w", max_retries=0) as c:
                r = c.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "workers"}]
                )
                labels.append(r.headers["x-cache-status"])
            if len(labels) == 1:  # the other worker sees it once it is in the file
                written(tmp_path, 1)
        assert labels[0] == "MISS" and set(labels[1:]) == {"HIT"}
        assert fake.count("/v1/chat/completions") == 1
    finally:
        proc.terminate()
        assert proc.wait(15) is not None


def test_two_workers_stats_add_up_whichever_answers(fake: FakeOpenAI, tmp_path: Path) -> None:
    """With --workers 2, /_proxy/stats and /_proxy/metrics count every request sent, whichever
    worker answers (each shares its counters in the data folder every second)."""
    proc, port = spawn_proxy(fake.base_url, tmp_path, "--workers", "2")
    try:
        both_up(tmp_path)
        headers = {"Authorization": "Bearer sk-w", "Content-Type": "application/json"}
        for i in range(30):  # a new connection each: the kernel spreads them over the workers
            body = orjson.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i % 10}"}]}
            )
            post(port, body, headers)
            if i == 9:  # the other worker sees an answer once it is in the file
                written(tmp_path, 10)
        eventually(lambda: get_json(port, "/_proxy/stats")["requests"] == 30, within_s=10.0)
        for _ in range(8):  # whichever worker answers
            snap = get_json(port, "/_proxy/stats")
            assert snap["requests"] == 30 and snap["misses"] == 10 and snap["hits"] == 20
            metrics = body_of(
                raw(port, b"GET /_proxy/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            ).decode()
            total = sum(
                float(v) for v in re.findall(r"^ocp_requests_total\{.*\} (\S+)$", metrics, re.M)
            )
            assert total == 30

        def per_worker() -> list[int]:
            shares = [orjson.loads(p.read_bytes()) for p in (tmp_path / "stats").glob("*/*.json")]
            return [sum(c[3][0] for c in share["cells"]) for share in shares]

        eventually(lambda: sum(per_worker()) == 30, within_s=10.0)  # written every second
        counted = per_worker()
        assert len(counted) == 2 and sum(counted) == 30 and min(counted) > 0
    finally:
        proc.terminate()
        assert proc.wait(15) is not None
