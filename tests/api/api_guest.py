"""Real-mode guest programs for the API tests, hand-assembled, one instruction a line.

Guests are loaded with WriteGuestMemory and set up with GetSregs/SetSregs/SetRegs, all over
gRPC. Run control has no RPC yet, so `run_vcpu` reaches into the in-process daemon for the
one thing gRPC cannot do: enter KVM_RUN (`daemon.host.get_vm(id).vcpu(n).vcpu.run()`).

Layout used by these programs (all inside one 64 KiB slot at guest address 0):

    0x0000  real-mode interrupt vector table
    0x1000  CODE_ADDR: programs are entered here
    0x1100  HANDLER_ADDR: an interrupt handler
    0x8000  STACK_TOP
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from kvmd_proto import vmm_pb2 as pb

PAGE = 0x1000
CODE_ADDR = 0x1000
HANDLER_ADDR = 0x1100
STACK_TOP = 0x8000
RAM_SIZE = 0x10000

IOEVENT_PORT = 0x10  # ports the programs write to
DONE_PORT = 0x11


def ioevent_then_hlt_loop() -> bytes:
    """Forever: write AL to IOEVENT_PORT, halt. Each run() ends at the hlt, so each run
    fires the ioevent exactly once."""
    return bytes([
        0xB0, 0x5A,        # mov al, 0x5a
        0xE6, IOEVENT_PORT,  # loop: out 0x10, al   (an ioeventfd: no exit, KVM signals it)
        0xF4,              #       hlt             (HLT exit: run() returns)
        0xEB, 0xFB,        #       jmp loop        (back to the out, 5 bytes up)
    ])


def dirty_pages_program() -> bytes:
    """Store one byte into guest pages 0x3, 0x5 and 0x9 (DS = 0), then into the second
    slot at 0x20000 (pages 0, 9 and 0x5f of that slot), then halt."""
    return bytes([
        0xB0, 0xA5,        # mov al, 0xa5
        0xA2, 0x00, 0x30,  # mov [0x3000], al      page 3 of slot 0
        0xA2, 0x34, 0x50,  # mov [0x5034], al      page 5 of slot 0
        0xA2, 0xFF, 0x9F,  # mov [0x9fff], al      page 9 of slot 0 (its last byte)
        0xB8, 0x00, 0x20,  # mov ax, 0x2000
        0x8E, 0xD8,        # mov ds, ax            DS base = 0x20000 (slot 1)
        0xB0, 0x5C,        # mov al, 0x5c
        0xA2, 0x00, 0x00,  # mov [0x0000], al      0x20000: page 0x00 of slot 1
        0xA2, 0x10, 0x90,  # mov [0x9010], al      0x29010: page 0x09 of slot 1
        0xB8, 0x00, 0x70,  # mov ax, 0x7000
        0x8E, 0xD8,        # mov ds, ax            DS base = 0x70000
        0xB0, 0x5C,        # mov al, 0x5c          (mov ax above overwrote AL)
        0xA2, 0x00, 0xF0,  # mov [0xf000], al      0x7f000: page 0x5f of slot 1
        0xF4,              # hlt
    ])


DIRTY_PAGES_SLOT0 = {0x3, 0x5, 0x9}
DIRTY_PAGES_SLOT1 = {0x00, 0x09, 0x5F}
SLOT1_ADDR = 0x20000
SLOT1_SIZE = 0x80000  # 128 pages: a 16-byte bitmap


PIC_VECTOR_BASE = 0x20
PIC_IRQ = 4  # the GSI the irqfd raises (PIC master pin 4: nothing else drives it)


def pic_interrupt_program() -> bytes:
    """Program the in-kernel master PIC (vectors 0x20-0x27, auto-EOI, only IRQ4 unmasked),
    tell the host with `out 0x10` (an IO exit), then take interrupts forever: sti; hlt.
    In auto-EOI mode the PIC acknowledges the IRQ as the CPU takes it, which is what makes
    KVM signal a resample irqfd. The handler (`handler_program`) reports on DONE_PORT."""
    return bytes([
        0xB0, 0x11,        # mov al, 0x11          ICW1: edge, cascade, ICW4 follows
        0xE6, 0x20,        # out 0x20, al
        0xB0, PIC_VECTOR_BASE,  # mov al, 0x20     ICW2: vector base 0x20
        0xE6, 0x21,        # out 0x21, al
        0xB0, 0x04,        # mov al, 0x04          ICW3: slave PIC on IRQ2
        0xE6, 0x21,        # out 0x21, al
        0xB0, 0x03,        # mov al, 0x03          ICW4: 8086 mode, auto-EOI
        0xE6, 0x21,        # out 0x21, al
        0xB0, 0xEF,        # mov al, 0xef          OCW1: mask every IRQ but IRQ4
        0xE6, 0x21,        # out 0x21, al
        0xE6, IOEVENT_PORT,  # out 0x10, al        IO exit: "the PIC is programmed"
        0xFB,              # sti
        0xF4,              # wait: hlt             (blocks in the kernel until an IRQ)
        0xEB, 0xFD,        #       jmp wait
    ])


def handler_program() -> bytes:
    """The IRQ4 handler: report on DONE_PORT (an IO exit), return to the hlt loop."""
    return bytes([
        0xE6, DONE_PORT,   # out 0x11, al          IO exit: "interrupt taken"
        0xCF,              # iret
    ])


def ivt_entry(vector: int, offset: int, segment: int = 0) -> tuple[int, bytes]:
    """(guest address, bytes) of a real-mode interrupt vector table entry."""
    return vector * 4, struct.pack("<HH", offset, segment)


def setup_real_mode(api: Any, vm_id: str, vcpu_id: int = 0, entry: int = CODE_ADDR,
                    stack: int = STACK_TOP) -> None:
    """Real mode with CS base 0, over gRPC: GetSregs, cs.base = cs.selector = 0, SetSregs;
    SetRegs rip = entry, rflags = 2 (reserved bit), rsp = stack."""
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)
    sregs = api.vcpus.GetSregs(ref)
    sregs.cs.base = 0
    sregs.cs.selector = 0
    api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
    api.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=entry, rflags=2, rsp=stack)))


def run_vcpu(api: Any, vm_id: str, vcpu_id: int = 0, timeout: float = 20.0) -> Any:
    """Enter the guest once (the only step without an RPC yet) and return the decoded exit.

    A watchdog kicks the vCPU out of KVM_RUN after `timeout` seconds, so a guest that never
    exits fails the test (the exit is then an IntrExit) instead of hanging it.
    """
    vcpu = api.daemon.host.get_vm(vm_id).vcpu(vcpu_id).vcpu
    watchdog = threading.Timer(timeout, vcpu.kick)
    watchdog.start()
    try:
        return vcpu.run()
    finally:
        watchdog.cancel()
