"""A remote exit handler's bookkeeping as a unit: which replies it takes (each exit once;
a late reply to an abandoned exit once, quietly), why it ended (the first cause), and
which addresses its claims cover (up to, not including, their end)."""

from __future__ import annotations

import threading

import pytest

from kvmd.core.remote import (
    ClaimConflict,
    ClaimRange,
    ClaimTable,
    HandlerClose,
    RemoteExit,
    RemoteHandler,
)
from kvmd.kvm import IoSpace

LONG_MS = 60_000  # longer than any wait here: only the event under test ends a wait
WAIT = 10.0


def handler(deadline_ms: int = LONG_MS) -> RemoteHandler:
    return RemoteHandler("vm", [ClaimRange(IoSpace.PIO, 0x60, 4)], deadline_ms)


def submitted(h: RemoteHandler, exit_: RemoteExit) -> tuple[threading.Thread, list[bytes | None]]:
    """Submit `exit_` from a thread, as a vCPU does; returns once the handler sent it."""
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(h.submit(exit_)), daemon=True)
    t.start()
    assert h.outbound.get(timeout=WAIT) is exit_
    return t, result


def test_an_answered_exit_takes_no_second_reply() -> None:
    h = handler()
    exit_ = RemoteExit(0, IoSpace.PIO, 0x60, 1, False, b"")
    t, result = submitted(h, exit_)
    assert h.answer(exit_.id, b"\x01") is None
    t.join(WAIT)
    assert result == [b"\x01"]
    assert h.answer(exit_.id, b"\x02") is not None  # nothing waits for it any more
    assert exit_.reply == b"\x01"


def test_a_late_reply_to_an_abandoned_exit_is_ignored_once() -> None:
    h = handler()
    exit_ = RemoteExit(0, IoSpace.PIO, 0x61, 1, False, b"")
    t, result = submitted(h, exit_)
    h.abandon(exit_)  # its vCPU is being stopped
    t.join(WAIT)
    assert result == [None] and exit_.abandoned and not h.closed
    assert h.answer(exit_.id, b"\x01") is None  # the late reply: no protocol error
    assert h.answer(exit_.id, b"\x01") is not None  # a second one is
    assert exit_.reply is None


def test_a_closed_handler_takes_no_exit_and_never_makes_a_vcpu_wait() -> None:
    h = handler()
    h.close(HandlerClose.CLIENT_CLOSED)
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(
        h.submit(RemoteExit(0, IoSpace.PIO, 0x60, 1, False, b""))), daemon=True)
    t.start()
    t.join(WAIT)  # far less than the handler's 60 s deadline
    assert not t.is_alive() and result == [None]


def test_the_first_failure_names_why_a_handler_ended() -> None:
    h = handler()
    released: list[bool] = []
    h.on_close = lambda: released.append(True)
    h.fail(HandlerClose.BAD_REPLY, "exit 7 reads 1 bytes; the reply has 2")
    h.fail(HandlerClose.CLIENT_GONE)
    assert h.close_cause is HandlerClose.BAD_REPLY
    h.close(HandlerClose.STREAM_ENDED)  # the stream's server side then releases it
    h.close(HandlerClose.VM_DELETED)
    assert h.close_cause is HandlerClose.BAD_REPLY
    assert h.close_reason == "exit 7 reads 1 bytes; the reply has 2"
    assert h.closed and released == [True]  # its claims were released once


def test_a_close_without_an_earlier_failure_records_its_own_cause() -> None:
    h = handler()
    h.close(HandlerClose.CLIENT_CLOSED)
    h.close(HandlerClose.VM_DELETED)
    assert h.close_cause is HandlerClose.CLIENT_CLOSED
    assert h.close_reason == HandlerClose.CLIENT_CLOSED.value


def test_a_claim_covers_up_to_not_including_its_end() -> None:
    table = ClaimTable()
    h = handler()
    mmio = RemoteHandler("vm", [ClaimRange(IoSpace.MMIO, 0x1000, 0x10)], LONG_MS)
    assert table.add(h) is None and table.add(mmio) is None
    assert table.find(IoSpace.PIO, 0x5F) is None
    assert table.find(IoSpace.PIO, 0x60) is h and table.find(IoSpace.PIO, 0x63) is h
    assert table.find(IoSpace.PIO, 0x64) is None
    assert table.find(IoSpace.MMIO, 0x100F) is mmio
    assert table.find(IoSpace.MMIO, 0x1010) is None
    assert table.find(IoSpace.MMIO, 0x60) is None  # another space


def test_ranges_of_one_claim_overlapping_across_other_space_ranges_are_refused() -> None:
    """The self-overlap check orders ranges per space: an MMIO range whose base lies
    between two overlapping port ranges does not hide their overlap."""
    ranges = [ClaimRange(IoSpace.PIO, 0x300, 8), ClaimRange(IoSpace.MMIO, 0x302, 1),
              ClaimRange(IoSpace.PIO, 0x304, 1)]
    with pytest.raises(ClaimConflict, match="overlap each other"):
        ClaimTable.check_disjoint(ranges)
    table = ClaimTable()
    with pytest.raises(ClaimConflict):
        table.add(RemoteHandler("vm", ranges, LONG_MS))
    assert table.find(IoSpace.PIO, 0x304) is None  # nothing was claimed


def test_adjacent_ranges_do_not_overlap_either_way_round() -> None:
    first, after = ClaimRange(IoSpace.PIO, 0x100, 4), ClaimRange(IoSpace.PIO, 0x104, 1)
    assert not first.overlaps(after) and not after.overlaps(first)
    before = ClaimRange(IoSpace.PIO, 0xFF, 1)
    assert not first.overlaps(before) and not before.overlaps(first)
