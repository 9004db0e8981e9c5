"""The UART whose registers live in C (kvmd.kvm.UartRegs) as the core's device sees it: the
transmit ring and its drain into the console, the bounded receive FIFO, save/restore, and
byte-bounded console subscribers. No vCPU needed."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest
from polling import wait_until

from kvmd.core.devices import (
    CONSOLE_INPUT_LIMIT,
    MIN_SUBSCRIBER_BYTES,
    UART_TX_RING,
    Console,
    ConsolePump,
    Uart16550,
)
from kvmd.core.events import Broadcaster
from kvmd.core.state import UartState
from kvmd.kvm import EventFd, UartRegs

COM1 = 0x3F8
THR, IER, IIR, LCR, MCR, LSR = COM1, COM1 + 1, COM1 + 2, COM1 + 3, COM1 + 4, COM1 + 5


def test_a_full_transmit_ring_is_drained_in_order_never_lost() -> None:
    console = Console(capacity=2 * UART_TX_RING)
    uart = Uart16550(console)
    data = os.urandom(UART_TX_RING + 100)
    for i, b in enumerate(data[:UART_TX_RING]):
        assert uart.regs.write(0, b), i  # fills the ring exactly
    assert not uart.regs.write(0, data[UART_TX_RING])  # full: nothing done
    for b in data[UART_TX_RING:]:
        uart.write(THR, bytes([b]))  # the Python path drains, then transmits
    assert console.backlog() == data  # a reader drains the rest first
    assert console.bytes_out == len(data)
    assert uart.regs.stats().tx_bytes == len(data)


def test_the_notify_fd_fires_when_the_ring_gets_bytes() -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        uart = Uart16550(Console(64), notify_fd=w)
        uart.write(THR, b"a")
        assert len(os.read(r, 64)) == 8  # one eventfd-sized write: the ring was empty
        uart.write(THR, b"b")
        try:
            os.read(r, 64)
            raise AssertionError("notified again while the ring had bytes")
        except BlockingIOError:
            pass
        assert uart.drain() == 2 and uart.console.backlog() == b"ab"
    finally:
        os.close(r)
        os.close(w)


def test_loopback_input_is_bounded_and_overruns_are_counted() -> None:
    uart = Uart16550(Console(64))
    uart.write(MCR, b"\x10")  # loopback
    for _ in range(CONSOLE_INPUT_LIMIT + 10):
        uart.write(THR, b"x")
    assert uart.rx_overruns == 10
    assert uart.read(LSR, 1)[0] & 0x03 == 0x03  # data ready, overrun
    assert uart.read(LSR, 1)[0] & 0x02 == 0  # OE clears once read
    assert uart.feed(b"y") == 0  # the FIFO is full: nothing queued
    uart.write(MCR, b"\x08")
    assert uart.console.backlog() == b""  # nothing was transmitted


def test_arming_says_when_bytes_already_wait_unsignalled() -> None:
    # A byte sent while disarmed (the pump between its drain and its arm) signals nothing:
    # arm() must say it waits, or it sits in the ring until the guest prints again.
    regs = UartRegs(COM1, tx_bytes=16, rx_bytes=16)
    assert regs.write(0, ord("A"))  # the first byte signals, and disarms
    assert regs.write(0, ord("B"))  # sent while disarmed
    assert regs.arm() is True
    assert regs.take_output() == b"AB"
    assert regs.arm() is False


def test_the_transmitter_interrupt_is_acknowledged_by_reading_iir() -> None:
    uart = Uart16550(Console(64))
    uart.write(IER, b"\x02")  # THR-empty interrupt on: pending at once
    assert uart.read(IIR, 1) == b"\xc2"  # FIFOs, THR empty
    assert uart.read(IIR, 1) == b"\xc1"  # acknowledged: no interrupt
    assert uart.save_state().thre_pending is False
    uart.write(THR, b"x")  # the next byte sent empties the THR again
    assert uart.read(IIR, 1) == b"\xc2"
    uart.write(IER, b"\x03")  # received data too: it outranks THR empty
    assert uart.feed(b"z") == 1
    assert uart.read(IIR, 1) == b"\xc4"
    assert uart.read(IIR, 1) == b"\xc4"  # until the byte is read
    assert uart.read(THR, 1) == b"z"
    assert uart.read(IIR, 1) == b"\xc2"


def test_the_receive_fifo_keeps_its_order_across_many_wraps() -> None:
    regs = UartRegs(COM1, tx_bytes=16, rx_bytes=4)
    for chunk in (b"abcd", b"efgh", b"ijkl", b"mn", b"opqr"):
        assert regs.feed(chunk)[0] == len(chunk)
        assert bytes([regs.read(0)]) == chunk[:1]
        assert regs.get_state().rx == chunk[1:]  # what save_state would carry
        assert bytes(regs.read(0) for _ in chunk[1:]) == chunk[1:]


def test_a_restore_clears_an_overrun_latched_before_it() -> None:
    uart = Uart16550(Console(64))
    uart.write(MCR, b"\x10")  # loopback
    for _ in range(CONSOLE_INPUT_LIMIT + 1):
        uart.write(THR, b"x")  # one more than the FIFO holds: an overrun, LSR not read
    uart.restore_state(UartState())
    assert uart.read(LSR, 1)[0] & 0x03 == 0  # no data, no overrun: the state has none


def test_input_raises_the_interrupt_only_when_the_guest_enabled_it() -> None:
    raised: list[int] = []
    uart = Uart16550(Console(64), raise_irq=lambda: raised.append(1))
    assert uart.feed(b"a") == 1
    assert raised == []  # a polling guest (IER bit 0 clear) gets no interrupt
    uart.write(IER, b"\x01")
    assert uart.feed(b"b") == 1
    assert raised == [1]


def test_save_drains_the_ring_and_restore_puts_registers_and_fifo_back() -> None:
    console = Console(64)
    uart = Uart16550(console)
    uart.write(IER, b"\x01")
    uart.write(LCR, b"\x03")
    uart.write(COM1 + 7, b"\x5a")  # scratch
    uart.regs.write(0, ord("!"))  # in the ring, not drained yet
    assert uart.feed(b"input") == 5
    state = uart.save_state()
    assert console.backlog() == b"!"  # drained into the console first
    assert (state.ier, state.scr, state.rx) == (1, 0x5A, b"input")
    again = Uart16550(Console(64))
    again.restore_state(state)
    assert again.save_state() == state
    assert again.read(COM1, 1) == b"i"
    # A FIFO saved larger than this UART's keeps its newest bytes.
    big = UartState(rx=bytes(i % 251 for i in range(5000)))  # no period of 4096 bytes
    again.restore_state(big)
    assert again.save_state().rx == big.rx[-CONSOLE_INPUT_LIMIT:]


def test_console_subscribers_are_bounded_in_bytes() -> None:
    console = Console(capacity=16)
    _backlog, sub = console.subscribe(backlog=False)
    for _ in range(3):
        console.output(b"x" * MIN_SUBSCRIBER_BYTES)
    items = []
    while (item := sub.get(0)) is not None:
        items.append(item)
    assert sum(map(len, items)) <= MIN_SUBSCRIBER_BYTES  # the newest fit, no more
    assert sub.dropped_bytes == 2 * MIN_SUBSCRIBER_BYTES


def test_small_pieces_coalesce_so_the_item_count_stays_bounded() -> None:
    b: Broadcaster[bytes] = Broadcaster(maxsize=8, max_bytes=1 << 20)
    sub = b.subscribe()
    for i in range(10_000):
        b.publish(bytes([i & 0xFF]))
    got = b"".join(sub.drain())
    assert got == bytes(i & 0xFF for i in range(10_000))  # nothing dropped, in order
    assert sub.dropped == 0


# -- the console pump ------------------------------------------------------------------------

WAIT = 10.0


class Pumped:
    """A UART with its own console and notify eventfd, for a ConsolePump."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(64)
        self.event = EventFd()
        self.uart = Uart16550(self.console, notify_fd=self.event.fileno())

    def close(self) -> None:
        self.event.close()


@pytest.fixture
def pump() -> Iterator[ConsolePump]:
    p = ConsolePump()
    yield p
    p.close()


def test_bytes_written_between_a_batchs_drain_and_its_rearm_get_another_round(
        pump: ConsolePump) -> None:
    """The guest prints right after the pump's batch drain, before the pump re-arms the
    UART (so those bytes signalled nothing): the pump drains again, they reach the console
    with no reader asking."""
    a = Pumped()
    drain = a.uart.drain
    calls = 0

    def drain_then_the_guest_prints() -> int:
        nonlocal calls
        n = drain()
        calls += 1
        if calls == 2:  # the batch's drain: one more byte lands before the re-arm
            assert a.uart.regs.write(0, ord("!"))
        return n

    a.uart.drain = drain_then_the_guest_prints  # type: ignore[method-assign]
    pump.add(a.event, a.uart)
    try:
        assert a.uart.regs.write(0, ord("a"))  # the first byte after arming: a signal
        wait_until(lambda: a.console.bytes_out == 2, WAIT, "both bytes in the console")
    finally:
        pump.remove(a.event)
        a.close()


def test_a_uart_removed_during_its_batch_leaves_the_pump_running(pump: ConsolePump) -> None:
    """A UART removed while the pump still meant to drain it once more (a VM deleted just
    after it printed): the pump goes on pumping the other UARTs past that moment."""
    pump.interval = 0.2
    a, b = Pumped(), Pumped()
    pump.add(a.event, a.uart)
    pump.add(b.event, b.uart)
    try:
        assert a.uart.regs.write(0, ord("a"))
        wait_until(lambda: a.console.bytes_out == 1, WAIT, "a's byte", interval=0.001)
        pump.remove(a.event)  # a's batch round is due 0.2 s after its drain
        removed = time.monotonic()
        sent = 0
        while time.monotonic() < removed + 2 * pump.interval:
            sent += 1
            assert b.uart.regs.write(0, ord("b"))
            wait_until(lambda n=sent: b.console.bytes_out == n, WAIT, "b's byte to be pumped")
    finally:
        pump.remove(b.event)
        a.close()
        b.close()


class BrokenConsole(Console):
    def output(self, data: bytes) -> None:
        raise RuntimeError("a console bug")


def test_a_console_that_fails_does_not_stop_the_others(
        pump: ConsolePump, caplog: pytest.LogCaptureFixture) -> None:
    """A drain that raises (a bug in one VM's console) is logged; the pump goes on with the
    other UARTs."""
    a, b = Pumped(BrokenConsole(64)), Pumped()
    pump.add(a.event, a.uart)
    pump.add(b.event, b.uart)
    try:
        with caplog.at_level(logging.ERROR, logger="kvmd.core.devices"):
            assert a.uart.regs.write(0, ord("a"))
            wait_until(lambda: any("console drain failed" in r.getMessage()
                                   for r in caplog.records), WAIT, "a's drain to fail")
        assert b.uart.regs.write(0, ord("b"))
        wait_until(lambda: b.console.bytes_out == 1, WAIT, "b's byte to be pumped")
    finally:
        pump.remove(a.event)
        pump.remove(b.event)
        a.close()
        b.close()
