"""A guest that counts the interrupts it takes, in memory, for the in-kernel irqchip tests of
every layer (kvm, api, e2e): the test raises an irq line, signals an MSI or triggers an irqfd,
then reads the count back from guest memory (`vm.read` or ReadGuestMemory), so delivery is
observed without stopping the vCPU.

Real mode, loaded at CODE_ADDR (DS = SS = 0, RSP = STACK_TOP). The program:

    cli; ds = 0
    (with pic_irqs) program the master 8259: vectors PIC_VECTOR_BASE.., unmask only pic_irqs
    point the IVT entry of every counted vector at its handler
    mov byte [READY], 1                 ; the host may start interrupting now
    idle: sti; hlt; jmp idle            ; with the in-kernel irqchip HLT waits in the kernel
    handler (PIC vector):   inc byte [COUNTERS + vector]; PIC EOI; iret
    handler (LAPIC vector): inc byte [COUNTERS + vector]; LAPIC EOI; iret

The LAPIC EOI is a 32-bit store to the EOI register at 0xFEE000B0: real-mode code cannot
address it with a 16-bit offset, so the vCPU's ES *base* is set to the LAPIC page by the host
(`LAPIC_ES`; the selector does not matter, the guest never reloads ES) and the handler writes
`[es:0xB0]`. The LAPIC is software-disabled after reset: `lapic_enabled(regs)` turns on
SPIV bit 8, as a guest OS would, so that MSIs are accepted (KVM_SIGNAL_MSI returns 0 before).
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable

from guests import (
    CODE_ADDR,
    DATA_ADDR,
    PIC_MASTER_CMD,
    PIC_MASTER_DATA,
    PIC_VECTOR_BASE,
    boot_real_mode,
    run_guarded,
)
from polling import wait_until

from kvmd.kvm import KvmError, Vcpu, VcpuExit, Vm

COUNTERS = DATA_ADDR          # one byte per vector: COUNTERS + vector
READY = DATA_ADDR + 0x100     # 1 once the guest is waiting for interrupts
LAPIC_BASE = 0xFEE0_0000
LAPIC_EOI = 0xB0
LAPIC_SPIV = 0xF0
APIC_SW_ENABLE = 1 << 8
MSI_ADDRESS = LAPIC_BASE      # the MSI window, destination APIC id 0
#: The segment a vCPU running counter_program needs: ES based at the LAPIC page.
LAPIC_ES = {"base": LAPIC_BASE, "selector": 0}


def _mov_byte(offset: int, value: int) -> bytes:
    return bytes([0xC6, 0x06]) + struct.pack("<HB", offset, value)  # mov byte [offset], value


def counter_program(pic_irqs: tuple[int, ...] = (), lapic_vectors: tuple[int, ...] = (),
                    entry: int = CODE_ADDR) -> bytes:
    """The counting guest (see the module docstring): PIC pins `pic_irqs` (vectors
    PIC_VECTOR_BASE + irq, EOI to the PIC) and LAPIC vectors `lapic_vectors` (MSIs, EOI to
    the LAPIC through ES)."""
    if any(not 0 <= irq < 8 or irq == 2 for irq in pic_irqs):
        raise ValueError("PIC pins are 0..7 of the master, not the cascade pin 2")
    vectors = [(PIC_VECTOR_BASE + irq, "pic") for irq in pic_irqs]
    vectors += [(v, "lapic") for v in lapic_vectors]
    if len({v for v, _ in vectors}) != len(vectors) or any(not 0x10 <= v < 0x100
                                                            for v, _ in vectors):
        raise ValueError("vectors must be distinct and 0x10..0xff")
    head = bytearray([0xFA, 0x31, 0xC0, 0x8E, 0xD8])   # cli; xor ax, ax; mov ds, ax
    if pic_irqs:
        mask = 0xFF
        for irq in pic_irqs:
            mask &= ~(1 << irq)
        for port, value in ((PIC_MASTER_CMD, 0x11),         # ICW1: edge, cascade, ICW4
                            (PIC_MASTER_DATA, PIC_VECTOR_BASE),  # ICW2: vector base
                            (PIC_MASTER_DATA, 0x04),        # ICW3: a slave on IR2
                            (PIC_MASTER_DATA, 0x01),        # ICW4: 8086 mode, normal EOI
                            (PIC_MASTER_DATA, mask)):       # OCW1: unmask pic_irqs
            head += bytes([0xB0, value, 0xE6, port])        # mov al, value; out port, al
    ivt_len = 12 * len(vectors)                             # two 6-byte stores per vector
    tail = _mov_byte(READY, 1) + bytes([
        0xFB,        # idle: sti
        0xF4,        #       hlt
        0xEB, 0xFC,  #       jmp idle
    ])
    handlers = bytearray()
    handler_at = entry + len(head) + ivt_len + len(tail)
    ivt = bytearray()
    for vector, kind in vectors:
        ivt += bytes([0xC7, 0x06]) + struct.pack("<HH", vector * 4, handler_at + len(handlers))
        ivt += bytes([0xC7, 0x06]) + struct.pack("<HH", vector * 4 + 2, 0)  # handler's CS
        handlers += bytes([0xFE, 0x06]) + struct.pack("<H", COUNTERS + vector)  # inc byte [..]
        if kind == "pic":
            handlers += bytes([0xB0, 0x20, 0xE6, PIC_MASTER_CMD])  # mov al, 0x20; out 0x20, al
        else:
            # mov dword [es:0xb0], 0     (the LAPIC's EOI register)
            handlers += bytes([0x26, 0x66, 0xC7, 0x06]) + struct.pack("<HI", LAPIC_EOI, 0)
        handlers += bytes([0xCF])                                  # iret
    return bytes(head + ivt + tail + handlers)


def lapic_enabled(regs: bytes) -> bytes:
    """A LAPIC register page with the software-enable bit (SPIV bit 8) set."""
    page = bytearray(regs)
    spiv = struct.unpack_from("<I", page, LAPIC_SPIV)[0]
    struct.pack_into("<I", page, LAPIC_SPIV, spiv | APIC_SW_ENABLE)
    return bytes(page)


def counts(memory: bytes) -> dict[int, int]:
    """{vector: count} of the non-zero counters in the 256 bytes read at COUNTERS."""
    return {vector: n for vector, n in enumerate(memory[:256]) if n}


class GuestThread:
    """A kvm-layer vCPU running `counter_program` in a thread of its own (in-kernel irqchip:
    HLT waits in the kernel, so run() returns only when kicked). `stop()` kicks it and returns
    the exit, which must be the kick's IntrExit: anything else means the guest went wrong."""

    def __init__(self, vcpu: Vcpu, timeout: float = 30.0) -> None:
        self.vcpu = vcpu
        self.exit: VcpuExit | None = None
        self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True,
                                        name="counter-guest")
        self._thread.start()

    def _run(self, timeout: float) -> None:
        self.exit = run_guarded(self.vcpu, timeout)

    def stop(self) -> VcpuExit | None:
        while self._thread.is_alive():
            with contextlib.suppress(KvmError):
                self.vcpu.kick()
            self._thread.join(0.1)
        return self.exit


def wait_for_count(read: Callable[[int, int], bytes], vector: int, count: int,
                   timeout: float = 10.0) -> int:
    """Poll guest memory through `read(addr, length)` until the counter of `vector` reaches
    `count`; returns it (it may have gone past). Fails after `timeout` seconds."""
    return int(wait_until(lambda: read(COUNTERS + vector, 1)[0] >= count and
                          read(COUNTERS + vector, 1)[0], timeout,
                          f"{count} interrupt(s) with vector {vector:#x}"))


def wait_ready(read: Callable[[int, int], bytes], timeout: float = 10.0) -> None:
    """Poll until the guest has set its READY flag (it is then idle, interrupts enabled)."""
    wait_until(lambda: read(READY, 1) == b"\x01", timeout, "the counting guest to be ready")


def boot_counter_guest(vm: Vm, pic_irqs: tuple[int, ...] = (),
                       lapic_vectors: tuple[int, ...] = (), *,
                       enable_lapic: bool = True) -> Vcpu:
    """kvm layer: RAM, `counter_program` and a real-mode vCPU (the VM has its irqchip); for
    LAPIC vectors also ES at the LAPIC page and, with `enable_lapic`, the LAPIC enabled."""
    vcpu = boot_real_mode(vm, counter_program(pic_irqs, lapic_vectors))
    if lapic_vectors:
        sregs = vcpu.get_sregs()
        sregs.es.base, sregs.es.selector = LAPIC_BASE, 0
        vcpu.set_sregs(sregs)
        if enable_lapic:
            vcpu.set_lapic(lapic_enabled(vcpu.get_lapic()))
    return vcpu
