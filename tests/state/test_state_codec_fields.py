"""Fields of the saved VM state that must survive a snapshot and its restore (register files,
routes, interrupt controllers, queued interrupts, TSC rate, file mappings, VM options), and
saved state of the wrong shape refused as the daemon's own STATE_INVALID. In process on the
real /dev/kvm, through the API where a client can see it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from guests import SPIN, boot
from polling import wait_until
from state_guests import CODE_ADDR, CODE_SEGMENT, COUNTER_SOURCE, STACK_TOP, assemble
from state_support import Node, NodeFactory, rewrite

from kvmd.core.errors import Reason
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import IrqChip
from kvmd.state.format import SnapshotReader, as_message
from kvmd.state.snapshot import SnapshotTaker, restore_bytes
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
P = 4096


# -- helpers ----------------------------------------------------------------------------------

def reason(err: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a kvmd error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no rich status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no google.rpc.ErrorInfo")


def assert_state_invalid(node: Node, data: bytes, words: str) -> None:
    """RestoreVm of `data` fails INVALID_ARGUMENT / STATE_INVALID naming `words`, leaving no
    VM behind."""
    before = node.vm_ids()
    with pytest.raises(grpc.RpcError) as err:
        node.restore("new", data)
    assert err.value.code() == INVALID, err.value.details()  # type: ignore[attr-defined]
    assert reason(err.value) == Reason.STATE_INVALID
    assert words in (err.value.details() or "")  # type: ignore[attr-defined]
    assert node.vm_ids() == before and node.healthy()


def saved_vm(data: bytes) -> pb.SavedVm:
    """The VM state record of a (full) snapshot."""
    reader = SnapshotReader()
    for record in reader.feed(data):
        msg = as_message(record)
        if msg.HasField("vm"):
            return msg.vm
    raise AssertionError("no VM state in the snapshot")


def resnapshot(host: Host, vm: ManagedVm, vm_id: str) -> tuple[ManagedVm, pb.SavedVm]:
    """Snapshot `vm`, restore it as `vm_id` and return the copy with its own saved state."""
    restored = restore_bytes(host, vm_id, "local", iter([b"".join(SnapshotTaker(vm))]))
    return restored, saved_vm(b"".join(SnapshotTaker(restored)))


@pytest.fixture
def devices_snapshot(node: Node) -> bytes:
    """A snapshot of a counting guest with the in-kernel irqchip and PIT and an ioevent."""
    node.boot("src", COUNTER_SOURCE, irqchip=True, pit=True)
    node.stubs.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="src", ioevent_id="kick", space=pb.PIO, address=0x700, length=1))
    node.start("src")
    node.wait_u32("src", 0x2000, 3)
    data, _ = node.snapshot("src")
    return data


def edit_vm(edit: Callable[[pb.SavedVm], None]) -> Callable[[pb.SnapshotRecord], None]:
    """A `rewrite` edit that applies `edit` to the VM state record."""
    def apply(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            edit(r.vm)
    return apply


# -- codec: the API's register files and routes -----------------------------------------------

def test_fpu_status_word_and_last_pointers_roundtrip(node: Node) -> None:
    """SetFpu/GetFpu keep fsw, last_ip and last_dp each in its own field (a codec that
    swapped or duplicated them would change the guest's x87 state)."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="fpu"))
    s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="fpu", vcpu_id=0))
    ref = pb.VcpuRef(vm_id="fpu", vcpu_id=0)
    fpu = s.vcpus.GetFpu(ref)
    fpu.fcw, fpu.fsw = 0x37F, 0x3800
    fpu.last_ip, fpu.last_dp = 0x1122_3344, 0x5566_7788
    s.vcpus.SetFpu(pb.SetFpuRequest(vcpu=ref, fpu=fpu))
    got = s.vcpus.GetFpu(ref)
    assert (got.fcw, got.fsw, got.last_ip, got.last_dp) == (0x37F, 0x3800, 0x1122_3344,
                                                             0x5566_7788)


def test_a_route_without_a_target_is_state_invalid(node: Node) -> None:
    """SetGsiRouting with a route that is neither irqchip nor msi: INVALID_ARGUMENT with
    the reason STATE_INVALID, and the VM is unharmed."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="r", options=pb.VmOptions(irqchip=True)))
    with pytest.raises(grpc.RpcError) as err:
        s.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id="r",
                                                           routes=[pb.IrqRoute(gsi=3)]))
    assert err.value.code() == INVALID  # type: ignore[attr-defined]
    assert reason(err.value) == Reason.STATE_INVALID
    assert "no target" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert node.state("r") == "created" and node.healthy()


# -- codec: state that must survive a snapshot and restore ------------------------------------

def test_an_msi_route_with_devid_0_keeps_its_devid(node: Node) -> None:
    """devid 0 is a device id, not "none": the snapshot carries it and the restored VM's
    routes still have it."""
    s = node.stubs
    node.boot("m", COUNTER_SOURCE, irqchip=True)
    routes = [pb.IrqRoute(gsi=0, irqchip=pb.IrqChipPin(chip=pb.IrqChipPin.PIC_MASTER, pin=0)),
              pb.IrqRoute(gsi=24, msi=pb.MsiMessage(address=0xFEE00000, data=0x41, devid=0))]
    s.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id="m", routes=routes))
    data, _ = node.snapshot("m")
    msi = saved_vm(data).gsi_routes[1].msi
    assert msi.HasField("devid") and msi.devid == 0
    node.restore("m2", data)
    again, _ = node.snapshot("m2")
    msi = saved_vm(again).gsi_routes[1].msi
    assert msi.HasField("devid") and msi.devid == 0


def test_an_empty_custom_routing_stays_empty_after_a_restore(node: Node) -> None:
    """A VM given an empty GSI routing (every default route removed) is restored with an
    empty routing, not with the kernel's default routes."""
    node.boot("e", COUNTER_SOURCE, irqchip=True)
    node.stubs.interrupts.SetGsiRouting(pb.SetGsiRoutingRequest(vm_id="e", routes=[]))
    data, _ = node.snapshot("e")
    assert saved_vm(data).custom_gsi_routes
    node.restore("e2", data)
    again, _ = node.snapshot("e2")
    saved = saved_vm(again)
    assert saved.custom_gsi_routes and len(saved.gsi_routes) == 0


def test_ioevent_datamatch_0_and_resample_irqfds_survive_a_restore(node: Node) -> None:
    """An ioevent matching the value 0 stays a datamatch ioevent (not a wildcard), and a
    resample irqfd stays level-triggered with its resample eventfd."""
    s = node.stubs
    node.boot("d", COUNTER_SOURCE, irqchip=True)
    s.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="d", ioevent_id="zero", space=pb.PIO, address=0x700, length=1, datamatch=0))
    s.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id="d", irqfd_id="lvl", gsi=5,
                                                       resample=True))
    data, _ = node.snapshot("d")
    node.restore("d2", data)
    [ev] = s.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id="d2")).ioevents
    assert ev.HasField("datamatch") and ev.datamatch == 0
    [fd] = s.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id="d2")).irqfds
    assert fd.irqfd_id == "lvl" and fd.resample


def test_strict_io_survives_a_restore(node: Node) -> None:
    """VmOptions.strict_io (unclaimed port/MMIO accesses crash the guest) is part of the
    saved VM: the restored VM has it too."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="s", options=pb.VmOptions(strict_io=True)))
    data, _ = node.snapshot("s")
    vm = node.restore("s2", data)
    assert vm.options.strict_io
    assert s.vms.GetVm(pb.GetVmRequest(vm_id="s2")).options.strict_io


EXIT_ZERO_SOURCE = r"""
    .code16
start:
    mov $0x600, %dx
    xor %al, %al
    out %al, %dx                # the debug-exit port: exit code 0
    hlt
"""


def test_exit_code_0_survives_a_restore(node: Node) -> None:
    """A VM stopped with exit code 0 (through its debug-exit port) is restored with
    exit_code 0 set, not with no exit code at all."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="x", options=pb.VmOptions(debug_exit_port=0x600)))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="x", guest_addr=0, size=0x40000))
    node.write("x", CODE_ADDR, assemble(EXIT_ZERO_SOURCE))
    ref = pb.VcpuRef(vm_id="x", vcpu_id=0)
    s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="x", vcpu_id=0))
    sregs = s.vcpus.GetSregs(ref)
    sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
    s.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
    s.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rsp=STACK_TOP, rflags=2)))
    node.start("x")
    deadline = time.monotonic() + 10
    while not (vm := s.vms.GetVm(pb.GetVmRequest(vm_id="x"))).HasField("exit_code"):
        assert time.monotonic() < deadline, "the guest did not exit"
        time.sleep(0.01)
    assert vm.exit_code == 0
    data, _ = node.snapshot("x")
    node.restore("x2", data)
    restored = s.vms.GetVm(pb.GetVmRequest(vm_id="x2"))
    assert restored.HasField("exit_code") and restored.exit_code == 0


def test_ioapic_select_and_pit_flags_survive_a_restore(host: Host) -> None:
    """The IOAPIC's register select (IOREGSEL) and the PIT's flags (HPET legacy mode) are
    restored as saved: a guest between selecting and reading a register reads the right
    one, and the PIT stays off when the HPET drives IRQ 0."""
    vm = host.create_vm("io", {}, VmOptions(irqchip=True, pit=True))
    ioapic = vm.vm.get_irqchip(IrqChip.IOAPIC)
    ioapic.ioregsel = 0x12
    vm.vm.set_irqchip(IrqChip.IOAPIC, ioapic)
    pit = vm.vm.get_pit2()
    pit.flags = 1  # KVM_PIT_FLAGS_HPET_LEGACY
    vm.vm.set_pit2(pit)
    _, saved = resnapshot(host, vm, "io2")
    assert saved.irqchip.ioapic.ioregsel == 0x12
    assert saved.pit.flags == 1
    host.delete_vm("io2")


def test_the_guest_tsc_rate_survives_a_restore(host: Host) -> None:
    """A vCPU whose TSC runs at a rate other than the host's is restored at that rate (the
    guest's notion of time depends on it)."""
    vm = host.create_vm("tsc", {}, VmOptions())
    v = vm.create_vcpu(0).vcpu
    rate = v.get_tsc_khz() + 100_000  # faster than the host: possible without TSC scaling
    v.set_tsc_khz(rate)
    restored = restore_bytes(host, "tsc2", "local", iter([b"".join(SnapshotTaker(vm))]))
    assert restored.vcpu(0).vcpu.get_tsc_khz() == rate
    host.delete_vm("tsc2")


def test_queued_interrupts_survive_a_restore(host: Host) -> None:
    """Interrupts injected (without the in-kernel irqchip) and not yet delivered are part of
    the vCPU's state: the restored vCPU still has them queued."""
    vm = host.create_vm("irq", {}, VmOptions())
    vm.add_memory_region(0, 0x40000, False, False)
    mv = vm.create_vcpu(0)
    mv.inject_interrupt(0x30)
    mv.inject_interrupt(0x31)
    _, saved = resnapshot(host, vm, "irq2")
    assert list(saved.vcpus[0].pending_irqs) == [0x30, 0x31]
    host.delete_vm("irq2")


def test_the_vcpus_cpu_time_goes_on_from_the_saved_one(host: Host) -> None:
    """Like the exit counters, the vCPU's CPU time travels with its state: the restored
    VM's kvmd_vcpu_cpu_seconds_total starts where the saved one was, not at 0."""
    vm = host.create_vm("cpu", {}, VmOptions())
    boot(vm, SPIN)
    mv = vm.vcpu(0)
    mv.start()
    wait_until(lambda: mv.cpu_seconds() > 0.02, 30, "the guest's CPU time")
    vm.pause()
    spent = mv.cpu_seconds()
    data = b"".join(SnapshotTaker(vm))
    saved_ns = saved_vm(data).vcpus[0].cpu_ns
    assert saved_ns >= spent * 1e9  # (the parked thread may have used a little since)
    restored = restore_bytes(host, "cpu2", "local", iter([data]))
    # (its own thread, parked at once as the snapshot was of a paused VM, adds a little)
    assert restored.vcpu(0).cpu_seconds() >= saved_ns / 1e9
    host.delete_vm("cpu2")
    host.delete_vm("cpu")


def test_a_file_mapped_at_a_file_offset_is_restored_from_that_offset(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    """A mapping of an images-directory file that starts inside the file is restored from
    the same place in the file (the guest sees the same bytes)."""
    images = tmp_path / "images"
    images.mkdir(mode=0o750)
    (images / "disk.img").write_bytes(b"".join(bytes([i]) * P for i in range(1, 9)))
    node = node_factory(images_dir=str(images))
    node.boot("f", COUNTER_SOURCE)
    node.stubs.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="f", slot=0, offset=0x30000, size=2 * P,
        file=pb.MemoryFile(name="disk.img", offset=4 * P)))
    assert node.read("f", 0x30000, 2 * P) == b"\x05" * P + b"\x06" * P
    data, _ = node.snapshot("f")
    node.restore("f2", data)
    assert node.read("f2", 0x30000, 2 * P) == b"\x05" * P + b"\x06" * P


# -- codec: saved state of the wrong shape is refused -----------------------------------------

def test_an_ioapic_or_pit_of_the_wrong_shape_is_refused(node: Node,
                                                       devices_snapshot: bytes) -> None:
    """An IOAPIC with fewer than its 24 redirection entries, or a PIT with fewer than 3
    channels, is STATE_INVALID (not padded, not a kernel error)."""
    def short_ioapic(vm: pb.SavedVm) -> None:
        del vm.irqchip.ioapic.redirtbl[-1]
    assert_state_invalid(node, rewrite(devices_snapshot, edit_vm(short_ioapic)),
                         "redirection entries")

    def two_channels(vm: pb.SavedVm) -> None:
        del vm.pit.channels[-1]
    assert_state_invalid(node, rewrite(devices_snapshot, edit_vm(two_channels)),
                         "2 channels, not 3")


def test_debug_registers_need_four_breakpoints(node: Node, devices_snapshot: bytes) -> None:
    """Saved debug registers with 3 breakpoint addresses instead of 4: STATE_INVALID."""
    def three(vm: pb.SavedVm) -> None:
        assert vm.vcpus[0].has_debugregs
        del vm.vcpus[0].debugregs.db[-1]
    assert_state_invalid(node, rewrite(devices_snapshot, edit_vm(three)), "breakpoints")


def test_an_ioevent_in_an_unknown_address_space_is_refused(node: Node,
                                                          devices_snapshot: bytes) -> None:
    """A saved ioevent whose space is neither PIO nor MMIO: STATE_INVALID naming it."""
    def unknown(vm: pb.SavedVm) -> None:
        vm.ioevents[0].space = 7  # type: ignore[assignment]
    assert_state_invalid(node, rewrite(devices_snapshot, edit_vm(unknown)),
                         "unknown address space")
