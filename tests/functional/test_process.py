"""`python -m proxy` as users run it: the JSON log lines it writes and a clean shutdown."""

from __future__ import annotations

import subprocess
from pathlib import Path

import openai
import orjson

from proxy.testing import FakeOpenAI
from tests.conftest import spawn_proxy

ROOT = Path(__file__).resolve().parents[2]


def run_proxy(fake: FakeOpenAI, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    proc, port = spawn_proxy(fake.base_url, tmp_path, *flags, output=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}/v1"


def test_json_log_lines_from_a_real_process(fake: FakeOpenAI, tmp_path: Path) -> None:
    """One request.done JSON line per request, with the documented fields and never the key
    or the prompt; SIGTERM stops the process cleanly and flushes the lines."""
    proc, base = run_proxy(fake, tmp_path)
    try:
        with openai.OpenAI(base_url=base, api_key="sk-secret-key-123", max_retries=0) as c:
            for _ in range(2):
                c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "private prompt"}]
                )
            c.models.list()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith(b"{")]
    done = [ln for ln in lines if ln.get("event") == "request.done"]
    assert [ln["cache"] for ln in done] == ["miss", "hit", "bypass"]
    for field in (
        "route",
        "model",
        "stream",
        "status",
        "duration_ms",
        "ttfb_ms",
        "bytes",
        "tenant",
        "level",
        "ts",
    ):
        assert field in done[0], field
    assert done[0]["upstream_ms"] > 0 and done[0]["cost_usd"] > 0 and done[1]["saved_usd"] > 0
    assert len(done[0]["key"]) == 12 and len(done[0]["tenant"]) == 12
    assert b"sk-secret-key-123" not in out + err and b"private prompt" not in out + err


def test_console_log_format(fake: FakeOpenAI, tmp_path: Path) -> None:
    """--log-format console writes readable lines instead of JSON."""
    proc, base = run_proxy(fake, tmp_path, "--log-format", "console")
    try:
        with openai.OpenAI(base_url=base, api_key="sk-x", max_retries=0) as c:
            c.models.list()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    text = (out + err).decode()
    assert "request.done" in text and "cache=bypass" in text and not text.lstrip().startswith("{")


def test_a_stdout_nobody_reads_never_stalls_the_proxy(fake: FakeOpenAI, tmp_path: Path) -> None:
    """With its stdout a pipe that nobody reads (64 KB of lines fill it), the proxy goes on
    answering: the log waits in a writer thread, and every line comes out once read."""
    import http.client
    import time

    proc, port = spawn_proxy(fake.base_url, tmp_path, output=subprocess.PIPE)
    n = 1500  # about 600 KB of request.done lines, ten pipes' worth
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(n):
            body = orjson.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
            )
            conn.request("POST", "/v1/chat/completions", body=body, headers=JSON)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200, i
        t0 = time.monotonic()
        conn.request("GET", "/_proxy/health")  # (a stalled proxy never answers: timeout)
        assert conn.getresponse().status == 200 and time.monotonic() - t0 < 8.0
        conn.close()
    finally:
        proc.terminate()
        out, _err = proc.communicate(timeout=30)  # reads the pipe: the backlog comes out
    done = [ln for ln in out.splitlines() if b'"request.done"' in ln]
    assert len(done) == n and proc.returncode == 0


JSON = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}
