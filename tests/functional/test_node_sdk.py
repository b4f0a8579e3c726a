"""The official Node `openai` SDK through the proxy: the same behaviour as for Python."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.testing import FakeOpenAI

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the Node SDK test")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return Path(node)


def test_node_sdk_through_the_proxy(node_sdk: Path, start_proxy: Any, fake: FakeOpenAI) -> None:
    """Chat (JSON and SSE with usage), the responses stream helper, base64 embeddings,
    images, errors and models all behave through the proxy, with HITs replayed faithfully."""
    proxy = start_proxy(image_source_hosts=fake.netloc)
    done = subprocess.run(
        [str(node_sdk), "smoke.mjs", proxy.base_url],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    assert out["chat_first"]["status"] == "MISS" and out["chat_second"]["status"] == "HIT"
    assert out["chat_first"]["id"] == out["chat_second"]["id"]
    assert out["stream_first"] == out["stream_second"] and out["stream_first"]["usage"]
    assert out["responses_first"] == out["responses_second"]
    assert out["responses_first"]["deltas"] == out["responses_first"]["text"]
    assert len(out["embedding"]) == 4
    assert out["image_url"].startswith(proxy.url + "/_proxy/images/")
    assert out["error"] == {"name": "RateLimitError", "status": 429, "code": "fake_429"}
    assert "gpt-4o-mini" in out["models"]
    # one upstream call per distinct request, whatever the SDK
    # the stream is the JSON answer's twin: served from it, with its usage chunk
    tw = out["twin_chat"]
    assert (tw["json"]["status"], tw["stream"]["status"]) == ("MISS", "HIT")
    assert (
        tw["json"]["text"] == tw["stream"]["text"] and tw["json"]["usage"] == tw["stream"]["usage"]
    )
    tools = out["twin_tools"]
    assert tools["json"]["status"] == "HIT" and tools["json"]["calls"] == tools["stream"]["calls"]
    assert tools["stream"]["calls"][0]["name"] == "extract_student_info"
    assert tools["json"]["usage"] == tools["stream"]["usage"]
    tr = out["twin_responses"]
    assert tr["first"] == "MISS" and tr["text"] == tr["deltas"] == tr["streamed"]
    assert tr["usage"][0] == tr["usage"][1]
    back = out["twin_responses_back"]
    assert back["status"] == "HIT" and back["text"] == out["responses_first"]["text"]
    assert back["usage"] == out["responses_first"]["usage"]
    # one upstream call per distinct request, whatever the SDK and the form
    # the persona (JSON, its stream a twin), the twin chat, the tool call, the 429
    assert fake.count("/v1/chat/completions") == 4
    assert fake.count("/v1/responses") == 2
