"""Run the benchmarks in this directory, one after another: every script (`make bench`), or
with --quick a reduced set in short mode (`make bench-quick`, under 3 minutes here).

Each script measures kvmd against a reference in the same run and prints its own ratios;
this runner only sequences them and reports which failed to run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["pio_exits.py", "run_control.py", "pause_resume.py", "rpc_latency.py",
         "api_load.py", "call_chain.py", "dirty_log.py", "metrics_overhead.py"]
# The reduced set: the figures of issue 12's table, each in its short mode.
QUICK = [["run_control.py", "--quick"], ["pause_resume.py", "--quick"],
         ["rpc_latency.py", "--quick"], ["api_load.py", "--quick"]]
NOT_BENCHMARKS = {"run_all.py", "bench_support.py"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set, short runs")
    args = parser.parse_args()
    if args.quick:
        runs = QUICK
    else:
        names = [n for n in ORDER if (HERE / n).exists()]
        names += sorted(p.name for p in HERE.glob("*.py")
                        if p.name not in ORDER and p.name not in NOT_BENCHMARKS)
        runs = [[n] for n in names]
    failed = []
    started = time.monotonic()
    for name, *extra in runs:
        print(f"\n=== {name} {' '.join(extra)}".rstrip() + " ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *extra],
                          check=False).returncode != 0:
            failed.append(name)
    print(f"\n{len(runs)} benchmarks in {time.monotonic() - started:.0f} s")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
