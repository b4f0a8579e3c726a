"""`python -m proxy report` over a generated log of --gb gigabytes: peak memory and throughput.

python -m bench.report_bench [--gb 1.0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.testing.logs import lines

ROOT = Path(__file__).resolve().parent.parent
# Runs the report in this very process and prints its own peak RSS last on stderr: VmHWM in
# KiB, which exec resets (ru_maxrss would carry over the forking parent's peak).
PEAK = (
    "import re, sys; from proxy.__main__ import main; rc = main(['report', *sys.argv[1:]]);"
    " hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1);"
    " print(hwm, file=sys.stderr); sys.exit(rc)"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=1.0)
    args = p.parse_args()
    target = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "proxy.log"
        t0 = time.perf_counter()
        written = n = 0
        with log.open("wb") as f:
            for line in lines(50_000_000):
                f.write(line)
                written += len(line)
                n += 1
                if written >= target:
                    break
        print(f"generated {written / 1e9:.2f} GB, {n} lines in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(log), "--by", "model", "--format", "json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        took = time.perf_counter() - t0
        *said, peak = done.stderr.strip().splitlines()
        peak_mb = int(peak) / 1024
        print("\n".join(said))
        print(
            f"report: {took:.1f} s wall, {written / 1e6 / took:.0f} MB/s, peak RSS {peak_mb:.0f} MB"
        )


if __name__ == "__main__":
    main()
