"""Polling with a bound, shared by the test layers (a uniquely named module)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy and return that; fail naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def drained(take: Callable[[float], T | None], quiet: float = 0.1) -> list[T]:
    """Everything `take(timeout)` (a mailbox's `get`) gives until it gives None: nothing
    more came within `quiet` seconds."""
    out = []
    while (item := take(quiet)) is not None:
        out.append(item)
    return out
