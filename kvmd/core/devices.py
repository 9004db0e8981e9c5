"""The in-daemon device bus: a 16550 UART on COM1 and a debug-exit port.

Devices are called from vCPU threads. Each keeps its own small lock; none blocks. The
UART's registers live in C (kvmd.kvm.UartRegs): the vCPU run loop completes the guest's
accesses to it without Python, and its transmitted bytes reach the console in bulk.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmd.core.events import Broadcaster, Subscription
from kvmd.core.state import ConsoleState, UartState
from kvmd.kvm import EventFd, UartRegs

log = logging.getLogger(__name__)

COM1_BASE = 0x3F8
COM1_IRQ = 4
DEFAULT_DEBUG_EXIT_PORT = 0x501
DEFAULT_CONSOLE_BUFFER = 64 << 10
# console_buffer_bytes above this is refused (INVALID_ARGUMENT): a backlog is daemon memory.
MAX_CONSOLE_BUFFER = 16 << 20
# The UART's receive FIFO (guest input not read yet): a few KiB, like a generous 16550A.
CONSOLE_INPUT_LIMIT = 4096
# The UART's transmit ring between the vCPU run loop and the console (a power of two).
UART_TX_RING = 64 << 10
# Live console subscribers hold at most this many chunks, and at most the console's
# backlog size in bytes (at least MIN_SUBSCRIBER_BYTES): a reader that stopped reading
# loses the oldest output, never grows the daemon.
SUBSCRIBER_CHUNKS = 4096
MIN_SUBSCRIBER_BYTES = 64 << 10
# After draining a UART the pump waits this long before asking for the next signal: output
# of a guest that prints fast reaches the console in batches, at most this late.
CONSOLE_BATCH_SECONDS = 0.002

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
    """A VM's console: a bounded backlog of guest output and live subscribers, each
    bounded in bytes. Output producers that buffer elsewhere (the UART's ring) register a
    `source` that readers flush first, so what the guest wrote before a read is seen."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._backlog = bytearray()
        self._lock = threading.Lock()
        self._live: Broadcaster[bytes] = Broadcaster(
            maxsize=SUBSCRIBER_CHUNKS, max_bytes=max(capacity, MIN_SUBSCRIBER_BYTES))
        self._sources: list[Callable[[], object]] = []
        self.bytes_out = 0
        self.bytes_in = 0

    def add_source(self, flush: Callable[[], object]) -> None:
        """`flush()` moves output buffered elsewhere into this console (calling output)."""
        self._sources.append(flush)

    def flush(self) -> None:
        for flush in self._sources:
            flush()

    def output(self, data: bytes) -> None:
        with self._lock:
            self._backlog += data
            if len(self._backlog) > self.capacity:
                del self._backlog[: len(self._backlog) - self.capacity]
            self.bytes_out += len(data)
            self._live.publish(data)

    def subscribe(self, backlog: bool) -> tuple[bytes, Subscription[bytes]]:
        """The backlog (if asked) and a subscription that continues exactly after it."""
        self.flush()
        with self._lock:
            return (bytes(self._backlog) if backlog else b""), self._live.subscribe()

    def backlog(self) -> bytes:
        self.flush()
        with self._lock:
            return bytes(self._backlog)

    def subscribe_from(self, offset: int | None) -> tuple[bytes, int, Subscription[bytes]]:
        """Resumable reading: the backlog from absolute output offset `offset` (clamped to
        what the backlog still holds; None: nothing), the offset of its first byte, and a
        subscription that continues exactly after it. Offsets count every byte the guest
        printed (`bytes_out`), which restores and hand-overs carry."""
        self.flush()  # bytes still in the UART's transmit ring belong to the backlog
        with self._lock:
            start = self.bytes_out - len(self._backlog)
            if offset is None or offset > self.bytes_out:
                offset = self.bytes_out if offset is None else start
            offset = max(offset, start)
            return bytes(self._backlog[offset - start:]), offset, self._live.subscribe()

    def save_state(self) -> ConsoleState:
        self.flush()
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
    divisor latches, scratch, loopback. The registers, the transmit ring and the receive
    FIFO are kept in C (`regs`, kvmd.kvm.UartRegs): the vCPU run loop completes the
    guest's accesses there (see ManagedVm: the VM's PioMap attaches `regs`). Output goes to
    the VM's Console when drained: by `drain()` (the daemon's ConsolePump calls it when
    `notify_fd` fires, and in batches after; console readers and save_state call it first;
    the Python path when the ring is full).
    Input comes from `feed()`, bounded by the FIFO (CONSOLE_INPUT_LIMIT bytes); in loopback
    mode bytes beyond it are dropped and counted (`rx_overruns`, LSR.OE), as on hardware.
    With an in-kernel irqchip, `raise_irq` pulses IRQ 4 for received data."""

    name = "uart16550"

    def __init__(self, console: Console, base: int = COM1_BASE,
                 raise_irq: Callable[[], None] | None = None, notify_fd: int = -1) -> None:
        self.base = base
        self.length = 8
        self.console = console
        self._raise_irq = raise_irq
        self.regs = UartRegs(base, UART_TX_RING, CONSOLE_INPUT_LIMIT, notify_fd)
        # Orders drains: bytes reach the console in the order the guest wrote them.
        self._drain_lock = threading.Lock()
        console.add_source(self.drain)

    def drain(self) -> int:
        """Move every transmitted byte from the ring to the console; returns how many."""
        with self._drain_lock:
            total = 0
            while data := self.regs.take_output():
                self.console.output(data)
                total += len(data)
            return total

    @property
    def rx_overruns(self) -> int:
        """Received bytes dropped because the FIFO was full (loopback floods)."""
        return self.regs.stats().rx_overruns

    def feed(self, data: bytes) -> int:
        """Queue input for the guest, all or nothing: returns len(data) when it fit,
        otherwise the free room (and queues nothing, so a retry never duplicates input)."""
        accepted, rda = self.regs.feed(data)
        if accepted < len(data):
            return accepted
        self.console.bytes_in += len(data)
        if data and rda and self._raise_irq is not None:
            self._raise_irq()
        return len(data)

    def save_state(self) -> UartState:
        """Registers and receive FIFO; the transmit ring is drained into the console first
        (so the console's own state holds every byte the guest wrote)."""
        self.drain()
        return self.regs.get_state()

    def restore_state(self, state: UartState) -> None:
        """Before the VM runs: registers and the receive FIFO (its newest
        CONSOLE_INPUT_LIMIT bytes)."""
        self.regs.set_state(dataclasses.replace(state, rx=state.rx[-CONSOLE_INPUT_LIMIT:]))

    # The Python path: exits the run loop hands back (a full transmit ring), direct calls.

    def read(self, port: int, size: int) -> bytes:
        return bytes([self.regs.read(port - self.base)]) + b"\xff" * (size - 1)

    def write(self, port: int, data: bytes) -> None:
        offset = port - self.base
        value = data[0] if data else 0
        while not self.regs.write(offset, value):
            self.drain()  # the ring is full: make room, then transmit


class ConsolePump:
    """Moves the daemon's UART output into consoles: one thread ("kvmd-console") for every
    VM. A UART's first transmitted byte after it was armed signals its eventfd; the pump
    drains the ring at once, waits CONSOLE_BATCH_SECONDS (what the guest prints meanwhile
    signals nothing), drains again and re-arms. So a line of output reaches StreamConsole
    within microseconds, and a flood costs one wake-up per batch, not one per byte."""

    def __init__(self, interval: float = CONSOLE_BATCH_SECONDS) -> None:
        self.interval = interval
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._uarts: dict[int, tuple[EventFd, Uart16550]] = {}
        self._due: dict[int, float] = {}  # fd -> when to drain again and re-arm
        self._wake = EventFd()
        self._epoll.register(self._wake.fileno(), select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kvmd-console", daemon=True)
        self._thread.start()

    def add(self, event: EventFd, uart: Uart16550) -> None:
        """Pump `uart`, whose notify_fd is `event`."""
        with self._lock:
            self._uarts[event.fileno()] = (event, uart)
            self._epoll.register(event.fileno(), select.EPOLLIN)

    def remove(self, event: EventFd) -> None:
        """Stop pumping; once this returns the pump no longer touches the UART or `event`."""
        with self._lock:
            if self._uarts.pop(event.fileno(), None) is not None:
                self._due.pop(event.fileno(), None)
                self._epoll.unregister(event.fileno())

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                due = min(self._due.values(), default=None)
            timeout = 1.0 if due is None else max(0.0, due - time.monotonic())
            try:
                ready = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            with self._lock:
                now = time.monotonic()
                for fd, _mask in ready:
                    if fd == self._wake.fileno():
                        self._wake.read()
                        continue
                    entry = self._uarts.get(fd)
                    if entry is not None:
                        entry[0].read()
                        self._drain(entry[1])
                        self._due[fd] = now + self.interval
                for fd, when in list(self._due.items()):
                    if when <= now:
                        uart = self._uarts[fd][1]
                        self._drain(uart)
                        if uart.regs.arm():  # bytes came after the drain: another round
                            self._due[fd] = now + self.interval
                        else:
                            del self._due[fd]

    @staticmethod
    def _drain(uart: Uart16550) -> None:
        try:
            uart.drain()
        except Exception:  # a console bug must not stop every console
            log.exception("console drain failed")

    def close(self) -> None:
        self._stopping = True
        self._wake.write(1)
        self._thread.join(timeout=5)
        with self._lock:
            self._epoll.close()
            self._wake.close()


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
