"""Helpers shared by the benchmark scripts: start processes, wait for ports, run wrk."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def fake_upstream(**knobs: float | str) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "bench.servers", "fake", "--port", str(port)]
    for name, value in knobs.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    with process(args, port):
        yield f"http://127.0.0.1:{port}"


def proxy_argv(upstream: str, data_dir: str, port: int, *flags: str) -> list[str]:
    """The command line of a benchmarked `python -m proxy`."""
    return [
        sys.executable,
        "-m",
        "proxy",
        "--port",
        str(port),
        "--upstream",
        upstream,
        "--data-dir",
        data_dir,
        *flags,
    ]


@contextmanager
def proxy(upstream: str, *flags: str, log_to: str = os.devnull) -> Iterator[str]:
    """`python -m proxy` with its per-request JSON log line on (written to `log_to`)."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="ocp-bench-")
    args = proxy_argv(upstream, data_dir, port, *flags)
    with open(log_to, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port (yields "" if it is not installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        yield ""
        return
    port = free_port()
    with process([exe, "--port", str(port), "--save", "", "--appendonly", "no"], port):
        yield f"redis://127.0.0.1:{port}/0"


WRK_LUA = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


UNIQUE_LUA = """
counter = 0
salt = "SALT"
request = function()
    counter = counter + 1
    local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Describe persona '
        .. salt .. '-' .. counter .. '"}]}'
    return wrk.format("POST", nil, {["Content-Type"] = "application/json",
        ["Authorization"] = "Bearer sk-bench"}, body)
end
"""
"""A new chat completion on every request (a MISS every time): a salt per wrk run (wrk's
math.random is not seeded: every run would draw the same one) and a counter."""


def wrk(
    url: str,
    body: str,
    *,
    connections: int,
    seconds: int,
    threads: int = 1,
    unique: bool = False,
) -> dict[str, float]:
    """Run wrk; returns requests/s and latency percentiles in ms. `unique`: every request is
    a new chat completion (UNIQUE_LUA) and `body` is not used."""
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        salt = f"{time.time_ns():x}-{os.getpid()}"
        f.write(UNIQUE_LUA.replace("SALT", salt) if unique else WRK_LUA.format(body=body))
        script = f.name
    out = subprocess.run(
        [exe, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    result = {"rps": rps}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        assert m is not None, out
        value, unit = float(m.group(1)), m.group(2)
        result[f"p{pct}_ms"] = (
            value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
        )
    lat = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if lat is not None:
        value, unit = float(lat.group(1)), lat.group(2)
        result["max_ms"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return result


HIT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Describe a persona"}]}'
"""The chat completion every HIT benchmark asks for."""


def warm(url: str, body: str = HIT_BODY) -> str:
    """Ask twice, so the second answer (and every later one) is a HIT; its X-Cache-Status."""
    import urllib.request

    req = urllib.request.Request(
        url,
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
    )
    status = ""
    for _ in range(2):
        with urllib.request.urlopen(req) as r:
            r.read()
            status = r.headers["X-Cache-Status"]
    return status


def start_proxy(upstream: str, data: Path, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m proxy` whose process the caller keeps (to read its memory), its log in
    `data`/log.jsonl; (process, port). The caller terminates it."""
    port = free_port()
    proc = subprocess.Popen(
        proxy_argv(upstream, str(data), port, *flags),
        cwd=ROOT,
        stdout=open(data / "log.jsonl", "wb"),  # noqa: SIM115 - the process owns it
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
