"""`python -m proxy report` over a generated log of --gb gigabytes: peak memory and throughput.

python -m bench.report_bench [--gb 1.0]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.testing.logs import lines

ROOT = Path(__file__).resolve().parent.parent


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
            [
                sys.executable,
                "-m",
                "proxy",
                "report",
                str(log),
                "--by",
                "model",
                "--format",
                "json",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        took = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(done.stderr.strip())
        print(
            f"report: {took:.1f} s wall, {written / 1e6 / took:.0f} MB/s, peak RSS {peak_mb:.0f} MB"
        )


if __name__ == "__main__":
    main()
