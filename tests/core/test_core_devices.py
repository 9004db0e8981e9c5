"""Devices, claims and event fan-out as units (no vCPU needed)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kvmd.core.devices import Console, DebugExit, DeviceBus, Uart16550
from kvmd.core.events import Broadcaster
from kvmd.core.histogram import Histogram
from kvmd.core.remote import (
    MAX_CLAIMED_RANGES,
    MAX_RANGES_PER_CLAIM,
    ClaimConflict,
    ClaimRange,
    ClaimTable,
    RemoteExit,
    RemoteHandler,
)
from kvmd.core.state import ConsoleState
from kvmd.kvm import IoSpace

COM1 = 0x3F8
LSR = COM1 + 5


def test_uart_transmits_to_the_console_and_reports_line_status() -> None:
    console = Console(capacity=8)
    uart = Uart16550(console)
    assert uart.read(LSR, 1)[0] & 0x60 == 0x60  # THR empty, transmitter idle
    for ch in b"hello, world":
        uart.write(COM1, bytes([ch]))
    assert console.backlog() == b"o, world"  # bounded: only the last 8 bytes are kept
    assert console.bytes_out == len(b"hello, world")


def test_uart_receives_input_and_honours_dlab() -> None:
    uart = Uart16550(Console(64))
    assert uart.read(LSR, 1)[0] & 1 == 0
    assert uart.feed(b"ab") == 2
    assert uart.read(LSR, 1)[0] & 1 == 1
    assert uart.read(COM1, 1) == b"a"
    assert uart.read(COM1, 1) == b"b"
    assert uart.read(LSR, 1)[0] & 1 == 0
    uart.write(COM1 + 3, b"\x80")  # LCR: DLAB on
    uart.write(COM1, b"\x01")      # divisor latch low, not output
    assert uart.read(COM1, 1) == b"\x01"
    uart.write(COM1 + 3, b"\x03")
    assert uart.console.backlog() == b""


def test_uart_input_is_bounded_and_all_or_nothing() -> None:
    uart = Uart16550(Console(64))
    assert uart.feed(b"x" * 10_000) == 4096  # the room there is; nothing queued
    assert uart.read(LSR, 1)[0] & 1 == 0
    assert uart.feed(b"y" * 4096) == 4096
    assert uart.feed(b"z") == 0


def test_console_subscription_continues_exactly_after_the_backlog() -> None:
    console = Console(64)
    console.output(b"early ")
    backlog, sub = console.subscribe(backlog=True)
    console.output(b"late")
    assert backlog == b"early " and sub.get(1.0) == b"late"
    console.end()
    assert sub.get(1.0) is None and sub.closed


@pytest.mark.parametrize("read", [
    pytest.param(lambda c: c.backlog(), id="backlog"),
    pytest.param(lambda c: c.subscribe(True)[0], id="subscribe"),
    pytest.param(lambda c: c.subscribe_from(0)[0], id="subscribe_from"),
    pytest.param(lambda c: c.save_state().backlog, id="save_state"),
])
def test_every_console_reader_first_takes_what_the_uart_still_holds(read: Any) -> None:
    """Transmitted bytes wait in the UART's ring (C) until drained: a reader that did not
    drain first would miss the guest's last bytes (StreamConsole after a guest's exit)."""
    console = Console(64)
    console.output(b"o")
    ring = [b"k"]
    console.add_source(lambda: console.output(ring.pop()) if ring else None)
    assert read(console) == b"ok"


def test_device_bus_refuses_overlaps() -> None:
    bus = DeviceBus()
    bus.add(Uart16550(Console(8)))
    with pytest.raises(ValueError):
        bus.add(DebugExit(COM1 + 2))
    bus.add(DebugExit(0x501))
    assert bus.find(0x501) is not None and bus.find(0x500) is None
    # A device answers its own ports only: the UART's last port, not the one after it.
    assert bus.find(COM1 + 7) is not None and bus.find(COM1 + 8) is None
    assert DebugExit.code(b"\x2a\x00") == 42


def test_claims_are_all_or_nothing() -> None:
    table = ClaimTable()
    a = RemoteHandler("vm", [ClaimRange(IoSpace.PIO, 0x60, 4)], 100)
    b = RemoteHandler("vm", [ClaimRange(IoSpace.MMIO, 0x1000, 0x10),
                             ClaimRange(IoSpace.PIO, 0x63, 1)], 100)
    assert table.add(a) is None
    assert table.add(b) == ClaimRange(IoSpace.PIO, 0x60, 4)
    assert table.find(IoSpace.MMIO, 0x1000) is None  # nothing of b was added
    assert table.find(IoSpace.PIO, 0x63) is a
    assert table.remove(a) == [ClaimRange(IoSpace.PIO, 0x60, 4)]
    assert table.add(b) is None


def test_remote_handler_deadline_closes_it_and_releases() -> None:
    released = []
    h = RemoteHandler("vm", [ClaimRange(IoSpace.PIO, 0x60, 1)], 50)
    h.on_close = lambda: released.append(True)
    assert h.submit(RemoteExit(0, IoSpace.PIO, 0x60, 1, False, b"")) is None
    assert h.closed and "deadline" in h.close_reason and released == [True]
    assert h.submit(RemoteExit(0, IoSpace.PIO, 0x60, 1, False, b"")) is None  # stays closed


def test_remote_handler_rejects_a_wrong_sized_reply() -> None:
    h = RemoteHandler("vm", [ClaimRange(IoSpace.PIO, 0x60, 1)], 5000)
    assert h.answer(99, b"") is not None  # nothing waits for exit 99

    exit_ = RemoteExit(0, IoSpace.PIO, 0x60, 2, False, b"")
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(h.submit(exit_)))
    t.start()
    sent = h.outbound.get(timeout=5)
    assert sent is exit_
    assert h.answer(exit_.id, b"\x01") is not None  # a 2-byte read needs 2 bytes
    assert h.answer(exit_.id, b"\x01\x02") is None
    t.join(5)
    assert result == [b"\x01\x02"]


def test_broadcaster_drops_oldest_for_a_slow_watcher() -> None:
    b: Broadcaster[int] = Broadcaster(maxsize=3)
    sub = b.subscribe()
    for i in range(5):
        b.publish(i)
    assert [sub.get(0.1) for _ in range(3)] == [2, 3, 4]
    assert sub.dropped == 2


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    buckets, total, count = h.snapshot()
    assert buckets == [(0.1, 1), (1.0, 2), (float("inf"), 3)]
    assert count == 3 and total == pytest.approx(5.55)


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    """Prometheus buckets are "less than or equal": 0.1 s is in le="0.1"."""
    h = Histogram((0.1, 1.0))
    h.observe(0.1)
    h.observe(1.0)
    assert h.snapshot()[0] == [(0.1, 1), (1.0, 2), (float("inf"), 2)]


def test_claim_ranges_meet_without_overlapping() -> None:
    """Ranges overlap when they share one byte, and not when one ends where the next
    begins."""
    first = ClaimRange(IoSpace.PIO, 0x100, 4)
    assert first.overlaps(ClaimRange(IoSpace.PIO, 0x103, 1))
    assert ClaimRange(IoSpace.PIO, 0x103, 1).overlaps(first)
    assert not first.overlaps(ClaimRange(IoSpace.PIO, 0x104, 1))
    assert not first.overlaps(ClaimRange(IoSpace.MMIO, 0x100, 4))  # another space


def test_a_vm_holds_at_most_max_claimed_ranges() -> None:
    """Exactly MAX_CLAIMED_RANGES in all, in several claims; then not one more."""
    table = ClaimTable()
    ranges = [ClaimRange(IoSpace.MMIO, 0x1000 * i, 1) for i in range(MAX_CLAIMED_RANGES)]
    for i in range(0, MAX_CLAIMED_RANGES, MAX_RANGES_PER_CLAIM):  # claims of the most each
        assert table.add(RemoteHandler("vm", ranges[i:i + MAX_RANGES_PER_CLAIM], 100)) is None
    with pytest.raises(ClaimConflict, match="more than"):
        table.add(RemoteHandler("vm", [ClaimRange(IoSpace.PIO, 0x60, 1)], 100))


def test_a_device_added_right_below_another_is_accepted() -> None:
    """Devices whose port ranges meet (one ends where the other begins) do not overlap, in
    either order of adding; a range found overlapping is one sharing a port."""
    bus = DeviceBus()
    bus.add(Uart16550(Console(8)))  # ports COM1..COM1+7
    bus.add(DebugExit(COM1 - 1))  # ends where the UART begins
    bus.add(DebugExit(COM1 + 8))  # begins where the UART ends
    assert bus.overlapping(COM1 + 9, 4) is None  # starts right after the last device
    assert bus.overlapping(COM1 - 5, 4) is None  # ends right before the first
    uart = bus.overlapping(COM1 + 7, 1)
    assert uart is not None and uart.name == "uart16550"


def test_reads_of_the_uart_and_the_debug_exit_port_pad_with_ones() -> None:
    """A wider read than a port has (a 16-bit IN from an 8-bit register) reads the
    register and 0xff for the bytes beyond it, as an open ISA bus does; the write-only
    debug-exit port reads as all ones."""
    uart = Uart16550(Console(8))
    assert uart.read(LSR, 2) == bytes([uart.read(LSR, 1)[0], 0xFF])
    assert uart.read(LSR, 4)[1:] == b"\xff\xff\xff"
    assert DebugExit().read(0x501, 1) == b"\xff" and DebugExit().read(0x501, 2) == b"\xff\xff"


def printed(capacity: int, data: bytes) -> Console:
    console = Console(capacity)
    console.output(data)
    return console


def test_reading_from_the_end_of_the_output_gives_nothing_old() -> None:
    """subscribe_from(bytes_out), a reader resuming right where it stopped: no backlog,
    offset bytes_out, and the subscription continues with what comes next."""
    console = printed(16, b"0123456789")
    backlog, offset, sub = console.subscribe_from(10)
    assert (backlog, offset) == (b"", 10)
    console.output(b"ab")
    assert sub.get(0) == b"ab"


def test_an_offset_past_the_output_gives_the_whole_backlog() -> None:
    """An offset beyond everything printed (a reader of another life of the VM) is clamped
    to the start of the backlog: it gets every byte the console still holds."""
    console = printed(16, b"0123456789")
    backlog, offset, _sub = console.subscribe_from(1000)
    assert (backlog, offset) == (b"0123456789", 0)


def test_an_offset_older_than_the_backlog_starts_at_its_oldest_byte() -> None:
    """An offset the backlog no longer holds (dropped by its bound) starts at the oldest
    byte kept, and says so in the offset."""
    console = printed(10, b"abcdefghijklmnopqrstuvwxy")  # 25 bytes, the last 10 kept
    backlog, offset, _sub = console.subscribe_from(3)
    assert (backlog, offset) == (b"pqrstuvwxy", 15)
    backlog, offset, _sub = console.subscribe_from(20)
    assert (backlog, offset) == (b"uvwxy", 20)


def test_a_restored_console_keeps_its_newest_bytes_and_both_counts() -> None:
    """restore_state of a backlog larger than this console's capacity keeps its newest
    bytes; bytes_out and bytes_in come back as saved (offsets and metrics go on)."""
    console = Console(capacity=4)
    console.restore_state(ConsoleState(b"abcdefgh", bytes_out=100, bytes_in=7))
    assert console.backlog() == b"efgh"
    assert (console.bytes_out, console.bytes_in) == (100, 7)
    assert console.subscribe_from(0)[:2] == (b"efgh", 96)
