"""`python -m proxy report`: streaming, gzip, filters, formats, bounded memory (issue 7)."""

from __future__ import annotations

import csv
import gzip
import io
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import orjson

from proxy.testing.logs import lines

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "report", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        check=True,
        timeout=300,
    )


def test_report_plain_gzip_stdin_agree_and_skip_foreign_lines(tmp_path: Path) -> None:
    """Plain, gzipped and piped logs give the same figures; foreign lines are counted, the
    proxy's other events apart."""
    data = (
        b"".join(lines(3000)) + b"not json\n" + b'{"msg": "x"}\n' + b'{"event": "image.rehosted"}\n'
    )
    plain = tmp_path / "a.log"
    plain.write_bytes(data)
    gz = tmp_path / "a.log.gz"
    gz.write_bytes(gzip.compress(data))
    outs = [
        orjson.loads(run(str(plain), "--format", "json").stdout),
        orjson.loads(run(str(gz), "--format", "json").stdout),
        orjson.loads(run("-", "--format", "json", stdin=data).stdout),
    ]
    assert outs[0]["rows"] == outs[1]["rows"] == outs[2]["rows"]
    total = outs[0]["rows"][-1]
    assert total["requests"] == 3000 and outs[0]["throughput"]["skipped"] == 2
    assert outs[0]["throughput"]["other_events"] == 1
    want_saved = sum(
        Decimal(repr(orjson.loads(ln)["saved_usd"]))
        for ln in lines(3000)
        if "saved_usd" in orjson.loads(ln)
    )
    assert total["saved_usd"] == float(want_saved)  # the logged decimals, summed exactly
    assert total["hit_p50_ms"] < 2.1 < 200 < total["miss_p50_ms"]


def test_group_by_and_time_filters(tmp_path: Path) -> None:
    """--by day with --since/--until keeps the lines of that window only; csv works."""
    log = tmp_path / "b.log"
    log.write_bytes(b"".join(lines(2 * 86400 // 60, start_ts=1_767_225_600.0)))  # spans 2 h
    out = orjson.loads(
        run(
            str(log),
            "--by",
            "model",
            "--format",
            "json",
            "--since",
            "2026-01-01T00:30:00",
            "--until",
            "2026-01-01T00:40:00",
        ).stdout
    )
    assert out["rows"][-1]["requests"] == 600
    assert {r["model"] for r in out["rows"]} >= {"gpt-4o-mini", "all"}
    rows = list(
        csv.DictReader(io.StringIO(run(str(log), "--by", "day", "--format", "csv").stdout.decode()))
    )
    assert [r["day"] for r in rows] == ["2026-01-01", "all"]
    table = run(str(log), "--by", "route").stdout.decode()
    assert "/v1/chat/completions" in table and "hit %" in table


def test_table_fits_the_terminal_and_prints_dollars_in_fixed_notation(tmp_path: Path) -> None:
    """At 80 and 100 columns every line fits; dollars never print as 2.9e-05; upstream
    failures are errors and stay out of the MISS latency percentiles."""
    import os

    log = tmp_path / "c.log"
    extra = [
        {
            "event": "request.done",
            "cache": "miss",
            "route": "/v1/x",
            "status": 200,
            "duration_ms": 100.0,
            "cost_usd": 2.9e-05,
            "tokens_in": 1,
            "tokens_out": 1,
        },
        {
            "event": "request.done",
            "cache": "miss",
            "route": "/v1/x",
            "status": 502,
            "duration_ms": 90000.0,
            "error": "upstream_unreachable",
        },
    ]
    log.write_bytes(b"".join(lines(500)) + b"".join(orjson.dumps(e) + b"\n" for e in extra))
    for width in (80, 100):
        out = subprocess.run(
            [sys.executable, "-m", "proxy", "report", str(log)],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=120,
            env={**os.environ, "COLUMNS": str(width)},
        ).stdout.decode()
        assert max(len(line) for line in out.splitlines()) <= width
        assert "e-0" not in out and "0.000029" in out
    rows = orjson.loads(run(str(log), "--by", "route", "--format", "json").stdout)["rows"]
    x = next(r for r in rows if r["route"] == "/v1/x")
    assert x["errors"] == 1 and x["miss_p95_ms"] < 200  # the 90 s failure is not a latency


def test_report_memory_stays_bounded(tmp_path: Path) -> None:
    """A 100 MB log is read in bounded memory (the 1 GB run is bench/report_bench.py)."""
    log = tmp_path / "big.log"
    with log.open("wb") as f:
        size = 0
        for line in lines(10_000_000):
            f.write(line)
            size += len(line)
            if size > 100e6:
                break
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(log), "--by", "tenant", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=300,
    )
    peak_mb = int(done.stderr.decode().strip().splitlines()[-1]) / 1024
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB"
    assert b"MB/s" in done.stderr
    assert orjson.loads(done.stdout)["rows"][-1]["requests"] > 200_000


# Runs the report in this very process and prints its own peak RSS last on stderr: VmHWM in
# KiB, which exec resets (ru_maxrss would carry over the forking parent's peak).
PEAK = (
    "import re, sys; from proxy.__main__ import main; rc = main(['report', *sys.argv[1:]]);"
    " hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1);"
    " print(hwm, file=sys.stderr); sys.exit(rc)"
)
