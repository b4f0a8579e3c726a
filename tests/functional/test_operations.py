"""Operating it: purge, health without traffic, strict settings, --help, the Docker image."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.__main__ import main
from proxy.testing import FakeOpenAI
from tests.conftest import ROOT, ProxyServer, RedisServer, free_port, spawn_proxy, start_redis
from tests.helpers import body_of, header, post, raw, status_of

CHAT = "/v1/chat/completions"
TOKEN = "admin-secret"


def chat(prompt: str, model: str = "gpt-4o-mini") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})


def ask(
    port: int,
    prompt: str,
    key: str = "sk-a",
    ns: str = "",
    model: str = "gpt-4o-mini",
    path: str = CHAT,
) -> str | None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if ns:
        headers["X-Cache-Namespace"] = ns
    body = chat(prompt, model) if path == CHAT else orjson.dumps({"model": model, "input": prompt})
    return header(post(port, body, headers, path), "X-Cache-Status")


def purge_http(port: int, filters: object, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(filters)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    answer = post(port, body, headers, "/_proxy/purge")
    return status_of(answer), orjson.loads(body_of(answer))


def tenant_of(port: int, key: str) -> str:
    """The tenant id a key gets in the log lines, from the proxy's own stats-free answer."""
    from multidict import CIMultiDict

    from proxy.keys import credential_of, mac_key, tenant_digest

    cred = credential_of(CIMultiDict({"Authorization": f"Bearer {key}"}))
    return tenant_digest(mac_key(b"test-secret"), cred, "", "").hex()[:12]


def port_of(server: ProxyServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def seed(port: int) -> None:
    """Answers across two tenants, two namespaces, two models and two routes."""
    for key in ("sk-a", "sk-b"):
        for ns in ("", "team-x"):
            for model in ("gpt-4o-mini", "gpt-4o"):
                assert ask(port, "p", key, ns, model) == "MISS"
    assert ask(port, "p", "sk-a", path="/v1/embeddings", model="text-embedding-3-small") == "MISS"


def cached(port: int, key: str, ns: str, model: str) -> bool:
    return ask(port, "p", key, ns, model) == "HIT"


def test_purge_token_rules(start_proxy: Any) -> None:
    """Without an admin token configured: open on loopback (the door for other clients is
    tested in test_deploy); configured: 401 without it."""
    bare = start_proxy()
    assert purge_http(port_of(bare), {"namespace": "x"}, token=None) == (200, {"purged": 0})
    guarded = start_proxy(admin_token=TOKEN)
    assert purge_http(port_of(guarded), {"namespace": "x"}, token=None)[0] == 401
    assert purge_http(port_of(guarded), {"namespace": "x"}, token="wrong")[0] == 401
    for bad in ({}, {"colour": "red"}, {"tenant": "not-hex"}, ["namespace"], {"model": 3}):
        status, body = purge_http(port_of(guarded), bad)
        assert status == 400 and body["error"]["code"] == "invalid_purge_filter"


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
def test_purge_each_filter(start_proxy: Any, fake: FakeOpenAI, tmp_path: Path, store: str) -> None:
    """namespace, tenant, model and route, alone and ANDed, purge exactly their answers."""
    server = None
    if store == "redis":
        server = start_redis()
        cache = server.url
    else:
        cache = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'c.db'}"
    try:
        proxy = start_proxy(cache=cache, admin_token=TOKEN, hot_cache_mb=0)
        port = port_of(proxy)
        seed(port)
        a, b = tenant_of(port, "sk-a"), tenant_of(port, "sk-b")
        assert purge_http(port, {"namespace": "team-x", "tenant": a}) == (200, {"purged": 2})
        assert not cached(port, "sk-a", "team-x", "gpt-4o")  # gone (and stored again)
        assert cached(port, "sk-b", "team-x", "gpt-4o")  # another tenant kept
        assert purge_http(port, {"model": "gpt-4o"}) == (200, {"purged": 4})
        assert cached(port, "sk-a", "", "gpt-4o-mini")
        assert purge_http(port, {"route": "/v1/embeddings"}) == (200, {"purged": 1})
        assert purge_http(port, {"route": "/embeddings"}) == (200, {"purged": 0})
        assert purge_http(port, {"tenant": b}) == (200, {"purged": 2})
        assert cached(port, "sk-a", "", "gpt-4o-mini")
    finally:
        if server is not None:
            server.stop()


def test_purge_reaches_every_instance_within_the_hot_ttl(
    start_proxy: Any, fake: FakeOpenAI, redis_server: RedisServer
) -> None:
    """Two instances on one Redis: a purge on A is seen by B (whose hot tier held the entry)
    within --hot-cache-ttl-s."""
    a = start_proxy(cache=redis_server.url, admin_token=TOKEN, hot_cache_ttl_s=0.5)
    b = start_proxy(cache=redis_server.url, admin_token=TOKEN, hot_cache_ttl_s=0.5)
    assert ask(port_of(a), "shared", ns="n") == "MISS"
    assert ask(port_of(b), "shared", ns="n") == "HIT"  # now in B's hot tier too
    assert purge_http(port_of(a), {"namespace": "n"}) == (200, {"purged": 1})
    time.sleep(0.6)
    assert ask(port_of(b), "shared", ns="n") == "MISS"


def test_purge_cli_on_a_stopped_proxy(
    fake: FakeOpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """python -m proxy purge works on the embedded store with the proxy stopped."""
    db = tmp_path / "c.db"
    proc, port = spawn_proxy(
        fake.base_url, tmp_path / "d", "--cache", f"sqlite:///{db}", "--secret", "test-secret"
    )
    try:
        for ns in ("keep", "drop", "drop2"):
            assert ask(port, "p", ns=ns) == "MISS"
    finally:
        proc.terminate()
        proc.wait(20)
    flags = ["--cache", f"sqlite:///{db}", "--data-dir", str(tmp_path / "d")]
    assert main(["purge", "--namespace", "drop", *flags]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"purged": 1}
    assert main(["purge", "--tenant", tenant_of(0, "sk-a"), "--model", "gpt-4o-mini", *flags]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"purged": 2}
    assert main(["purge", *flags]) == 2  # at least one filter
    assert "at least one filter" in capsys.readouterr().err


def test_health_sees_a_dead_redis_without_traffic(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A Redis that dies is `degraded` in health with no request sent (the store is probed
    every second); health stays 200 (the proxy passes through) and ?strict=1 answers 503; a
    start-up line says it."""
    server = start_redis()
    proc, port = spawn_proxy(
        fake.base_url, tmp_path / "d", "--cache", server.url, output=subprocess.PIPE
    )
    try:
        health = orjson.loads(body_of(raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\n\r\n")))
        assert health["status"] == "ok"
        server.stop()
        t0 = time.monotonic()
        while True:
            got = raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if orjson.loads(body_of(got))["status"] == "degraded":
                break
            assert time.monotonic() - t0 < 10.0  # a hang, not a slow probe
            time.sleep(0.1)
        assert status_of(got) == 200 and orjson.loads(body_of(got))["store"]["reason"]
        strict = raw(
            port, b"GET /_proxy/health?strict=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(strict) == 503
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert b'"proxy.started"' in out and b"store_state" in out
    assert b"data folder" in err and b"OPENAI_BASE_URL=http://127.0.0.1:" in err


def test_a_dead_redis_at_start_up_is_named_at_once(fake: FakeOpenAI, tmp_path: Path) -> None:
    """A Redis that is down at start-up shows at once as a degraded store, with a reason, in health
    and in the start-up log line."""
    proc, port = spawn_proxy(
        fake.base_url,
        tmp_path / "d",
        "--cache",
        f"redis://127.0.0.1:{free_port()}/0",
        output=subprocess.PIPE,
    )
    try:
        health = orjson.loads(body_of(raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\n\r\n")))
        assert health["status"] == "degraded" and health["store"]["reason"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    started = next(orjson.loads(x) for x in out.splitlines() if b"proxy.started" in x)
    assert started["store_state"] == "degraded" and started["reason"]


@pytest.mark.parametrize(
    "flag",
    [
        ("--hot-cache-mb", "-1"),
        ("--breaker-s", "-3"),
        ("--lease-s", "0"),
        ("--max-body-mb", "-5"),
        ("--max-record-mb", "0"),
        ("--header-timeout-s", "nan"),
        ("--cache", "sqlite:///x.db?max_mb=-2"),
    ],
)
def test_nonsense_settings_stop_start_up_with_one_line(
    flag: tuple[str, str], tmp_path: Path
) -> None:
    """A size or time that makes no sense stops start-up with one line naming the setting."""
    run = subprocess.run(
        [sys.executable, "-m", "proxy", *flag, "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and flag[0].split("=")[0] in lines[0]


def test_help_shows_defaults_and_subcommands() -> None:
    """--help shows each flag's default and lists the subcommands; each has its own help."""
    top = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "[default: 8080; env PROXY_PORT]" in top and "[default: 64.0" in top
    for name in ("demo", "report", "images backfill", "purge", "healthcheck"):
        assert name in top
    for sub, words in (
        (["demo"], "fake OpenAI"),
        (["report"], "--by"),
        (["images", "backfill"], "Rehost the images"),
        (["purge"], "Delete cached answers"),
        (["healthcheck"], "Exit 0"),
    ):
        text = subprocess.run(
            [sys.executable, "-m", "proxy", *sub, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        assert words in text, sub
        assert f"python -m proxy {' '.join(sub)}" in text


def test_dockerfile_listens_through_its_environment() -> None:
    """CMD carries no --host (so `docker run image --port 9000` still listens on every
    interface), the health check follows the configured port, dependencies are pinned."""
    text = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (.*)$", text, re.M)
    assert cmd is not None and "--host" not in cmd.group(1) and "--port" not in cmd.group(1)
    assert re.search(r"PROXY_HOST=0\.0\.0\.0", text)
    health = re.search(r"^HEALTHCHECK .*$", text, re.M)
    assert health is not None and "healthcheck" in health.group(0) and "8080" not in health.group(0)
    assert "-c constraints.txt" in text and (ROOT / "constraints.txt").exists()
    assert "10001" in text


def test_healthcheck_follows_the_port_the_proxy_was_started_with(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The proxy writes the URL it answers at in its data folder; healthcheck reads it."""
    data = tmp_path / "d"
    proc, port = spawn_proxy(fake.base_url, data)
    try:
        deadline = time.monotonic() + 10
        while not (data / "listening").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        run = subprocess.run(
            [sys.executable, "-m", "proxy", "healthcheck", "--data-dir", str(data)],
            cwd=ROOT,
            timeout=30,
        )
        assert run.returncode == 0
    finally:
        proc.terminate()
        proc.wait(20)
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "healthcheck", "--data-dir", str(data)],
        cwd=ROOT,
        timeout=30,
    )
    assert run.returncode == 1  # stopped: unhealthy
    assert Path(data / "listening").read_text().strip() == f"http://127.0.0.1:{port}"


def test_an_upstream_failure_is_named_in_the_log_and_said_once(start_proxy: Any) -> None:
    """An unreachable upstream: a 502 whose message does not repeat itself, and a
    request.done line with error: upstream_unreachable."""
    from structlog.testing import capture_logs

    proxy = start_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    with capture_logs() as logs:
        answer = post(port_of(proxy), chat("x"), {"Authorization": "Bearer sk-a"})
        uncached = post(port_of(proxy), b"{}", {"Authorization": "Bearer sk-a"}, "/v1/files")
    assert status_of(answer) == 502 and status_of(uncached) == 502
    message = orjson.loads(body_of(answer))["error"]["message"]
    assert message.lower().count("could not be reached") == 1
    done = [e for e in logs if e["event"] == "request.done"]
    assert [e.get("error") for e in done] == ["upstream_unreachable", "upstream_unreachable"]


async def test_shutdown_closes_everything_even_when_one_close_fails(tmp_path: Path) -> None:
    """Resources close in reverse order of start, and one failing close skips no other."""
    import asyncio

    from proxy.app import ProxyApp
    from proxy.settings import Settings
    from proxy.stores import MemoryStore

    settings = Settings(
        upstream="http://127.0.0.1:9", data_dir=tmp_path, cache="memory://", secret="x"
    )
    app = await asyncio.to_thread(ProxyApp, settings)

    class BrokenImages:
        async def aclose(self) -> None:
            raise RuntimeError("the image store failed to close")

    app.state.rehoster = BrokenImages()  # type: ignore[assignment]
    await app.startup()
    upstream = app.state.upstream.client
    with pytest.raises(RuntimeError, match="image store"):
        await app.shutdown()
    assert upstream.closed  # closed before the failing one (reverse order)
    assert app.state.workers.cpu._shutdown
    store = app.state.cache.store
    assert isinstance(store, MemoryStore) and store.bytes == 0 and len(store) == 0
