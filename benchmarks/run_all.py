"""Run every benchmark in this directory, one after another (`make bench`).

Each script measures kvmd against a reference in the same run and prints its own ratios;
this runner only sequences them and reports which failed to run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["pio_exits.py", "run_control.py", "rpc_latency.py", "dirty_log.py",
         "metrics_overhead.py"]


def main() -> int:
    scripts = [HERE / name for name in ORDER if (HERE / name).exists()]
    scripts += sorted(p for p in HERE.glob("*.py") if p.name not in ORDER
                      and p.name != Path(__file__).name)
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.run([sys.executable, str(script)], check=False).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
