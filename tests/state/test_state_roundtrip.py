"""snapshot -> restore -> snapshot gives the same state, field by field, with every piece of
state set to something other than its default. In process (kvmd.core + kvmd.state) so the
binding can set what the API does not expose (XSAVE, XCRs, debug registers)."""

from __future__ import annotations

import struct

from polling import wait_until
from state_guests import COUNTER_SOURCE, assemble

from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import IoSpace, IrqChip, IrqChipRoute, MsiRoute, Regs
from kvmd.state.format import SnapshotReader, as_message
from kvmd.state.snapshot import SnapshotTaker, restore_bytes
from kvmd_proto import vmm_pb2 as pb

MSR_STAR, MSR_LSTAR, MSR_KERNEL_GS_BASE, MSR_SYSENTER_CS = (
    0xC0000081, 0xC0000082, 0xC0000102, 0x174)
MSR_TSC = 0x10
LAPIC_TPR = 0x80
XCR0_X87_SSE_AVX = 0x7


def decoded(data: bytes) -> tuple[pb.SnapshotHeader, pb.SavedVm, list[pb.SnapshotRecord]]:
    reader = SnapshotReader()
    records = [as_message(r) for r in reader.feed(data)]
    reader.finish()
    return records[0].header, records[1].vm, records[2:-1]


def comparable(saved: pb.SavedVm) -> pb.SavedVm:
    """The state without what is an id or a timestamp: the VM id, the TSC, the kvmclock and
    the PIT channels' load times (all follow the host's clock)."""
    out = pb.SavedVm()
    out.CopyFrom(saved)
    out.vm_id = ""
    out.ClearField("clock")
    for channel in out.pit.channels:
        channel.count_load_time = 0
    for vcpu in out.vcpus:
        kept = [m for m in vcpu.msrs if m.index != MSR_TSC]
        del vcpu.msrs[:]
        vcpu.msrs.extend(kept)
    return out


def busy_vm(host: Host) -> ManagedVm:
    """A VM whose every piece of state differs from its default."""
    vm = host.create_vm("rt", {"role": "roundtrip"},
                        VmOptions(irqchip=True, pit=True, debug_exit_port=0x600,
                                  console_buffer_bytes=4096))
    vm.add_memory_region(0, 0x40000, False, True)
    vm.add_memory_region(0x100000, 0x10000, True, False)
    vm.write_memory(0x1000, assemble(COUNTER_SOURCE))
    vm.write_memory(0x30000, b"\xa5" * 5000)
    supported = host.supported_cpuid()
    for vcpu_id in (0, 3):
        mv = vm.create_vcpu(vcpu_id)
        v = mv.vcpu
        v.set_cpuid(supported)
        v.set_regs(Regs(rax=0x1122, rbx=vcpu_id, rip=0x1000, rsp=0xF000, rflags=0x202))
        sregs = v.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0x1000, 0x100
        v.set_sregs(sregs)
        xsave = v.get_xsave()
        xsave.set_xmm(3, bytes(range(16)))
        xsave.set_mxcsr(0x1FA0)
        v.set_xsave(xsave)
        xcrs = v.get_xcrs()
        xcrs.xcrs[0].value = XCR0_X87_SSE_AVX
        v.set_xcrs(xcrs)
        dr = v.get_debugregs()
        dr.db = [0x1000, 0x2000, 0x3000, 0x4000 + vcpu_id]
        dr.dr7 = 0x401
        v.set_debugregs(dr)
        v.set_msrs({MSR_STAR: 0x0023_0010_0000_0000, MSR_LSTAR: 0xFFFF_8000_1234_0000,
                    MSR_KERNEL_GS_BASE: 0xFFFF_8800_0000_1000 + vcpu_id,
                    MSR_SYSENTER_CS: 0x10})
        lapic = bytearray(v.get_lapic())
        struct.pack_into("<I", lapic, LAPIC_TPR, 0x20)
        v.set_lapic(bytes(lapic))
    pic = vm.vm.get_irqchip(IrqChip.PIC_MASTER)
    pic.imr, pic.irq_base = 0xF0, 0x30
    vm.vm.set_irqchip(IrqChip.PIC_MASTER, pic)
    ioapic = vm.vm.get_irqchip(IrqChip.IOAPIC)
    ioapic.redirtbl[5] = 0x0000_0000_0000_0035
    vm.vm.set_irqchip(IrqChip.IOAPIC, ioapic)
    pit = vm.vm.get_pit2()
    pit.channels[2].count, pit.channels[2].mode = 1000, 3
    vm.vm.set_pit2(pit)
    vm.set_gsi_routing([IrqChipRoute(0, IrqChip.PIC_MASTER, 0),
                        IrqChipRoute(5, IrqChip.IOAPIC, 5),
                        MsiRoute(24, 0xFEE00000, 0x41, devid=7)])
    vm.register_irqfd("net", 5, False).triggers = 7
    vm.register_irqfd("blk", 24, False)
    vm.register_ioevent("doorbell", IoSpace.PIO, 0x700, 2, 0x55).fired = 3
    vm.register_ioevent("mmio-kick", IoSpace.MMIO, 0x200000, 4, None)
    vm.uart.write(0x3FB, b"\x83")  # LCR: DLAB and 8 bits
    vm.uart.write(0x3F8, b"\x01")  # divisor low
    vm.uart.write(0x3FB, b"\x03")
    vm.uart.write(0x3FF, b"\x42")  # scratch
    vm.uart.feed(b"typed ahead")
    vm.console.output(b"earlier output\n")
    return vm


def test_snapshot_restore_snapshot_is_identical(host: Host) -> None:
    vm = busy_vm(host)
    first = b"".join(SnapshotTaker(vm))
    restored = restore_bytes(host, "rt2", "local", iter([first]))
    second = b"".join(SnapshotTaker(restored))
    h1, vm1, mem1 = decoded(first)
    h2, vm2, mem2 = decoded(second)
    assert h1.snapshot_id != h2.snapshot_id
    assert comparable(vm1) == comparable(vm2)
    assert mem1 == mem2
    # The non-default values really are in the snapshot (the comparison is not vacuous).
    v0 = vm1.vcpus[0]
    assert bytes(v0.xsave[160 + 3 * 16:160 + 4 * 16]) == bytes(range(16))
    assert {m.index: m.value for m in v0.msrs}[MSR_LSTAR] == 0xFFFF_8000_1234_0000
    assert list(v0.debugregs.db) == [0x1000, 0x2000, 0x3000, 0x4000]
    assert v0.xcrs[0].value == XCR0_X87_SSE_AVX
    assert struct.unpack_from("<I", v0.lapic, LAPIC_TPR)[0] == 0x20
    assert vm1.irqchip.pic_master.imr == 0xF0 and vm1.irqchip.ioapic.redirtbl[5] == 0x35
    assert vm1.pit.channels[2].count == 1000
    assert len(vm1.gsi_routes) == 3 and vm1.custom_gsi_routes
    assert vm1.gsi_routes[2].msi.HasField("devid") and vm1.gsi_routes[2].msi.devid == 7
    assert [(i.irqfd_id, i.triggers) for i in vm1.irqfds] == [("net", 7), ("blk", 0)]
    assert vm1.ioevents[0].datamatch == 0x55 and vm1.ioevents[0].fired == 3
    assert vm1.uart.dll == 1 and vm1.uart.scr == 0x42 and vm1.uart.rx == b"typed ahead"
    assert vm1.console.backlog == b"earlier output\n"
    assert vm1.options.debug_exit_port == 0x600 and vm1.labels == {"role": "roundtrip"}
    assert [v.vcpu_id for v in vm1.vcpus] == [0, 3]
    # The restored VM works: its irqfds and ioevents are live, with new eventfds.
    restored.trigger_irqfd("net")
    assert {e.ioevent_id for e in restored.ioevents()} == {"doorbell", "mmio-kick"}
    assert restored.read_memory(0x30000, 5000) == b"\xa5" * 5000
    host.delete_vm("rt2")


def test_restore_with_start_runs_a_vm_saved_before_it_ever_ran(host: Host) -> None:
    vm = host.create_vm("new", {}, VmOptions())
    vm.add_memory_region(0, 0x40000, False, True)
    vm.write_memory(0x1000, assemble(COUNTER_SOURCE))
    v = vm.create_vcpu(0).vcpu
    sregs = v.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0x1000, 0x100
    v.set_sregs(sregs)
    v.set_regs(Regs(rip=0, rsp=0xF000, rflags=2))
    data = b"".join(SnapshotTaker(vm))
    restored = restore_bytes(host, "run", "local", iter([data]), start=True)
    assert restored.state == "running"
    # The counter guest runs from the restored registers: its counter moves.
    wait_until(lambda: struct.unpack("<I", restored.read_memory(0x2000, 4))[0] > 0, 10,
               "the restored guest to count")
    host.delete_vm("run")
