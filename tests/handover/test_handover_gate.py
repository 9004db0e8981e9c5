"""The API gate a hand-over closes (kvmd.api.gate), on its own: what it refuses, and the
calls it says are still in flight."""

from __future__ import annotations

import threading
import time

import pytest

from kvmd.api.gate import Gate, HandingOver

UNARY = "/kvmd.v1.Memory/WriteGuestMemory"
WATCH = "/kvmd.v1.Vms/WatchVm"  # long-lived: the hand-over ends it rather than wait


def test_waiting_for_calls_counts_every_call_but_long_lived_streams() -> None:
    gate = Gate()
    gate.enter(UNARY, "stream_unary", None, None)
    gate.enter(WATCH, "unary_stream", None, None)
    started = time.monotonic()
    assert gate.wait_idle(0.2, long_lived=False) == {UNARY: 1}  # a write still runs
    assert time.monotonic() - started >= 0.19  # it waited for it
    assert gate.wait_idle(0, long_lived=True) == {UNARY: 1, WATCH: 1}
    threading.Timer(0.1, gate.leave, (UNARY,)).start()
    started = time.monotonic()
    assert gate.wait_idle(60, long_lived=False) == {}
    assert time.monotonic() - started < 30  # woken when the write ends, not at the timeout
    gate.leave(WATCH)
    assert gate.wait_idle(0) == {}


def test_a_closed_gate_refuses_new_calls_until_opened() -> None:
    gate = Gate()
    gate.enter(UNARY, "stream_unary", None, None)
    gate.close()
    with pytest.raises(HandingOver):
        gate.enter(UNARY, "stream_unary", None, None)
    gate.leave(UNARY)  # a call admitted before goes on and ends
    gate.open()
    gate.leave(gate.enter(UNARY, "stream_unary", None, None))
    assert gate.wait_idle(0) == {}
