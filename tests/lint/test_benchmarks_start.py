"""The benchmark scripts still start against the current code.

Benchmarks are scripts, not tests, so nothing else runs them before `make bench`: a renamed
import or a changed constructor breaks them silently (call_chain.py once kept handing the
CallChain a ThreadPoolExecutor after the daemon moved to its own call pool, and failed only
at its first call). Every script must at least import and parse its arguments (`--help`),
and call_chain.py, which needs neither KVM nor a daemon, runs a tiny measurement to its end.
Nothing here looks at a number.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
NOT_SCRIPTS = {"bench_support.py"}  # a module the scripts import
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in NOT_SCRIPTS)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_imports_and_parses_its_arguments(script: str) -> None:
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_call_chain_measures_every_row_with_the_daemons_parts() -> None:
    done = run("call_chain.py", "--calls", "20", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.strip().endswith(" us")]
    assert len(rows) == 8, done.stdout  # 4 chains x (on the loop, in the pool)
    assert any("in the pool: + metrics, auth, budget" in row for row in rows), done.stdout
