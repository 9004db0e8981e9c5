"""Running the calling thread on chosen CPUs for a while, shared by the test layers (a
uniquely named module)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """The calling thread on `cpu` only, for the block."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
