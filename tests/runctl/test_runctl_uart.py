"""The COM1 UART completed in C by the vCPU run loop: output reaches the console in full and
in order whatever its rate, the receive FIFO is bounded (a loopback flood cannot grow the
daemon), and console_buffer_bytes has a ceiling."""

from __future__ import annotations

import struct

from guests import DATA_ADDR, UART_PORT, mov_al, mov_dx
from guests_runctl import UART_LSR, Asm, debug_exit
from polling import wait_until
from runctl_api import WAIT, Api, Code
from test_runctl_console import ConsoleReader

from kvmd.core.devices import CONSOLE_INPUT_LIMIT, MAX_CONSOLE_BUFFER, UART_TX_RING

PAGE = 4096
PATTERN = bytes(range(256)) * (PAGE // 256)


def flood_program(pages: int) -> bytes:
    """`rep outsb` of the PAGE bytes at DATA_ADDR to COM1, `pages` times, then debug-exit
    0x33. DS = 0."""
    a = Asm()
    a([0x31, 0xC0], [0x8E, 0xD8])                               # xor ax, ax; mov ds, ax
    a([0xBB], struct.pack("<H", pages))                         # mov bx, pages
    a(mov_dx(UART_PORT))                                        # mov dx, 0x3f8
    a.label("again")
    a([0xBE], struct.pack("<H", DATA_ADDR))                     # mov si, DATA_ADDR
    a([0xB9], struct.pack("<H", PAGE))                          # mov cx, PAGE
    a([0xF3, 0x6E])                                             # rep outsb
    a([0x4B])                                                   # dec bx
    a.jnz("again")                                              # jnz again
    a(debug_exit(0x33))
    return a.bytes()


def loopback_flood_program(count: int) -> bytes:
    """MCR = LOOP|OUT2, `count` bytes written to THR (each loops back into the receive
    FIFO), then debug-exit with the LSR read once (DR, OE, THRE, TEMT expected)."""
    a = Asm()
    a(mov_dx(UART_PORT + 4), mov_al(0x18), [0xEE])              # mov dx, MCR; mov al, 0x18; out
    a(mov_dx(UART_PORT), mov_al(0x41))                          # mov dx, THR; mov al, 'A'
    a([0xB9], struct.pack("<H", count))                         # mov cx, count
    a.label("again")
    a([0xEE])                                                   # out dx, al
    a.loop("again")                                             # loop again
    a(mov_dx(UART_LSR), [0xEC])                                 # mov dx, LSR; in al, dx
    a(mov_dx(0x501), [0xEE])                                    # debug-exit with al
    return a.bytes()


def test_a_flood_of_output_reaches_the_console_complete_and_in_order(api: Api) -> None:
    """More output than the transmit ring holds, with the console stalled until the ring is
    full: the run loop hands the exit that does not fit to Python, which waits for room,
    and every byte still reaches the console once, in order. (A string OUT exits once per
    byte here, and the pump drains every CONSOLE_BATCH_SECONDS, so without the stall the
    ring would never fill.)"""
    pages = UART_TX_RING // PAGE + 4  # the ring, and 16 KiB that must wait for room
    total = pages * PAGE
    api.boot("flood", {0x1000: flood_program(pages), DATA_ADDR: PATTERN},
             console_buffer_bytes=total)
    vm = api.daemon.host.get_vm("flood")  # type: ignore[union-attr]
    live = ConsoleReader(api, "flood", backlog=True)
    wait_until(lambda: vm.console._live.subscriber_count == 1, WAIT, "the live reader")
    watch = api.watch("flood")
    uart = vm.uart
    with uart._drain_lock:  # no drain (by the pump or anyone) until the ring has filled
        api.start("flood")
        wait_until(lambda: uart.regs.stats().ring_full >= 1, 3 * WAIT,
                   f"a full transmit ring ({uart.regs.stats()})")
    assert watch.wait_for("debug_exit", timeout=3 * WAIT).exit_code == 0x33
    expected = PATTERN * pages
    wait_until(lambda: len(live.text()) >= total, WAIT,
               f"{total} bytes on the live stream (have {len(live.text())})")
    assert live.text() == expected  # live: nothing lost, in order
    late = ConsoleReader(api, "flood", backlog=True)
    wait_until(lambda: len(late.text()) >= total, WAIT, "the whole backlog")
    assert late.text() == expected  # the backlog too
    stats = uart.regs.stats()
    assert stats.tx_bytes == total and stats.tx_pending == 0 and stats.ring_full >= 1
    assert vm.console.bytes_out == total
    # Each string OUT exited and was counted: once per byte here (as KVM emulates a string
    # OUT on these hosts), at least once per page anywhere; and the debug exit.
    assert pages + 1 <= vm.exit_stats()[0]["io_out"] <= total + 1
    live.cancel()
    late.cancel()
    api.delete("flood")


def test_loopback_flood_is_bounded_and_counted(api: Api) -> None:
    count = 3 * CONSOLE_INPUT_LIMIT
    api.boot("loop", loopback_flood_program(count))
    watch = api.watch("loop")
    api.start("loop")
    lsr = watch.wait_for("debug_exit").exit_code
    assert lsr == 0x63, hex(lsr)  # data ready, overrun, transmitter empty and idle
    vm = api.daemon.host.get_vm("loop")  # type: ignore[union-attr]
    stats = vm.uart.regs.stats()
    assert stats.rx_pending == CONSOLE_INPUT_LIMIT  # the FIFO, and not a byte more
    assert stats.rx_overruns == count - CONSOLE_INPUT_LIMIT
    assert vm.uart.rx_overruns == count - CONSOLE_INPUT_LIMIT
    assert vm.console.backlog() == b""  # looped back, never transmitted
    api.delete("loop")


def test_console_buffer_bytes_has_a_ceiling(api: Api) -> None:
    api.assert_code(lambda: api.create_vm("huge", console_buffer_bytes=MAX_CONSOLE_BUFFER + 1),
                    Code.INVALID_ARGUMENT)
    api.assert_code(lambda: api.create_vm("huge", console_buffer_bytes=(4 << 30) - 1),
                    Code.INVALID_ARGUMENT)
    api.create_vm("largest", console_buffer_bytes=MAX_CONSOLE_BUFFER)
    assert api.get_vm("largest").options.console_buffer_bytes == MAX_CONSOLE_BUFFER
    api.delete("largest")


def test_output_printed_before_a_stop_is_in_the_backlog_at_once(api: Api) -> None:
    """Bytes still in the UART's ring when a reader asks are drained first: a reader that
    comes after the guest stopped sees all of them without waiting for the fd watcher."""
    text = b"last words\r\n"
    a = Asm()
    a(mov_dx(UART_PORT))
    for b in text:
        a(mov_al(b), [0xEE])
    a(debug_exit(7))
    api.boot("last", a.bytes())
    watch = api.watch("last")
    api.start("last")
    assert watch.wait_for("debug_exit").exit_code == 7
    vm = api.daemon.host.get_vm("last")  # type: ignore[union-attr]
    assert vm.console.backlog() == text
    wait_until(lambda: vm.uart.regs.stats().tx_pending == 0, WAIT, "the ring to be empty")
    api.delete("last")


def test_deleting_a_vm_frees_its_uart(api: Api) -> None:
    """The UART's C state (ring and FIFO) goes with the VM: nothing of a flooded console
    outlives DeleteVm."""
    import gc
    import weakref

    api.boot("gone", loopback_flood_program(2 * CONSOLE_INPUT_LIMIT))
    watch = api.watch("gone")
    api.start("gone")
    watch.wait_for("debug_exit")
    vm = api.daemon.host.get_vm("gone")  # type: ignore[union-attr]
    regs = weakref.ref(vm.uart.regs)
    console = weakref.ref(vm.console)
    del vm
    api.delete("gone")
    watch.cancel()
    wait_until(lambda: (gc.collect() is not None and regs() is None
                        and console() is None), WAIT, "the UART and console to be freed")
