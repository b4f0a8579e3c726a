"""Deploying it (issue 26): one key secret per store, the admin door, supervised workers,
start-up failures in one line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.testing import FakeOpenAI
from tests.conftest import ProxyServer, RedisServer, start_redis
from tests.helpers import post_json

CHAT_PATH = "/v1/chat/completions"
CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "one fleet"}],
}
HEADERS = {"Authorization": "Bearer sk-fleet", "Content-Type": "application/json"}


@pytest.fixture
def fleet(
    start_proxy: Any, redis_server: RedisServer, tmp_path: Path
) -> tuple[ProxyServer, ProxyServer]:
    """Two instances on one Redis, each with its own data folder and no --secret."""
    a = start_proxy(cache=redis_server.url, secret="", data_dir=tmp_path / "a")
    b = start_proxy(cache=redis_server.url, secret="", data_dir=tmp_path / "b")
    return a, b


async def test_two_instances_without_secret_coalesce_into_one_call(
    fleet: tuple[ProxyServer, ProxyServer], fake: FakeOpenAI, tmp_path: Path
) -> None:
    """Two instances on one Redis with no --secret make the same keys: 20 identical requests
    over both are one upstream call, though each data folder holds its own secret file."""
    a, b = fleet
    assert (tmp_path / "a" / "secret.key").read_text() != (
        tmp_path / "b" / "secret.key"
    ).read_text()
    assert a.state.planner.secret == b.state.planner.secret
    fake.latency = 0.5
    urls = [p.url + CHAT_PATH for p in (a, b)]
    results = await asyncio.gather(*(post_json(urls[i % 2], CHAT) for i in range(20)))
    assert [s for s, _, _ in results] == [200] * 20
    assert fake.count(CHAT_PATH) == 1 and len({body for _, _, body in results}) == 1


async def test_one_idempotency_key_with_two_bodies_across_instances_is_422(
    fleet: tuple[ProxyServer, ProxyServer], fake: FakeOpenAI
) -> None:
    """An Idempotency-Key used on A, then on B with another body: 422, one upstream call."""
    a, b = fleet
    key = {"Idempotency-Key": "order-7"}
    first = await post_json(a.url + CHAT_PATH, CHAT, key)
    other = {**CHAT, "messages": [{"role": "user", "content": "another body"}]}
    second = await post_json(b.url + CHAT_PATH, other, key)
    assert first[0] == 200 and second[0] == 422
    assert orjson.loads(second[2])["error"]["code"] == "idempotency_key_reused"
    assert fake.count(CHAT_PATH) == 1


def test_an_explicit_secret_that_differs_from_the_store_is_one_line(
    start_proxy: Any, tmp_path: Path
) -> None:
    """--secret against a store whose entries were made with another secret (or with a
    generated one) stops start-up with one line naming --secret; the same secret starts."""
    from proxy.errors import ConfigError

    server = start_redis()
    try:
        start_proxy(cache=server.url, secret="one", data_dir=tmp_path / "a")
        start_proxy(cache=server.url, secret="one", data_dir=tmp_path / "b")
        for secret in ("two", ""):
            with pytest.raises(ConfigError) as err:
                start_proxy(cache=server.url, secret=secret, data_dir=tmp_path / "c")
            assert "--secret" in str(err.value) and "\n" not in str(err.value)
    finally:
        server.stop()


ADMIN_ROUTES = (
    ("GET", "/_proxy/stats"),
    ("GET", "/_proxy/metrics"),
    ("GET", "/_proxy/dashboard"),
    ("POST", "/_proxy/purge"),
)
CLIENT = """
import sys, urllib.request, urllib.error, orjson
out = []
for method, url in orjson.loads(sys.argv[1]):
    data = b'{"namespace": "x"}' if method == "POST" else None
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out.append([r.status, r.read().decode("utf-8", "replace")])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode("utf-8", "replace")])
print(orjson.dumps(out).decode())
"""


@pytest.fixture
def netns() -> Iterator[tuple[Callable[..., str], str]]:
    """A network namespace of its own, joined to the test's by a veth pair on a private /30:
    (run a command inside it, the proxy-side address). Root and `ip` are needed."""
    import os
    import random
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2's `ip` to make a network namespace")
    tag = f"{os.getpid() % 100000}{random.randrange(1000)}"
    ns, outer, inner = f"ocp{tag}", f"vo{tag}", f"vi{tag}"
    net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
    here, there = f"{net}.{4 * random.randrange(1, 60) + 1}", ""
    there = here.rsplit(".", 1)[0] + "." + str(int(here.rsplit(".", 1)[1]) + 1)

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    ip("netns", "add", ns)
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", ns)
        ip("addr", "add", f"{here}/30", "dev", outer)
        ip("link", "set", outer, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{there}/30", "dev", inner)
        ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

        def run(*argv: str) -> str:
            done = subprocess.run(
                ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        yield run, here
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def ask_all(run: Any, base: str, routes: Any) -> list[tuple[int, str]]:
    import sys

    urls = [[method, base + path] for method, path in routes]
    out = run(sys.executable, "-c", CLIENT, orjson.dumps(urls).decode())
    return [(status, body) for status, body in orjson.loads(out)]


def test_admin_pages_refuse_a_non_loopback_client_without_a_token(
    fake: FakeOpenAI, tmp_path: Path, netns: tuple[Callable[..., str], str]
) -> None:
    """Without --admin-token, stats, metrics, dashboard and purge answer 403 to a client on
    another network namespace and 200 on loopback; health answers both and shows no
    credential of the upstream."""
    from tests.conftest import spawn_proxy
    from tests.helpers import body_of, post, raw, status_of

    run, here = netns
    port_fake = fake.base_url.rsplit(":", 1)[1]
    upstream = f"http://gwuser:gw-secret-123@127.0.0.1:{port_fake}"
    proc, port = spawn_proxy(upstream, tmp_path, "--host", "0.0.0.0", "--cache", "memory://")
    try:
        answers = ask_all(run, f"http://{here}:{port}", [*ADMIN_ROUTES, ("GET", "/_proxy/health")])
        for (status, body), route in zip(answers[:-1], ADMIN_ROUTES, strict=True):
            assert status == 403, route
            assert orjson.loads(body)["error"]["code"] == "admin_token_not_configured"
        status, body = answers[-1]
        assert status == 200 and "gw-secret" not in body and "gwuser" not in body
        assert orjson.loads(body)["upstream"] == f"http://127.0.0.1:{port_fake}"
        for method, path in ADMIN_ROUTES:  # the same pages on loopback
            if method == "POST":
                got = post(port, b'{"namespace": "x"}', {}, path)
            else:
                got = raw(
                    port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
            assert status_of(got) == 200, path
        assert b"gw-secret" not in body_of(got)
    finally:
        proc.terminate()
        proc.wait(20)


def test_admin_pages_open_to_a_non_loopback_client_with_the_token(
    fake: FakeOpenAI, tmp_path: Path, netns: tuple[Callable[..., str], str]
) -> None:
    """With --admin-token, a client on another network namespace gets the admin pages with
    the token (?token= for a browser) and 401 without it."""
    from tests.conftest import spawn_proxy

    run, here = netns
    proc, port = spawn_proxy(
        fake.base_url, tmp_path, "--host", "0.0.0.0", "--cache", "memory://", "--admin-token", "t0k"
    )
    try:
        base = f"http://{here}:{port}"
        without = ask_all(run, base, [("GET", "/_proxy/stats")])
        with_token = ask_all(run, base, [("GET", "/_proxy/stats?token=t0k")])
        assert without[0][0] == 401 and with_token[0][0] == 200
    finally:
        proc.terminate()
        proc.wait(20)


def run_proxy(*flags: str, timeout: float = 60) -> Any:
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "proxy", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_and_a_failure(workers: str, tmp_path: Path) -> None:
    """A port another process listens on: one line naming --port, exit status 2, and no
    "listening" line, with one worker and with two."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_proxy("--port", port, "--workers", workers, "--data-dir", str(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--port" in lines[0] and "in use" in lines[0] and "listening" not in lines[0]


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (the workers of a supervisor)."""
    from pathlib import Path

    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def wait_for(cond: Any, within_s: float, what: Any) -> float:
    """Poll `cond` until true; the seconds it took (fails past `within_s`, saying `what()`)."""
    import time

    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < within_s, what()
        time.sleep(0.05)
    return time.monotonic() - t0


def worker_pids(proc: Any) -> set[int]:
    """The worker processes (not the spawn machinery's resource tracker)."""
    return {p for p in children(proc.pid) if "spawn_main" in _cmdline(p)}


def _cmdline(pid: int) -> str:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_worker_killed_under_load_is_replaced_and_its_counts_kept(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """SIGKILL one of two workers under load: a new worker is there within 5 s and logged,
    no request sent after that fails, /_proxy/stats counts every request answered (the
    dead worker's included, and at most the requests the kill cut besides), and a second
    proxy on the same port fails in one line."""
    import os
    import signal
    import threading
    import time

    from tests.helpers import Proc, body_of, post, raw, status_of

    running = Proc(fake.base_url, tmp_path, "--workers", "2", "--cache", "memory://")
    proc, port = running.proc, running.port
    stop = threading.Event()
    try:
        wait_for(lambda: b"listening" in b"".join(running._err), 60, lambda: "not started")
        first = worker_pids(proc)
        answered, failed, failed_after = [0], [0], []
        replaced_at = [float("inf")]

        def load(n: int) -> None:
            i = 0
            while not stop.is_set():
                body = orjson.dumps(
                    {
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": f"{n}/{i % 7}"}],
                    }
                )
                sent = time.monotonic()
                why = ""
                try:
                    got = post(port, body, HEADERS)
                    why = got[:200].decode("latin-1") if status_of(got) != 200 else ""
                except (OSError, IndexError) as exc:  # reset, or closed with nothing sent
                    why = repr(exc)
                if not why:
                    answered[0] += 1
                else:
                    failed[0] += 1
                if why and sent > replaced_at[0]:
                    failed_after.append((round(sent - replaced_at[0], 3), why))
                i += 1

        threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        took = wait_for(
            lambda: len(worker_pids(proc) - {victim}) == 2 and victim not in worker_pids(proc),
            5.0,
            lambda: (
                f"not replaced within 5 s: {[_cmdline(p) for p in children(proc.pid)]} "
                f"{b''.join(running._err)[-1500:]!r} {proc.poll()}"
            ),
        )
        time.sleep(1.0)  # the new worker's start-up (it reports ready) ...
        replaced_at[0] = time.monotonic()
        time.sleep(2.0)  # ... then load on both
        stop.set()
        for t in threads:
            t.join(30)
        assert failed_after == [] and answered[0] > 50, failed_after[:5]
        second = run_proxy("--port", str(port), "--workers", "2", "--data-dir", str(tmp_path / "b"))
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert "in use" in second.stderr
        snap = orjson.loads(
            body_of(
                raw(port, b"GET /_proxy/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            )
        )
        # The killed worker may have counted a request whose answer it never finished
        # sending (the client saw a reset): stats hold every answered request, and at most
        # those that failed besides.
        counted = snap["requests"]
        assert answered[0] <= counted <= answered[0] + failed[0], (counted, answered, failed)
        health = raw(port, b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(health) == 200
        print(f"replaced in {took:.2f} s; {answered[0]} requests answered")
    finally:
        stop.set()
        out, err = running.stop()
        print(out[-2000:], err[-2000:])
    events = []
    for line in out.splitlines():  # the killed worker may have left half a line behind
        with contextlib.suppress(orjson.JSONDecodeError):
            events.append(orjson.loads(line))
    died = [e for e in events if e["event"] == "worker.died"]
    assert len(died) == 1 and died[0]["pid"] == victim and "SIGKILL" in died[0]["exit"]
    assert any(e["event"] == "worker.replaced" for e in events)


async def test_the_sqlite_store_stays_within_its_cap_on_disk_wal_included(tmp_path: Path) -> None:
    """Sustained writes of incompressible answers (10 KB to 400 KB, several writers, reads
    in between) into a 5 MB SQLite store: database plus WAL never pass 1.2 times the cap,
    sampled every few milliseconds while it writes, evicts and vacuums."""
    import os
    import random
    import threading
    import time

    from proxy.errors import StoreUnavailable
    from proxy.models import CachedResponse
    from proxy.stores.sqlite import SQLiteStore

    cap = 5 * 1024 * 1024
    store = SQLiteStore(tmp_path / "c.db", max_bytes=cap)
    worst, refused, stop = [0], [0], threading.Event()

    def disk() -> int:
        total = 0
        for name in ("c.db", "c.db-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += (tmp_path / name).stat().st_size
        return total

    def sample() -> None:
        while not stop.is_set():
            worst[0] = max(worst[0], disk())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rng = random.Random(26)
    try:
        await store.warm()

        async def writer(w: int) -> None:
            for i in range(60):
                size = rng.choice((10_000, 50_000, 100_000, 400_000))
                entry = CachedResponse(200, (), os.urandom(size), time.time())
                try:
                    await store.set(f"w{w}-{i}", entry, 3600)
                except StoreUnavailable:  # a full write queue refuses (a MISS stays one)
                    refused[0] += 1
                await store.get(f"w{w}-{i // 2}")

        await asyncio.gather(*(writer(w) for w in range(4)))
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        sampler.join(5)
        await store.aclose()
    assert store.evicted > 20 and refused[0] < 80  # it evicted many times; most were written
    assert worst[0] <= 1.2 * cap, f"disk reached {worst[0] / cap:.2f}x the cap"
    print(f"worst {worst[0] / cap:.2f}x the cap, {store.evicted} evicted, {refused[0]} refused")


def test_each_subcommand_help_shows_its_own_options() -> None:
    """purge --help lists its filters and only the store flags; healthcheck --help only where
    to find the proxy; demo --help takes the server's flags; fake-upstream has its own."""
    purge = run_proxy("purge", "--help").stdout
    for flag in ("--namespace", "--tenant", "--model", "--route", "--cache", "--data-dir"):
        assert flag in purge
    for flag in ("--upstream", "--workers", "--admin-token", "--max-body-mb"):
        assert flag not in purge
    health = run_proxy("healthcheck", "--help").stdout
    assert "--data-dir" in health and "--port" in health and "--upstream" not in health
    demo = run_proxy("demo", "--help").stdout
    assert "--serve" in demo and "--admin-token" in demo and "--workers" in demo
    fake = run_proxy("fake-upstream", "--help").stdout
    assert "--port" in fake and "--latency" in fake
    top = run_proxy("--help").stdout
    assert "fake-upstream" in top


def test_subcommands_fail_in_one_line(tmp_path: Path) -> None:
    """purge with its store down, a failing healthcheck and a bad flag to a subcommand each
    end with one line that says what to do, and a non-zero status."""
    from tests.conftest import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"
    for argv, words in (
        (["purge", "--namespace", "x", "--cache", down], "--cache"),
        (["healthcheck", "--data-dir", str(tmp_path), "--port", str(free_port())], "running"),
        (["purge", "--colour", "red"], "python -m proxy purge --help"),
    ):
        done = run_proxy(*argv)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and words in lines[0], (argv, done.stderr)


def test_the_real_cli_runs_against_fake_upstream_without_a_key(tmp_path: Path) -> None:
    """`python -m proxy fake-upstream` serves the fake API; the real proxy in front of it
    answers an SDK call (MISS, then HIT) with any key."""
    import subprocess
    import sys
    import time

    import openai

    from tests.conftest import ROOT, free_port, listening, spawn_proxy

    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "proxy", "fake-upstream", "--port", str(port), "--latency", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: listening(port), 20, lambda: "fake-upstream did not start")
        proc, proxy_port = spawn_proxy(f"http://127.0.0.1:{port}", tmp_path)
        try:
            base = f"http://127.0.0.1:{proxy_port}/v1"
            with openai.OpenAI(base_url=base, api_key="sk-anything", max_retries=0) as c:
                labels = []
                for _ in range(2):
                    r = c.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                    )
                    labels.append(r.headers["x-cache-status"])
                    time.sleep(0.2)  # the embedded store writes in batches
            assert labels == ["MISS", "HIT"] and r.parse().choices[0].message.content
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        fake.terminate()
        _, err = fake.communicate(timeout=20)
    assert f"--upstream http://127.0.0.1:{port}".encode() in err


def test_demo_serve_takes_the_server_flags(tmp_path: Path) -> None:
    """`demo --serve --admin-token T --port P`: the served proxy has the token (its stats
    answer 401 without it and 200 with it)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port, listening
    from tests.helpers import raw, status_of

    port = free_port()
    TOKEN = ("--admin-token", "demo-token")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--serve", "--port", str(port), *TOKEN],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: listening(port), 60, lambda: "demo --serve did not start")
        head = b"GET /_proxy/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        assert status_of(raw(port, head + b"\r\n")) == 401
        authed = head + b"Authorization: Bearer demo-token\r\n\r\n"
        assert status_of(raw(port, authed)) == 200
    finally:
        proc.terminate()
        proc.wait(20)


def test_an_image_host_off_the_allowlist_names_the_setting(tmp_path: Path) -> None:
    """The refusal for an image host off the allowlist names --image-source-hosts, so the
    operator knows which setting lets those answers be rehosted and cached."""
    from proxy.errors import RehostError
    from proxy.images import LocalImageStore
    from proxy.images.rehost import ImageRehoster

    rehoster = ImageRehoster(LocalImageStore(tmp_path), allowed_hosts="")
    with pytest.raises(RehostError) as err:
        rehoster.check_url("https://images.example.com/a.png")
    assert "--image-source-hosts" in str(err.value) and "images.example.com" in str(err.value)
