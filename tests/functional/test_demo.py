"""`python -m proxy demo` works offline, fast, with numbers from the run (issue 8)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_offline_in_under_15_seconds(tmp_path: Path) -> None:
    """The tour exits 0 in under 15 s and shows the HIT, one upstream call for 20 duplicates
    and an image URL that outlives the upstream one."""
    env = {**os.environ, "NO_PROXY": "*", "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    env["TMPDIR"] = str(tmp_path)
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert took < 15
    out = done.stdout
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    }
    assert rows["chat: first call"][1] == "MISS" and rows["chat: same call again"][1] == "HIT"
    assert rows["chat: same call again"][4] == rows["chat: first call"][4] == "1"
    assert float(rows["chat: same call again"][2]) < float(rows["chat: first call"][2])
    assert (
        rows["stream: replayed"][1] == "HIT" and rows["stream: replayed"][3] == "to the first byte"
    )
    dup = rows["20 identical calls at once"]
    assert dup[1] == "1 MISS + 19 COALESCED" and dup[3] == "the batch of 20"
    assert int(dup[4]) == int(rows["stream: replayed"][4]) + 1
    paraphrase, number = rows["semantic: a paraphrase"], rows["semantic: another number"]
    assert paraphrase[1] == "HIT" and "served by meaning" in paraphrase[5]
    assert paraphrase[4] == dup[4]  # no chat call
    assert number[1] == "MISS" and int(number[4]) == int(dup[4]) + 1
    kept = rows["image: after upstream URL expired"]
    assert kept[1] == "upstream 403, ours 200"
    assert "PNG bytes still" in kept[5]
    assert "its own overhead included" in out
    link = re.search(r"^image: generate: (http://\S+\.png)$", out, re.M)
    assert link is not None  # the image URL whole, on one line
    assert list(tmp_path.iterdir()) == []  # the demo removed its temporary folder


def test_demo_serve_answers_an_sdk_request() -> None:
    """`demo --serve` keeps the proxy up at the printed base URL; an SDK call gets through;
    a SIGTERM stops it cleanly, its temporary folder (key secret, store, log) removed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        base = ""
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        said = ""
        while time.monotonic() < deadline and not base:
            line = proc.stdout.readline()
            said += line
            if line.startswith("OPENAI_BASE_URL="):
                base = line.strip().split("=", 1)[1]
        assert base == f"http://127.0.0.1:{port}/v1"
        log = re.search(r"request log \(one JSON line per request\): (\S+)", said)
        assert log is not None and Path(log.group(1)).exists()
        with openai.OpenAI(base_url=base, api_key="sk-mine", max_retries=0) as c:
            r = c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from me"}]
            )
        assert r.choices[0].message.content
        proc.terminate()
        assert proc.wait(10) == 0
        assert not Path(log.group(1)).parent.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_demo_stopped_mid_tour_leaves_no_folder(tmp_path: Path) -> None:
    """A SIGTERM while the tour still runs stops the demo through its cleanup: its temporary
    folder (key secret, store, log) is gone, as after Ctrl-C."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--serve", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(tmp_path.iterdir())  # the demo's folder is made: the tour begins
        time.sleep(0.3)
        proc.terminate()
        assert proc.wait(20) == 0
        assert list(tmp_path.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
