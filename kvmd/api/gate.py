"""The API gate a daemon hand-over closes (kvmd.handover): while it is closed, every new
call fails at once with UNAVAILABLE and trailing metadata `kvmd-retry: handover` (the call
did nothing, so a client may retry any call, idempotent or not); it counts the calls in
flight, by method, so the hand-over can wait for them before it pauses and saves the VMs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from kvmd.core.errors import Unavailable

RETRY_HANDOVER = "handover"  # the value of kvmd.api.errors.RETRY_KEY for a gate refusal
# Streams that live as long as a client wants: a hand-over ends them (clients re-open).
LONG_LIVED = frozenset({
    "/kvmd.v1.Vms/WatchVm", "/kvmd.v1.Vms/StreamConsole", "/kvmd.v1.ExitHandlers/HandleExits",
    "/kvmd.v1.IoEvents/WatchIoevents", "/kvmd.v1.Interrupts/WatchIrqfdResamples",
    "/grpc.health.v1.Health/Watch",
})


class HandingOver(Unavailable):
    """Refused at the gate: the call did nothing, so any call may be retried (the status
    carries trailing metadata `kvmd-retry: handover`)."""

    retry = RETRY_HANDOVER


class Gate:
    """The first stage of every call (kvmd.api.interceptors.CallChain): admits calls while
    open and counts those in flight; closed by a hand-over."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight: Counter[str] = Counter()

    def applies(self, method: str, kind: str) -> bool:
        return True

    def enter(self, method: str, kind: str, request: Any, context: Any) -> str:
        with self._cond:
            if self._closed:
                raise HandingOver("the daemon is handing over to a new process; retry")
            self._in_flight[method] += 1
        return method

    def leave(self, method: str) -> None:
        with self._cond:
            self._in_flight[method] -= 1
            if not self._in_flight[method]:
                del self._in_flight[method]
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def open(self) -> None:
        with self._cond:
            self._closed = False

    def wait_idle(self, timeout: float, long_lived: bool = True) -> dict[str, int]:
        """Wait until no call is in flight (with `long_lived` False: none but the
        long-lived streams); returns what is still in flight after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                busy = {m: n for m, n in self._in_flight.items()
                        if long_lived or m not in LONG_LIVED}
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    return busy
                self._cond.wait(left)
