"""Interrupts service: irq lines, GSI routing, MSIs and daemon-owned irqfds."""

from __future__ import annotations

import time

import grpc
import pytest
from api_support import RunningDaemon
from guests import PIC_VECTOR_BASE
from interrupt_guests import (
    COUNTERS,
    LAPIC_BASE,
    MSI_ADDRESS,
    counter_program,
    counts,
    lapic_enabled,
    wait_for_count,
    wait_ready,
)
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION

IOAPIC = pb.IrqChipPin.IOAPIC
PIC_MASTER = pb.IrqChipPin.PIC_MASTER
PIC_SLAVE = pb.IrqChipPin.PIC_SLAVE

MSI_VECTOR = 0x41
# How long an interrupt that must not arrive is given to arrive anyway (one arrives in well
# under a millisecond here).
NOT_DELIVERED_WAIT = 0.2


@pytest.fixture
def vm(api: RunningDaemon) -> str:
    api.create_vm("irq", irqchip=True)
    api.create_vcpu("irq")
    return "irq"


@pytest.fixture
def plain_vm(api: RunningDaemon) -> str:
    api.create_vm("plain")
    return "plain"


def _route(gsi: int, chip: int, pin: int) -> pb.IrqRoute:
    return pb.IrqRoute(gsi=gsi, irqchip=pb.IrqChipPin(chip=chip, pin=pin))  # type: ignore[arg-type]


def _msi_route(gsi: int, address: int = 0xFEE00000, data: int = 0x41) -> pb.IrqRoute:
    return pb.IrqRoute(gsi=gsi, msi=pb.MsiMessage(address=address, data=data))


class CountingGuest:
    """The `vm` fixture's VM running interrupt_guests.counter_program, set up and started over
    gRPC; `counts()` reads its interrupt counters back with ReadGuestMemory."""

    def __init__(self, api: RunningDaemon, vm_id: str, pic_irqs: tuple[int, ...] = (),
                 lapic_vectors: tuple[int, ...] = (), *, enable_lapic: bool = True) -> None:
        self.api, self.vm_id = api, vm_id
        api.add_memory(vm_id, 0, 0x10000)
        api.write(vm_id, 0x1000, counter_program(pic_irqs, lapic_vectors))
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        sregs = api.vcpus.GetSregs(ref)
        for seg in ("cs", "ds", "ss"):
            getattr(sregs, seg).base = getattr(sregs, seg).selector = 0
        sregs.es.base, sregs.es.selector = LAPIC_BASE, 0  # the handlers' LAPIC EOI
        api.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
        api.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0x1000, rsp=0x8000,
                                                                   rflags=2)))
        if enable_lapic:
            self.enable_lapic()

    def enable_lapic(self) -> None:
        ref = pb.VcpuRef(vm_id=self.vm_id, vcpu_id=0)
        page = self.api.vcpus.GetLapic(ref).regs
        self.api.vcpus.SetLapic(pb.SetLapicRequest(
            vcpu=ref, lapic=pb.Lapic(regs=lapic_enabled(page))))

    def start(self) -> None:
        self.api.vms.StartVm(pb.VmRef(vm_id=self.vm_id))
        wait_ready(self.read)

    def read(self, addr: int, length: int) -> bytes:
        return self.api.read(self.vm_id, addr, length)

    def counts(self) -> dict[int, int]:
        return counts(self.read(COUNTERS, 256))

    def wait_for(self, vector: int, count: int) -> int:
        return wait_for_count(self.read, vector, count)


def test_set_irq_line(api: RunningDaemon, vm: str) -> None:
    guest = CountingGuest(api, vm, pic_irqs=(3, 4))
    guest.start()
    # Each raise of a line the guest unmasked is one interrupt (the PIC is edge-triggered:
    # the next pulse only after the guest took the last one).
    for n in range(1, 4):
        api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=4, active=True))
        api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=4, active=False))
        assert guest.wait_for(PIC_VECTOR_BASE + 4, n) == n
    api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=3, active=True))
    assert guest.wait_for(PIC_VECTOR_BASE + 3, 1) == 1
    api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=3, active=False))
    # Lines the guest masked (PIC pin 0) or left alone (IOAPIC pin 23) do not interrupt it.
    for irq in (0, 23):
        api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=irq, active=True))
        api.interrupts.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=irq, active=False))
    time.sleep(NOT_DELIVERED_WAIT)
    assert guest.counts() == {PIC_VECTOR_BASE + 3: 1, PIC_VECTOR_BASE + 4: 3}


def test_set_gsi_routing(api: RunningDaemon, vm: str) -> None:
    guest = CountingGuest(api, vm, pic_irqs=(4,), lapic_vectors=(MSI_VECTOR,))
    routes = [_route(0, PIC_MASTER, 0), _route(0, IOAPIC, 2), _route(9, PIC_SLAVE, 1),
              _route(9, IOAPIC, 9), _route(23, IOAPIC, 23), _msi_route(24, data=MSI_VECTOR),
              _msi_route(25, address=MSI_ADDRESS | 1 << 12),  # APIC id 1: no such vCPU
              _route(30, PIC_MASTER, 4)]                        # any GSI may drive any pin
    api.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id=vm, routes=routes))
    for irqfd_id, gsi in (("msi", 24), ("nobody", 25), ("pin4", 30)):
        api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=vm, irqfd_id=irqfd_id,
                                                             gsi=gsi))
    guest.start()

    def trigger(irqfd_id: str) -> None:
        api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id=vm, irqfd_id=irqfd_id))

    # The new table is in force: GSI 24 arrives as its MSI's vector, GSI 30 as PIC pin 4,
    # and GSI 25's MSI (for a vCPU that does not exist) nowhere.
    trigger("msi")
    assert guest.wait_for(MSI_VECTOR, 1) == 1
    trigger("pin4")
    assert guest.wait_for(PIC_VECTOR_BASE + 4, 1) == 1
    trigger("nobody")
    time.sleep(NOT_DELIVERED_WAIT)
    assert guest.counts() == {MSI_VECTOR: 1, PIC_VECTOR_BASE + 4: 1}
    # An empty table is allowed too, and replaces the old one: no GSI reaches the guest now.
    api.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id=vm))
    for irqfd_id in ("msi", "nobody", "pin4"):
        trigger(irqfd_id)
    time.sleep(NOT_DELIVERED_WAIT)
    assert guest.counts() == {MSI_VECTOR: 1, PIC_VECTOR_BASE + 4: 1}


def test_msi_with_devid(api: RunningDaemon, vm: str) -> None:
    # x86 KVM accepts KVM_MSI_VALID_DEVID on MSI routes and KVM_SIGNAL_MSI, and ignores it:
    # both MSIs below reach the guest.
    guest = CountingGuest(api, vm, lapic_vectors=(0x30, 0x31))
    route = pb.IrqRoute(gsi=30, msi=pb.MsiMessage(address=MSI_ADDRESS, data=0x31, devid=7))
    api.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id=vm, routes=[route]))
    api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=vm, irqfd_id="dev", gsi=30))
    guest.start()
    assert api.interrupts.SignalMsi(pb.SignalMsiRequest(
        vm_id=vm, msi=pb.MsiMessage(address=MSI_ADDRESS, data=0x30, devid=7))).delivered
    assert guest.wait_for(0x30, 1) == 1
    api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id=vm, irqfd_id="dev"))
    assert guest.wait_for(0x31, 1) == 1
    assert guest.counts() == {0x30: 1, 0x31: 1}


def test_signal_msi(api: RunningDaemon, vm: str) -> None:
    msi = pb.SignalMsiRequest(vm_id=vm, msi=pb.MsiMessage(address=MSI_ADDRESS, data=0x30))
    guest = CountingGuest(api, vm, lapic_vectors=(0x30,), enable_lapic=False)
    # The LAPIC is software-disabled after reset: the MSI is refused, not queued.
    assert api.interrupts.SignalMsi(msi).delivered is False
    guest.enable_lapic()
    guest.start()
    for n in range(1, 4):
        assert api.interrupts.SignalMsi(msi).delivered is True
        assert guest.wait_for(0x30, n) == n
    assert guest.counts() == {0x30: 3}  # the one refused before never arrived


def test_an_msi_no_vcpu_can_take_is_not_delivered_and_no_error(api: RunningDaemon,
                                                                vm: str) -> None:
    """KVM answers EPERM for an MSI without a destination: that is delivered=false, as for a
    disabled LAPIC, not a failure of the call."""
    api.create_vm("no-vcpus", irqchip=True)
    for vm_id, address in (("no-vcpus", MSI_ADDRESS),      # no vCPU at all
                           (vm, MSI_ADDRESS | 5 << 12)):   # APIC ID 5: no such vCPU
        reply = api.interrupts.SignalMsi(pb.SignalMsiRequest(
            vm_id=vm_id, msi=pb.MsiMessage(address=address, data=0x30)))
        assert reply.delivered is False
    api.assert_healthy()


def test_irqfd_lifecycle(api: RunningDaemon, vm: str) -> None:
    a = api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=vm, irqfd_id="a", gsi=5))
    b = api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id=vm, irqfd_id="b", gsi=10, resample=True))
    assert (a.vm_id, a.irqfd_id, a.gsi, a.resample, a.triggers, a.resamples) == (
        vm, "a", 5, False, 0, 0)
    assert (b.irqfd_id, b.gsi, b.resample) == ("b", 10, True)

    for _ in range(3):
        api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id=vm, irqfd_id="a"))
    api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id=vm, irqfd_id="b"))
    listed = api.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm)).irqfds
    assert sorted((i.irqfd_id, i.gsi, i.resample, i.triggers) for i in listed) == [
        ("a", 5, False, 3), ("b", 10, True, 1)]

    api.interrupts.UnregisterIrqfd(pb.UnregisterIrqfdRequest(vm_id=vm, irqfd_id="a"))
    listed = api.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm)).irqfds
    assert [i.irqfd_id for i in listed] == ["b"]
    api.assert_code(lambda: api.interrupts.TriggerIrqfd(
        pb.TriggerIrqfdRequest(vm_id=vm, irqfd_id="a")), NOT_FOUND)
    # The id (and its gsi) can be used again.
    api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=vm, irqfd_id="a", gsi=5))


def test_two_irqfds_on_one_gsi(api: RunningDaemon, vm: str) -> None:
    for name in ("x", "y"):
        api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id=vm, irqfd_id=name, gsi=7))
    assert len(api.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm)).irqfds) == 2


def test_watch_irqfd_resamples_ends_on_cancel(api: RunningDaemon, vm: str) -> None:
    """A client that cancels its watch ends it in the daemon too: the subscription goes."""
    resampled = api.daemon.host.get_vm(vm).irqfd_resampled
    stream = api.interrupts.WatchIrqfdResamples(pb.WatchIrqfdResamplesRequest(vm_id=vm))
    wait_until(lambda: resampled.subscriber_count == 1, 10, "the watch to subscribe")
    stream.cancel()
    wait_until(lambda: resampled.subscriber_count == 0, 10,
               "the daemon to drop the cancelled watch")
    # Others can still watch.
    again = api.interrupts.WatchIrqfdResamples(pb.WatchIrqfdResamplesRequest(vm_id=vm))
    wait_until(lambda: resampled.subscriber_count == 1, 10, "a new watch to subscribe")
    again.cancel()
    api.assert_healthy()


def test_irq_bad_inputs_unknown_vm(api: RunningDaemon) -> None:
    i = api.interrupts
    api.assert_code(lambda: i.SetIrqLine(pb.SetIrqLineRequest(vm_id="nope", irq=1)), NOT_FOUND)
    api.assert_code(lambda: i.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id="nope")), NOT_FOUND)
    api.assert_code(lambda: i.SignalMsi(pb.SignalMsiRequest(vm_id="nope")), NOT_FOUND)
    api.assert_code(lambda: i.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id="nope", irqfd_id="a", gsi=1)), NOT_FOUND)
    api.assert_code(lambda: i.TriggerIrqfd(pb.TriggerIrqfdRequest(
        vm_id="nope", irqfd_id="a")), NOT_FOUND)
    api.assert_code(lambda: i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(
        vm_id="nope", irqfd_id="a")), NOT_FOUND)
    api.assert_code(lambda: i.ListIrqfds(pb.ListIrqfdsRequest(vm_id="nope")), NOT_FOUND)
    api.assert_code(lambda: list(i.WatchIrqfdResamples(
        pb.WatchIrqfdResamplesRequest(vm_id="nope"))), NOT_FOUND)


def test_irq_without_irqchip_is_failed_precondition(api: RunningDaemon, plain_vm: str) -> None:
    i, vm = api.interrupts, plain_vm
    api.assert_code(lambda: i.SetIrqLine(pb.SetIrqLineRequest(vm_id=vm, irq=1)), PRECONDITION)
    api.assert_code(lambda: i.SetGsiRouting(pb.SetGsiRoutingRequest(
        vm_id=vm, routes=[_route(1, IOAPIC, 1)])), PRECONDITION)
    api.assert_code(lambda: i.SignalMsi(pb.SignalMsiRequest(
        vm_id=vm, msi=pb.MsiMessage(address=0xFEE00000, data=0x30))), PRECONDITION)
    api.assert_code(lambda: i.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id=vm, irqfd_id="a", gsi=1)), PRECONDITION)
    assert list(i.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm)).irqfds) == []


def test_set_irq_line_out_of_range(api: RunningDaemon, vm: str) -> None:
    api.assert_code(lambda: api.interrupts.SetIrqLine(
        pb.SetIrqLineRequest(vm_id=vm, irq=4096, active=True)), INVALID)
    api.assert_code(lambda: api.interrupts.SetIrqLine(
        pb.SetIrqLineRequest(vm_id=vm, irq=2**32 - 1, active=True)), INVALID)


@pytest.mark.parametrize("route", [
    pytest.param(_route(1, IOAPIC, 24), id="ioapic-pin-24"),
    pytest.param(_route(1, PIC_MASTER, 8), id="pic-master-pin-8"),
    pytest.param(_route(1, PIC_SLAVE, 8), id="pic-slave-pin-8"),
    pytest.param(_route(1, IOAPIC, 2**32 - 1), id="pin-2^32-1"),
    pytest.param(_route(4096, IOAPIC, 1), id="gsi-4096"),
    pytest.param(_msi_route(2**32 - 1), id="msi-gsi-2^32-1"),
    pytest.param(pb.IrqRoute(gsi=1), id="no-target"),
    pytest.param(_route(1, 3, 1), id="unknown-chip-3"),
])
def test_set_gsi_routing_invalid_entry(api: RunningDaemon, vm: str, route: pb.IrqRoute) -> None:
    good = _route(0, IOAPIC, 2)
    api.assert_code(lambda: api.interrupts.SetGsiRouting(
        pb.SetGsiRoutingRequest(vm_id=vm, routes=[good, route])), INVALID)


@pytest.mark.parametrize("pair", [
    pytest.param((_msi_route(30, data=1), _msi_route(30, data=2)), id="two-msi-one-gsi"),
    pytest.param((_route(5, IOAPIC, 5), _msi_route(5)), id="irqchip-and-msi-one-gsi"),
    pytest.param((_route(5, IOAPIC, 5), _route(5, IOAPIC, 6)), id="one-chip-twice-one-gsi"),
])
def test_set_gsi_routing_conflicting_entries(api: RunningDaemon, vm: str,
                                             pair: tuple[pb.IrqRoute, pb.IrqRoute]) -> None:
    # One GSI may reach several irqchips, but each chip once, and an MSI only alone.
    api.assert_code(lambda: api.interrupts.SetGsiRouting(
        pb.SetGsiRoutingRequest(vm_id=vm, routes=list(pair))), INVALID)


def test_set_gsi_routing_too_many_routes(api: RunningDaemon, vm: str) -> None:
    routes = [_msi_route(gsi % 4096, data=gsi) for gsi in range(4097)]
    api.assert_code(lambda: api.interrupts.SetGsiRouting(
        pb.SetGsiRoutingRequest(vm_id=vm, routes=routes)), INVALID)


def test_irqfd_bad_inputs(api: RunningDaemon, vm: str) -> None:
    i = api.interrupts

    def register(irqfd_id: str, gsi: int = 5, resample: bool = False) -> pb.Irqfd:
        return i.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id=vm, irqfd_id=irqfd_id, gsi=gsi, resample=resample))

    register("taken", resample=True)
    api.assert_code(lambda: register("taken", gsi=6), EXISTS)                # duplicate id
    # A second resample irqfd on the GSI shares its resampler, as KVM allows.
    assert register("second", resample=True).resample
    i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(vm_id=vm, irqfd_id="second"))
    api.assert_code(lambda: register("far", gsi=4096), INVALID)
    api.assert_code(lambda: register(""), INVALID)
    api.assert_code(lambda: register("x" * 65), INVALID)
    api.assert_code(lambda: register("bad id"), INVALID)
    api.assert_code(lambda: register("bad/id"), INVALID)
    api.assert_code(lambda: i.TriggerIrqfd(pb.TriggerIrqfdRequest(
        vm_id=vm, irqfd_id="never")), NOT_FOUND)
    api.assert_code(lambda: i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(
        vm_id=vm, irqfd_id="never")), NOT_FOUND)
    i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(vm_id=vm, irqfd_id="taken"))
    api.assert_code(lambda: i.UnregisterIrqfd(pb.UnregisterIrqfdRequest(
        vm_id=vm, irqfd_id="taken")), NOT_FOUND)                            # double unregister
    assert list(i.ListIrqfds(pb.ListIrqfdsRequest(vm_id=vm)).irqfds) == []
