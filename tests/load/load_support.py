"""The load test's access to the soak workload (benchmarks/soak.py), so CI and `make soak`
run one engine at two sizes. A uniquely named module (tests/load is on sys.path through
its conftest)."""

from __future__ import annotations

import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import soak  # noqa: E402

__all__ = ["soak"]
