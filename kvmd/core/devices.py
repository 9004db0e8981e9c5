"""The in-daemon device bus: a 16550 UART on COM1 and a debug-exit port.

Devices are called from vCPU threads. Each keeps its own small lock; none blocks.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kvmd.core.events import Broadcaster, Subscription
from kvmd.core.state import ConsoleState, UartState

COM1_BASE = 0x3F8
COM1_IRQ = 4
DEFAULT_DEBUG_EXIT_PORT = 0x501
DEFAULT_CONSOLE_BUFFER = 64 << 10
CONSOLE_INPUT_LIMIT = 4096

# 16550 registers (offsets from the base) and bits used here.
_RBR_THR = 0
_IER = 1
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7
_LCR_DLAB = 0x80
_LSR_DR = 0x01
_LSR_THRE = 0x20
_LSR_TEMT = 0x40
_IER_RDA = 0x01
_IER_THRE = 0x02
_IIR_NONE = 0x01
_IIR_THRE = 0x02
_IIR_RDA = 0x04
_IIR_FIFO = 0xC0
_MCR_LOOP = 0x10
_MSR_CTS_DSR_DCD = 0xB0


class PioDevice:
    """A device on the port bus: `read` returns `size` bytes, `write` consumes them."""

    base: int
    length: int
    name: str

    def read(self, port: int, size: int) -> bytes:
        raise NotImplementedError

    def write(self, port: int, data: bytes) -> None:
        raise NotImplementedError


class Console:
    """A VM's console: a bounded backlog of guest output and live subscribers."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._backlog = bytearray()
        self._lock = threading.Lock()
        self._live: Broadcaster[bytes] = Broadcaster(maxsize=4096)
        self.bytes_out = 0
        self.bytes_in = 0

    def output(self, data: bytes) -> None:
        with self._lock:
            self._backlog += data
            if len(self._backlog) > self.capacity:
                del self._backlog[: len(self._backlog) - self.capacity]
            self.bytes_out += len(data)
            self._live.publish(data)

    def subscribe(self, backlog: bool) -> tuple[bytes, Subscription[bytes]]:
        """The backlog (if asked) and a subscription that continues exactly after it."""
        with self._lock:
            return (bytes(self._backlog) if backlog else b""), self._live.subscribe()

    def backlog(self) -> bytes:
        with self._lock:
            return bytes(self._backlog)

    def subscribe_from(self, offset: int | None) -> tuple[bytes, int, Subscription[bytes]]:
        """Resumable reading: the backlog from absolute output offset `offset` (clamped to
        what the backlog still holds; None: nothing), the offset of its first byte, and a
        subscription that continues exactly after it. Offsets count every byte the guest
        printed (`bytes_out`), which restores and hand-overs carry."""
        with self._lock:
            start = self.bytes_out - len(self._backlog)
            if offset is None or offset > self.bytes_out:
                offset = self.bytes_out if offset is None else start
            offset = max(offset, start)
            return bytes(self._backlog[offset - start:]), offset, self._live.subscribe()

    def save_state(self) -> ConsoleState:
        with self._lock:
            return ConsoleState(bytes(self._backlog), self.bytes_out, self.bytes_in)

    def restore_state(self, state: ConsoleState) -> None:
        """Before the VM runs: the backlog (its newest `capacity` bytes) and the counts."""
        with self._lock:
            self._backlog = bytearray(state.backlog[-self.capacity:])
            self.bytes_out, self.bytes_in = state.bytes_out, state.bytes_in

    def end(self) -> None:
        self._live.end()


class Uart16550(PioDevice):
    """Enough of a 16550 for a guest to print and read: THR/RBR, LSR, IER/IIR, DLAB
    divisor latches, scratch. Output goes to the VM's Console; input comes from
    `feed()`. With an in-kernel irqchip, `raise_irq` pulses IRQ 4 for received data."""

    name = "uart16550"

    def __init__(self, console: Console, base: int = COM1_BASE,
                 raise_irq: Callable[[], None] | None = None) -> None:
        self.base = base
        self.length = 8
        self.console = console
        self._raise_irq = raise_irq
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03
        self._mcr = 0x08
        self._scr = 0
        self._dll = 0x0C
        self._dlm = 0
        self._thre_pending = False

    def feed(self, data: bytes) -> int:
        """Queue input for the guest, all or nothing: returns len(data) when it fit,
        otherwise the free room (and queues nothing, so a retry never duplicates input)."""
        with self._lock:
            room = CONSOLE_INPUT_LIMIT - len(self._rx)
            if len(data) > room:
                return room
            taken = data
            self._rx.extend(taken)
            notify = bool(taken) and self._ier & _IER_RDA
        self.console.bytes_in += len(taken)
        if notify and self._raise_irq is not None:
            self._raise_irq()
        return len(taken)

    def save_state(self) -> UartState:
        with self._lock:
            return UartState(self._ier, self._lcr, self._mcr, self._scr, self._dll,
                             self._dlm, self._thre_pending, bytes(self._rx))

    def restore_state(self, state: UartState) -> None:
        """Before the VM runs: registers and the receive FIFO (bounded as on input)."""
        with self._lock:
            self._ier, self._lcr, self._mcr, self._scr = (state.ier, state.lcr, state.mcr,
                                                          state.scr)
            self._dll, self._dlm, self._thre_pending = state.dll, state.dlm, state.thre_pending
            self._rx = deque(state.rx[-CONSOLE_INPUT_LIMIT:])

    def _iir(self) -> int:
        if self._ier & _IER_RDA and self._rx:
            return _IIR_FIFO | _IIR_RDA
        if self._ier & _IER_THRE and self._thre_pending:
            return _IIR_FIFO | _IIR_THRE
        return _IIR_FIFO | _IIR_NONE

    def read(self, port: int, size: int) -> bytes:
        offset = port - self.base
        with self._lock:
            dlab = self._lcr & _LCR_DLAB
            if offset == _RBR_THR:
                value = self._dll if dlab else (self._rx.popleft() if self._rx else 0)
            elif offset == _IER:
                value = self._dlm if dlab else self._ier
            elif offset == _IIR_FCR:
                value = self._iir()
                if value & 0x0F == _IIR_THRE:
                    self._thre_pending = False
            elif offset == _LCR:
                value = self._lcr
            elif offset == _MCR:
                value = self._mcr
            elif offset == _LSR:
                value = _LSR_THRE | _LSR_TEMT | (_LSR_DR if self._rx else 0)
            elif offset == _MSR:
                value = _MSR_CTS_DSR_DCD
            else:
                value = self._scr
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, port: int, data: bytes) -> None:
        offset = port - self.base
        value = data[0] if data else 0
        out = b""
        with self._lock:
            dlab = self._lcr & _LCR_DLAB
            if offset == _RBR_THR:
                if dlab:
                    self._dll = value
                elif self._mcr & _MCR_LOOP:
                    self._rx.append(value)
                else:
                    out = bytes([value])
                    self._thre_pending = True
            elif offset == _IER:
                if dlab:
                    self._dlm = value
                else:
                    self._ier = value & 0x0F
                    self._thre_pending = bool(value & _IER_THRE)
            elif offset == _LCR:
                self._lcr = value
            elif offset == _MCR:
                self._mcr = value
            elif offset == _SCR:
                self._scr = value
            # FCR, LSR and MSR writes are accepted and ignored.
        if out:
            self.console.output(out)


@dataclass
class DebugExitRecord:
    code: int
    vcpu_id: int


class DebugExit(PioDevice):
    """Like QEMU's isa-debug-exit: a guest write ends the VM with the written value as
    its exit code. The actual stopping is done by the caller, who sees `fired`."""

    name = "debug-exit"

    def __init__(self, port: int = DEFAULT_DEBUG_EXIT_PORT) -> None:
        self.base = port
        self.length = 1

    def read(self, port: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, port: int, data: bytes) -> None:
        """Nothing to store: the runner reports the code and stops the VM."""

    @staticmethod
    def code(data: bytes) -> int:
        return int.from_bytes(data, "little")


class DeviceBus:
    """Port devices of one VM, looked up by port."""

    def __init__(self) -> None:
        self._devices: list[PioDevice] = []

    def add(self, device: PioDevice) -> None:
        for other in self._devices:
            if device.base < other.base + other.length and other.base < device.base + \
                    device.length:
                raise ValueError(f"{device.name} overlaps {other.name}")
        self._devices.append(device)

    def find(self, port: int) -> PioDevice | None:
        for device in self._devices:
            if device.base <= port < device.base + device.length:
                return device
        return None

    def overlapping(self, base: int, length: int) -> PioDevice | None:
        for device in self._devices:
            if base < device.base + device.length and device.base < base + length:
                return device
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._devices)
