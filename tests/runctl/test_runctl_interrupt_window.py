"""An interrupt queued while the guest cannot take it (IF=0) is delivered once the guest
enables interrupts, even when the guest then never exits on its own: the vCPU asks KVM for
an interrupt-window exit instead of waiting for some other exit to retry."""

from __future__ import annotations

import struct

from guests import mov_ds_ax
from guests_runctl import Asm, debug_exit
from runctl_api import Api

from kvmd_proto import vmm_pb2 as pb

VECTOR = 0x42


def masked_then_open_spin() -> tuple[bytes, int, int]:
    """Point IVT entry VECTOR at a handler that debug-exits with 0x100 + VECTOR, then spin
    with IF=0 at `masked`; from `open` on: `sti` and spin without ever exiting. Returns
    the program and the addresses of `masked` and `open`."""
    a = Asm()
    a([0xFA], [0x31, 0xC0], mov_ds_ax())                        # cli; xor ax, ax; mov ds, ax
    a.mov_word_mem_label(VECTOR * 4, "handler")                 # mov word [v*4], handler
    a([0xC7, 0x06], struct.pack("<HH", VECTOR * 4 + 2, 0))      # mov word [v*4+2], 0
    a.label("masked").jmp("masked")                             # masked: jmp masked
    a.label("open")
    a([0xFB])                                                   # open: sti
    a.label("spin").jmp("spin")                                 # spin: jmp spin
    a.label("handler")
    a(debug_exit(0x100 + VECTOR))
    return a.bytes(), a.labels["masked"], a.labels["open"]


def test_an_interrupt_queued_under_cli_reaches_a_guest_that_then_spins(api: Api) -> None:
    code, masked, open_ = masked_then_open_spin()
    api.boot("window", code)
    watch = api.watch("window")
    api.start("window")
    for _ in range(100):  # the guest is at `masked` within microseconds of its start
        api.pause("window")
        regs = api.regs("window")
        if regs.rip == masked:
            break
        api.resume("window")
    assert regs.rip == masked and not regs.rflags & 0x200  # spinning with IF=0
    api.vcpus.InjectInterrupt(pb.InjectInterruptRequest(
        vcpu=pb.VcpuRef(vm_id="window", vcpu_id=0), vector=VECTOR))  # queued
    regs.rip = open_
    api.set_regs("window", regs)
    api.resume("window")
    assert watch.wait_for("debug_exit").exit_code == 0x100 + VECTOR
    api.delete("window")
