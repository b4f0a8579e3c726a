"""What a MISS costs the proxy process, in CPU instructions: a figure that does not move with
the machine's load, so two versions can be compared across runs and machines.

    python -m bench.miss_instructions [--requests 200] [--configs bare,memory,sqlite]
    python -m bench.miss_instructions --hit [--configs app,memory,sqlite]
    (--keep: leave callgrind's files, to read with callgrind_annotate)

Each configuration runs under valgrind's callgrind with instrumentation off until it has
answered 100 warm-up requests; then the instructions the process executes (every thread:
the event loop and the store's) are counted over `--requests` more, one at a time over one
keep-alive connection, each a new chat completion (a MISS), plus two seconds for background
work (the store's batch writes, the log flush). Upstream: the bare aiohttp app
(bench.servers bare), not instrumented. `bare` is the bare aiohttp pass-through proxy
(bench.servers bare-proxy); `memory` and `sqlite` are `python -m proxy` on those stores
with its JSON log line on. Needs valgrind (apt-get install valgrind).

With `--hit`, every request is the same chat completion (bench.common.HIT_BODY), so all but
the first warm-up request are HITs, and `app` is the bare aiohttp app (bench.servers bare)
that the HIT benchmark compares with.

Instructions are not time: system calls are not counted, and cache misses cost more than
their count. The requests/s of bench.miss_bench are what users see; this is what to compare
when changing the code.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import HIT_BODY, free_port, process, proxy_argv, wait_port

BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Describe persona %s-%d"}]}'


def ask(port: int, n: int, salt: str, hit: bool = False, warm: bool = False) -> None:
    """`n` new chat completions, one at a time; each must be a 200 that no cache answered.
    `hit`: `n` times the same one, each a HIT (or a bare app's answer; while `warm`, the
    first may be the MISS that stores it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
    expected = ("HIT", "MISS") if hit and warm else ("HIT",) if hit else ("MISS",)
    for i in range(n):
        body = HIT_BODY if hit else BODY % (salt, i)
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        status = resp.getheader("X-Cache-Status")
        if resp.status != 200 or status not in (None, *expected):
            raise SystemExit(f"request {i}: {resp.status} {status}")
    conn.close()


def totals(prefix: Path) -> int:
    """The instructions counted in callgrind's dumps of one process (`prefix`.<pid>[.n])."""
    total = 0
    for dump in prefix.parent.glob(prefix.name + ".*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def measure(config: str, upstream: str, requests: int, work: Path, hit: bool = False) -> float:
    """Instructions per request (thousands) of one configuration."""
    port = free_port()
    if config == "app":
        argv = [sys.executable, "-m", "bench.servers", "bare", "--port", str(port)]
    elif config == "bare":
        argv = [sys.executable, "-m", "bench.servers", "bare-proxy", "--port", str(port)]
        argv += ["--upstream", upstream]
    else:
        flags = ["--cache", "memory://"] if config == "memory" else []
        argv = proxy_argv(upstream, str(work / f"data-{config}"), port, *flags)
    prefix = work / f"callgrind-{config}"
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={prefix}.%p",
            *argv,
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, within_s=120)
        salt = f"{time.time_ns():x}"
        ask(port, 100, salt + "-warm", hit, warm=True)
        time.sleep(1.0)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        ask(port, requests, salt, hit)
        time.sleep(2.0)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True
        )
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while totals(prefix) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # the dump is written when the process runs next
    finally:
        proc.terminate()
        proc.wait(60)
    return totals(prefix) / requests / 1000.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--configs", default="")
    p.add_argument("--hit", action="store_true", help="count HITs instead of MISSes")
    p.add_argument(
        "--keep", action="store_true", help="keep callgrind's files (for callgrind_annotate)"
    )
    args = p.parse_args()
    configs = args.configs or ("app,memory,sqlite" if args.hit else "bare,memory,sqlite")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    work = Path(tempfile.mkdtemp(prefix="ocp-instructions-"))
    up = free_port()
    rows = []
    try:
        with process([sys.executable, "-m", "bench.servers", "bare", "--port", str(up)], up):
            for config in configs.split(","):
                upstream = f"http://127.0.0.1:{up}"
                rows.append((config, measure(config, upstream, args.requests, work, args.hit)))
    finally:
        if args.keep:
            print(f"callgrind files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    base = dict(rows).get("app" if args.hit else "bare")
    what = "HIT" if args.hit else "MISS"
    print(f"instructions per {what}, {args.requests} requests at 1 connection (callgrind)")
    print(f"{'':28s}{'k instr':>9s}{'vs bare':>9s}")
    names = {
        "app": "bare aiohttp app",
        "bare": "bare aiohttp proxy",
        "memory": "proxy, memory store",
        "sqlite": "proxy, SQLite (default)",
    }
    for config, kir in rows:
        ratio = f"{kir / base:9.2f}" if base else ""
        print(f"{names.get(config, config):28s}{kir:9.0f}{ratio}")


if __name__ == "__main__":
    main()
