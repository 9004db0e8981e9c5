"""UartRegs: a 16550 UART's registers, transmit ring and receive FIFO, kept in C (c/uart.c)
so the run loop completes the guest's port IO to it without Python (see
`PioMap.attach_uart` and `Vcpu.run_until_unhandled`).

The binding knows nothing of consoles: the core's device (kvmd.core.devices.Uart16550)
drains the transmitted bytes into the VM's console and feeds input. Every method is safe
from any thread (the C side has its own mutex) and never blocks on the guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmd.kvm._ffi import ffi, lib, new_uncleared
from kvmd.kvm.errors import KvmError, invalid

REGISTERS = 8  # ports from the base: RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR


@dataclass(frozen=True)
class UartRegsState:
    """The registers software can see, and the receive FIFO (oldest byte first)."""

    ier: int = 0
    lcr: int = 0x03
    mcr: int = 0x08
    scr: int = 0
    dll: int = 0x0C
    dlm: int = 0
    thre_pending: bool = False
    rx: bytes = b""


@dataclass(frozen=True)
class UartStats:
    tx_bytes: int  # bytes the guest transmitted
    ring_full: int  # transmits handed back to the caller because the ring was full
    rx_overruns: int  # received bytes dropped because the FIFO was full (loopback)
    tx_pending: int  # bytes in the transmit ring now
    rx_pending: int  # bytes in the receive FIFO now


class UartRegs:
    """The C 16550 at ports [base, base+8). `notify_fd` (an eventfd, or -1) is signalled by
    the first byte transmitted after `arm()` (armed when made); `tx_bytes` (a power of two)
    bounds the transmit ring, `rx_bytes` the receive FIFO."""

    def __init__(self, base: int, tx_bytes: int, rx_bytes: int, notify_fd: int = -1) -> None:
        if not 0 <= base <= (1 << 16) - REGISTERS:
            raise invalid("uart", f"base port {base:#x} out of range")
        if tx_bytes <= 0 or tx_bytes & (tx_bytes - 1) or not 0 < rx_bytes < 1 << 32:
            raise invalid("uart", "the transmit ring must be a power of two, the FIFO > 0")
        ptr = lib.kvmd_uart_new(base, tx_bytes, rx_bytes, notify_fd)
        if ptr == ffi.NULL:
            raise KvmError(12, "kvmd_uart_new", "out of memory")  # ENOMEM
        # Freed when the last reference goes: a vCPU in the run loop holds one meanwhile.
        self.cdata: Any = ffi.gc(ptr, lib.kvmd_uart_free)
        self.base = base
        self.tx_bytes = tx_bytes
        self.rx_bytes = rx_bytes
        # Not cleared: take_output writes before it reads, and clearing 64 KiB would fault
        # every page in at CreateVm (about 25 us here) for a console that may stay silent.
        self._out = new_uncleared("uint8_t[]", tx_bytes)
        self._rda = ffi.new("int *")

    def read(self, offset: int) -> int:
        """One register read (offset 0-7), with its side effects (RBR pops the FIFO, IIR
        acknowledges THRE, LSR clears the overrun flag)."""
        return int(lib.kvmd_uart_read(self.cdata, offset))

    def write(self, offset: int, value: int) -> bool:
        """One register write; False (nothing done) when it transmits a byte and the ring
        is full: take_output, then write again."""
        return int(lib.kvmd_uart_write(self.cdata, offset, value & 0xFF)) == 0

    def take_output(self) -> bytes:
        """Every transmitted byte not taken yet, oldest first (empty when none)."""
        n = lib.kvmd_uart_take_output(self.cdata, self._out, self.tx_bytes)
        return bytes(ffi.buffer(self._out, n)) if n else b""

    def arm(self) -> bool:
        """Signal notify_fd at the next transmitted byte (a signal disarms until the next
        arm). True when bytes wait in the ring already (they signalled nothing: take them)."""
        return bool(lib.kvmd_uart_arm(self.cdata))

    def feed(self, data: bytes) -> tuple[int, bool]:
        """Queue input, all or nothing: (len(data) when it fit, else the room there is,
        having queued nothing; whether the guest enabled the received-data interrupt)."""
        n = lib.kvmd_uart_feed(self.cdata, data, len(data), self._rda)
        return int(n), bool(self._rda[0])

    def get_state(self) -> UartRegsState:
        regs = ffi.new("struct kvmd_uart_regs *")
        rx = ffi.new("uint8_t[]", self.rx_bytes)
        n = lib.kvmd_uart_get_state(self.cdata, regs, rx)
        return UartRegsState(int(regs.ier), int(regs.lcr), int(regs.mcr), int(regs.scr),
                             int(regs.dll), int(regs.dlm), bool(regs.thre_pending),
                             bytes(ffi.buffer(rx, n)))

    def set_state(self, state: UartRegsState) -> None:
        """Registers and FIFO (its newest rx_bytes); the transmit ring is left as it is."""
        regs = ffi.new("struct kvmd_uart_regs *", {
            "ier": state.ier & 0xFF, "lcr": state.lcr & 0xFF, "mcr": state.mcr & 0xFF,
            "scr": state.scr & 0xFF, "dll": state.dll & 0xFF, "dlm": state.dlm & 0xFF,
            "thre_pending": 1 if state.thre_pending else 0})
        lib.kvmd_uart_set_state(self.cdata, regs, state.rx, len(state.rx))

    def stats(self) -> UartStats:
        out = ffi.new("struct kvmd_uart_stats *")
        lib.kvmd_uart_get_stats(self.cdata, out)
        return UartStats(int(out.tx_bytes), int(out.ring_full), int(out.rx_overruns),
                         int(out.tx_pending), int(out.rx_pending))
