"""--workers N: N processes on one port sharing the store (issue 5)."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.conftest import spawn_proxy

ROOT = Path(__file__).resolve().parents[2]


def test_two_workers_share_the_embedded_store(fake, tmp_path):
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
        assert labels[0] == "MISS" and set(labels[1:]) == {"HIT"}
        assert fake.count("/v1/chat/completions") == 1
    finally:
        proc.terminate()
        assert proc.wait(15) is not None
