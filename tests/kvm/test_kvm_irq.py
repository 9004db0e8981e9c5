"""Interrupts: the in-kernel irqchip, irqfd, GSI routing, MSI, IRQ lines, KVM_INTERRUPT and
NMI, each checked at the ioctl and, where it matters, by a real guest taking the interrupt.

The crosvm tests register_irqfd, unregister_irqfd and irqfd_resample are ported first.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from guests import (
    DEBUG_PORT,
    PIC_READY,
    PIC_VECTOR_BASE,
    boot_real_mode,
    interrupt_program,
    pic_irq_program,
    run_guarded,
)
from interrupt_guests import (
    COUNTERS,
    GuestThread,
    boot_counter_guest,
    counts,
    wait_for_count,
    wait_ready,
)

from kvmd.kvm import (
    EventFd,
    HltExit,
    IntrExit,
    IoEventAddress,
    IoExit,
    IrqChip,
    IrqChipRoute,
    KvmError,
    MsiRoute,
    Vcpu,
    Vm,
)
from kvmd.kvm._ffi import ffi, ioctl, lib

LAPIC_SPIV = 0xF0
LAPIC_LVT0 = 0x350
APIC_SW_ENABLE = 1 << 8
MSI_ADDRESS = 0xFEE0_0000  # LAPIC MSI window, destination APIC id 0
MSI_VECTOR = 0x30
# How long an interrupt that must not arrive is given to arrive anyway (one arrives in well
# under a millisecond here).
NOT_DELIVERED_WAIT = 0.2


@pytest.fixture
def events() -> Iterator[list[EventFd]]:
    """Three eventfds, closed after the test."""
    evs = [EventFd() for _ in range(3)]
    try:
        yield evs
    finally:
        for ev in evs:
            ev.close()


def _errno_of(call: object, *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.errno


def _out(value: int, port: int = DEBUG_PORT) -> IoExit:
    return IoExit(is_write=True, port=port, size=1, count=1, data=bytes([value]))


def _enable_lapic(vcpu: Vcpu) -> None:
    """Software-enable the vCPU's local APIC (SPIV bit 8), as a guest OS would."""
    regs = bytearray(vcpu.get_lapic())
    spiv = struct.unpack_from("<I", regs, LAPIC_SPIV)[0]
    struct.pack_into("<I", regs, LAPIC_SPIV, spiv | APIC_SW_ENABLE)
    vcpu.set_lapic(bytes(regs))


def _later(delay: float, action: object) -> threading.Thread:
    def body() -> None:
        time.sleep(delay)
        action()  # type: ignore[operator]

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


# -- crosvm's tests ----------------------------------------------------------------------


def test_register_irqfd(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    ev1, ev2, ev3 = events
    vm.register_irqfd(4, ev1)
    vm.register_irqfd(8, ev2)
    vm.register_irqfd(4, ev3)
    assert _errno_of(vm.register_irqfd, 4, ev3) == errno.EEXIST
    # The kernel allows an eventfd on one GSI only.
    assert _errno_of(vm.register_irqfd, 8, ev1) == errno.EBUSY


def test_unregister_irqfd(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    ev1, ev2, ev3 = events
    vm.register_irqfd(4, ev1)
    vm.register_irqfd(8, ev2)
    vm.register_irqfd(4, ev3)
    vm.unregister_irqfd(4, ev1)
    vm.unregister_irqfd(8, ev2)
    vm.unregister_irqfd(4, ev3)
    # Unregistered, an eventfd no longer reaches the guest (which takes PIC pins 3 and 4) ...
    vcpu = boot_counter_guest(vm, pic_irqs=(3, 4))
    guest = GuestThread(vcpu)
    wait_ready(vm.read)
    ev1.write(1)
    ev3.write(1)
    time.sleep(NOT_DELIVERED_WAIT)
    assert counts(vm.read(COUNTERS, 256)) == {}
    # The signal stays in the eventfd, unconsumed (KVM would inject a pending one when the
    # eventfd is registered again, as a second interrupt or merged with the next: drain it).
    assert ev1.read() == 1
    # ... and can go to another GSI, where it does.
    vm.register_irqfd(3, ev1)
    ev1.write(1)
    assert wait_for_count(vm.read, PIC_VECTOR_BASE + 3, 1) == 1
    assert counts(vm.read(COUNTERS, 256)) == {PIC_VECTOR_BASE + 3: 1}
    assert isinstance(guest.stop(), IntrExit)


def test_unregister_unknown_irqfd_is_enoent(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    ev1, ev2, _ = events
    vm.register_irqfd(4, ev1)
    assert _errno_of(vm.unregister_irqfd, 4, ev2) == errno.ENOENT   # never registered
    assert _errno_of(vm.unregister_irqfd, 5, ev1) == errno.ENOENT   # on another GSI
    vm.unregister_irqfd(4, ev1)
    assert _errno_of(vm.unregister_irqfd, 4, ev1) == errno.ENOENT   # twice


def test_closed_vm_reports_no_irqfds_or_ioevents(vm: Vm, events: list[EventFd]) -> None:
    """Closing the VM drops its registrations with it: irqfds() and ioevents() report
    nothing afterwards (KVM let go of them with the VM fd)."""
    vm.create_irq_chip()
    vm.register_irqfd(4, events[0], tag="irq4")
    vm.register_ioevent(events[1], IoEventAddress.pio(0xF4))
    assert [r.tag for r in vm.irqfds()] == ["irq4"] and len(vm.ioevents()) == 1
    vm.close()
    assert vm.irqfds() == [] and vm.ioevents() == []


def test_kernel_accepts_unknown_irqfd_deassign(vm: Vm, events: list[EventFd]) -> None:
    # Why the binding tracks irqfds itself: KVM reports success when asked to detach an
    # eventfd that was never attached (as rust-vmm's kvm-ioctls notes).
    vm.create_irq_chip()
    s = ffi.new("struct kvm_irqfd *")
    s.fd, s.gsi, s.flags = events[0].fileno(), 4, lib.KVM_IRQFD_FLAG_DEASSIGN
    assert ioctl(vm.fileno(), "KVM_IRQFD", s) == 0


def test_irqfd_resample(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    ev1, ev2, _ = events
    vm.register_irqfd(4, ev1, resample=ev2)
    vm.unregister_irqfd(4, ev1)
    # The kernel really reads the resample fd: -1 is refused.
    assert _errno_of(vm.register_irqfd, 4, ev1, -1) == errno.EBADF


def test_several_resample_irqfds_share_a_gsi(vm: Vm, events: list[EventFd]) -> None:
    # KVM keeps one resampler per GSI and lists every resample irqfd on it (a shared
    # level-triggered line): a second one is accepted, each with its own resample fd.
    vm.create_irq_chip()
    ev1, ev2, ev3 = events
    extra = EventFd()
    try:
        vm.register_irqfd(4, ev1, resample=ev2)
        vm.register_irqfd(4, ev3, resample=extra)
        # The same eventfd twice is still refused; each of the two can go on its own.
        assert _errno_of(vm.register_irqfd, 4, ev1, ev2) == errno.EEXIST
        vm.unregister_irqfd(4, ev1)
        vm.unregister_irqfd(4, ev3)
        assert _errno_of(vm.unregister_irqfd, 4, ev3) == errno.ENOENT
    finally:
        extra.close()


def test_irqfd_needs_irqchip(vm: Vm, events: list[EventFd]) -> None:
    assert _errno_of(vm.register_irqfd, 4, events[0]) == errno.EINVAL


def test_irqfd_gsi_out_of_range(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    assert _errno_of(vm.register_irqfd, 4096, events[0]) == errno.EINVAL
    assert _errno_of(vm.register_irqfd, -1, events[0]) == errno.EINVAL


# -- irqchip, PIT, IRQ lines -------------------------------------------------------------


def test_create_irq_chip(vm: Vm) -> None:
    vm.create_irq_chip()
    assert _errno_of(vm.create_irq_chip) == errno.EEXIST


def test_create_irq_chip_after_vcpu(vm: Vm) -> None:
    vm.create_vcpu(0)
    assert _errno_of(vm.create_irq_chip) == errno.EINVAL


def test_create_pit2(vm: Vm) -> None:
    assert _errno_of(vm.create_pit2) == errno.ENOENT   # needs the irqchip
    vm.create_irq_chip()
    vm.create_pit2()
    assert _errno_of(vm.create_pit2) == errno.EEXIST


def test_set_irq_line(vm: Vm) -> None:
    assert _errno_of(vm.set_irq_line, 4, True) == errno.ENXIO   # no irqchip
    vm.create_irq_chip()
    # GSI 4 reaches master PIC pin 4 and IOAPIC pin 4 (the default routes): raising it sets
    # both request registers, even with every pin masked.
    vm.set_irq_line(4, True)
    pic, ioapic = vm.get_irqchip(IrqChip.PIC_MASTER), vm.get_irqchip(IrqChip.IOAPIC)
    assert pic.irr == pic.last_irr == 1 << 4
    assert ioapic.irr == 1 << 4
    # Lowered: the IOAPIC request goes; the PIC keeps the latched edge (irr) until a CPU
    # takes it, but the line itself (last_irr) is low.
    vm.set_irq_line(4, False)
    pic, ioapic = vm.get_irqchip(IrqChip.PIC_MASTER), vm.get_irqchip(IrqChip.IOAPIC)
    assert (pic.irr, pic.last_irr, ioapic.irr) == (1 << 4, 0, 0)
    # GSI 23 exists on the IOAPIC only.
    vm.set_irq_line(23, True)
    assert vm.get_irqchip(IrqChip.IOAPIC).irr == 1 << 23
    assert vm.get_irqchip(IrqChip.PIC_SLAVE).irr == 0
    assert _errno_of(vm.set_irq_line, 4096, True) == errno.EINVAL


# -- GSI routing -------------------------------------------------------------------------


def test_a_full_routing_table_is_taken_and_one_more_route_refused(vm: Vm) -> None:
    vm.create_irq_chip()
    table = [MsiRoute(gsi, MSI_ADDRESS, 0x20 + gsi % 200) for gsi in range(4096)]
    vm.set_gsi_routing(table)  # KVM_MAX_IRQ_ROUTES exactly
    assert _errno_of(vm.set_gsi_routing, [*table, MsiRoute(1, MSI_ADDRESS, 0x30)]) \
        == errno.EINVAL


def test_set_gsi_routing(vm: Vm, events: list[EventFd]) -> None:
    assert _errno_of(vm.set_gsi_routing, []) == errno.EINVAL   # needs the irqchip
    vm.create_irq_chip()
    vcpu = boot_counter_guest(vm, pic_irqs=(4,), lapic_vectors=(MSI_VECTOR, 0x31))
    vm.set_gsi_routing([
        IrqChipRoute(0, IrqChip.PIC_MASTER, 0),
        IrqChipRoute(0, IrqChip.IOAPIC, 2),     # one GSI on two chips is fine
        IrqChipRoute(9, IrqChip.PIC_SLAVE, 1),
        IrqChipRoute(23, IrqChip.IOAPIC, 23),
        IrqChipRoute(30, IrqChip.PIC_MASTER, 4),  # any GSI may drive any pin
        MsiRoute(24, MSI_ADDRESS, MSI_VECTOR),
        MsiRoute(25, MSI_ADDRESS | 1 << 12, 0x31),  # destination APIC id 1: no such vCPU
    ])
    to_pic, to_msi, to_nobody = events
    vm.register_irqfd(30, to_pic)
    vm.register_irqfd(24, to_msi)
    vm.register_irqfd(25, to_nobody)
    guest = GuestThread(vcpu)
    wait_ready(vm.read)
    # The table is in force: GSI 30 arrives as PIC pin 4, GSI 24 as the MSI's vector.
    to_pic.write(1)
    assert wait_for_count(vm.read, PIC_VECTOR_BASE + 4, 1) == 1
    to_msi.write(1)
    assert wait_for_count(vm.read, MSI_VECTOR, 1) == 1
    to_nobody.write(1)
    time.sleep(NOT_DELIVERED_WAIT)
    assert counts(vm.read(COUNTERS, 256)) == {PIC_VECTOR_BASE + 4: 1, MSI_VECTOR: 1}
    # An empty table is allowed, and replaces the old one: nothing reaches the guest now.
    vm.set_gsi_routing([])
    for ev in events:
        ev.write(1)
    time.sleep(NOT_DELIVERED_WAIT)
    assert counts(vm.read(COUNTERS, 256)) == {PIC_VECTOR_BASE + 4: 1, MSI_VECTOR: 1}
    assert isinstance(guest.stop(), IntrExit)


@pytest.mark.parametrize("routes", [
    # Rejected by the kernel:
    [IrqChipRoute(1, IrqChip.PIC_MASTER, 1), IrqChipRoute(1, IrqChip.PIC_MASTER, 2)],
    [MsiRoute(1, MSI_ADDRESS, 0x30), MsiRoute(1, MSI_ADDRESS, 0x31)],
    [IrqChipRoute(1, IrqChip.PIC_MASTER, 1), MsiRoute(1, MSI_ADDRESS, 0x30)],
    # Rejected by the binding before the ioctl:
    [IrqChipRoute(1, IrqChip.PIC_MASTER, 8)],
    [IrqChipRoute(1, IrqChip.IOAPIC, 24)],
    [IrqChipRoute(4096, IrqChip.IOAPIC, 1)],
    [IrqChipRoute(1, 3, 1)],                    # type: ignore[arg-type]
    [MsiRoute(1, 1 << 64, 0)],
    [MsiRoute(1, MSI_ADDRESS, 1 << 32)],
    [MsiRoute(1, MSI_ADDRESS, 0x30, devid=1 << 32)],
    ["not a route"],                            # type: ignore[list-item]
], ids=["pic-twice", "msi-twice", "pic-and-msi", "pic-pin-8", "ioapic-pin-24",
        "gsi-4096", "chip-3", "msi-address-65-bits", "msi-data-33-bits", "msi-devid-33-bits",
        "not-a-route"])
def test_set_gsi_routing_invalid(vm: Vm, routes: list[object]) -> None:
    vm.create_irq_chip()
    assert _errno_of(vm.set_gsi_routing, routes) == errno.EINVAL


# -- MSI ---------------------------------------------------------------------------------


def test_signal_msi_needs_irqchip(vm: Vm) -> None:
    assert _errno_of(vm.signal_msi, MSI_ADDRESS, MSI_VECTOR) == errno.EINVAL


def test_signal_msi_invalid(vm: Vm) -> None:
    vm.create_irq_chip()
    assert _errno_of(vm.signal_msi, 1 << 64, 0) == errno.EINVAL
    assert _errno_of(vm.signal_msi, MSI_ADDRESS, 1 << 32) == errno.EINVAL
    # A device id must fit 32 bits: the first that does not is refused like the others.
    assert _errno_of(vm.signal_msi, MSI_ADDRESS, 0x30, 1 << 32) == errno.EINVAL
    assert _errno_of(vm.signal_msi, MSI_ADDRESS, 0x30, -1) == errno.EINVAL


def test_signal_msi_reaches_the_guest(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = boot_real_mode(vm, interrupt_program(MSI_VECTOR))
    assert run_guarded(vcpu) == _out(PIC_READY)
    # The local APIC is software-disabled after reset: the MSI is not delivered (0).
    assert vm.signal_msi(MSI_ADDRESS, MSI_VECTOR) == 0
    _enable_lapic(vcpu)
    assert vm.signal_msi(MSI_ADDRESS, MSI_VECTOR) == 1
    assert run_guarded(vcpu) == _out(MSI_VECTOR)


def test_msi_route_irqfd_reaches_the_guest(vm: Vm, events: list[EventFd]) -> None:
    vm.create_irq_chip()
    vcpu = boot_real_mode(vm, interrupt_program(MSI_VECTOR))
    _enable_lapic(vcpu)
    vm.set_gsi_routing([MsiRoute(30, MSI_ADDRESS, MSI_VECTOR)])
    vm.register_irqfd(30, events[0])
    assert run_guarded(vcpu) == _out(PIC_READY)
    events[0].write(1)
    assert run_guarded(vcpu) == _out(MSI_VECTOR)


# -- a guest that takes PIC interrupts ---------------------------------------------------


def test_irqfd_interrupts_a_halted_guest(vm: Vm, events: list[EventFd]) -> None:
    # With the in-kernel irqchip, HLT waits in the kernel: run() returns only when the
    # interrupt, injected by writing the eventfd from another thread, reaches the guest's
    # handler, which reports it with an OUT.
    vm.create_irq_chip()
    vcpu = boot_real_mode(vm, pic_irq_program(4))
    ev = events[0]
    vm.register_irqfd(4, ev)
    assert run_guarded(vcpu) == _out(PIC_READY)   # the PIC is programmed
    for _ in range(2):
        writer = _later(0.05, lambda: ev.write(1))
        assert run_guarded(vcpu) == _out(PIC_VECTOR_BASE + 4)
        writer.join()
    counts = vcpu.exit_counts()
    assert counts["hlt"] == 0
    stats = vcpu.stats().read()
    assert stats["halt_exits"] >= 2      # the kernel saw the HLTs; userspace did not
    assert stats["irq_injections"] >= 2


def test_irq_line_interrupts_the_guest(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = boot_real_mode(vm, pic_irq_program(3))
    assert run_guarded(vcpu) == _out(PIC_READY)
    vm.set_irq_line(3, True)
    vm.set_irq_line(3, False)
    assert run_guarded(vcpu) == _out(PIC_VECTOR_BASE + 3)


def test_masked_pic_pin_is_not_delivered(vm: Vm, events: list[EventFd]) -> None:
    # The program unmasks only IRQ4: IRQ5 stays pending in the PIC, then IRQ4 gets through.
    vm.create_irq_chip()
    vcpu = boot_real_mode(vm, pic_irq_program(4))
    vm.register_irqfd(5, events[1])
    vm.register_irqfd(4, events[0])
    assert run_guarded(vcpu) == _out(PIC_READY)
    events[1].write(1)
    writer = _later(0.05, lambda: events[0].write(1))
    assert run_guarded(vcpu) == _out(PIC_VECTOR_BASE + 4)
    writer.join()


# -- KVM_INTERRUPT and KVM_NMI (userspace irqchip) ---------------------------------------


def test_interrupt_without_irqchip(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, interrupt_program(0x40))
    assert run_guarded(vcpu) == _out(PIC_READY)
    assert isinstance(run_guarded(vcpu), HltExit)   # no irqchip: HLT exits to userspace
    vcpu.interrupt(0x40)
    assert run_guarded(vcpu) == _out(0x40)
    assert _errno_of(vcpu.interrupt, 256) == errno.EINVAL


def test_interrupt_with_irqchip_is_enxio(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.interrupt, 0x40) == errno.ENXIO


def test_nmi(vm: Vm) -> None:
    vcpu = boot_real_mode(vm, interrupt_program(2))   # NMI is vector 2
    assert run_guarded(vcpu) == _out(PIC_READY)
    assert isinstance(run_guarded(vcpu), HltExit)
    vcpu.nmi()
    assert run_guarded(vcpu) == _out(2)


def test_an_msis_upper_address_bits_reach_kvm(vm: Vm) -> None:
    # With the x2APIC API, KVM reads destination bits from the address's upper half and
    # refuses a set low byte there: a binding dropping address_hi would send it silently.
    vm.create_irq_chip()
    vm.enable_cap("KVM_CAP_X2APIC_API", (1,))
    vm.create_vcpu(0)
    bad = (1 << 32) | MSI_ADDRESS
    assert _errno_of(vm.set_gsi_routing, [MsiRoute(5, bad, 0x30)]) == errno.EINVAL
    assert _errno_of(vm.signal_msi, bad, 0x30) == errno.EINVAL
