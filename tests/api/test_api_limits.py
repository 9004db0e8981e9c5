"""Every daemon limit: reaching it is RESOURCE_EXHAUSTED, and freeing makes room again."""

from __future__ import annotations

import grpc
from api_support import GRPC_NATIVE, DaemonFactory

from kvmd.core.errors import Reason
from kvmd_proto import vmm_pb2 as pb

MiB = 1 << 20
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_vms(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_vms=2)
    api.create_vm("a")
    api.create_vm("b")
    err = api.assert_code(lambda: api.create_vm("c"), EXHAUSTED)
    assert "2" in err.details()  # type: ignore[attr-defined]
    assert [v.vm_id for v in api.vms.ListVms(pb.ListVmsRequest()).vms] == ["a", "b"]
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="a"))
    api.create_vm("c")


def test_max_vcpus_per_vm(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_vcpus_per_vm=2)
    api.create_vm("a")
    api.create_vm("b")
    api.create_vcpu("a", 0)
    api.create_vcpu("a", 5)
    api.assert_code(lambda: api.create_vcpu("a", 1), EXHAUSTED, reason=Reason.LIMIT_VCPUS)
    # An id in use is a duplicate first, whatever the limit says.
    api.assert_code(lambda: api.create_vcpu("a", 5), grpc.StatusCode.ALREADY_EXISTS,
                    reason=Reason.VCPU_ALREADY_EXISTS)
    api.create_vcpu("b", 0)  # per VM, not per daemon
    api.create_vcpu("b", 1)
    assert api.vms.GetVm(pb.GetVmRequest(vm_id="a")).vcpu_count == 2


def test_max_memory_per_vm(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_memory_per_vm_bytes=MiB)
    api.create_vm("a")
    api.create_vm("b")
    api.add_memory("a", 0, MiB // 2)
    api.assert_code(lambda: api.add_memory("a", MiB, MiB // 2 + 4096), EXHAUSTED)
    api.assert_code(lambda: api.add_memory("a", MiB, 2 * MiB), EXHAUSTED)
    api.add_memory("a", MiB, MiB // 2)  # exactly the limit
    api.assert_code(lambda: api.add_memory("a", 4 * MiB, 1), EXHAUSTED)  # rounds to a page
    api.add_memory("b", 0, MiB)  # per VM
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    assert info.memory_in_use_bytes == 2 * MiB  # refused requests reserved nothing


def test_max_memory_total(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_memory_per_vm_bytes=2 * MiB, max_memory_total_bytes=3 * MiB)
    api.create_vm("a")
    api.create_vm("b")
    api.add_memory("a", 0, 2 * MiB)
    api.assert_code(lambda: api.add_memory("b", 0, 2 * MiB), EXHAUSTED)
    api.add_memory("b", 0, MiB)
    api.assert_code(lambda: api.add_memory("b", 2 * MiB, 4096), EXHAUSTED)
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == 3 * MiB
    # Removing a region and deleting a VM both give memory back.
    api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id="b", slot=0))
    api.add_memory("b", 0, MiB)
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="a"))
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == MiB
    api.add_memory("b", 4 * MiB, MiB)


def test_max_memory_slots_per_vm(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_memory_slots_per_vm=3)
    api.create_vm("a")
    for i in range(3):
        api.add_memory("a", i * 0x10000, 0x1000)
    api.assert_code(lambda: api.add_memory("a", 0x100000, 0x1000), EXHAUSTED)
    api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id="a", slot=1))
    assert api.add_memory("a", 0x100000, 0x1000).slot == 1


def test_max_irqfds_per_vm(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_irqfds_per_vm=2)
    api.create_vm("a", irqchip=True)

    def register(irqfd_id: str) -> pb.Irqfd:
        return api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id="a", irqfd_id=irqfd_id, gsi=5))

    register("one")
    register("two")
    api.assert_code(lambda: register("three"), EXHAUSTED, reason=Reason.LIMIT_IRQFDS)
    api.interrupts.UnregisterIrqfd(pb.UnregisterIrqfdRequest(vm_id="a", irqfd_id="one"))
    register("three")


def test_max_ioevents_per_vm(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_ioevents_per_vm=2)
    api.create_vm("a")

    def register(ioevent_id: str, port: int) -> pb.Ioevent:
        return api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
            vm_id="a", ioevent_id=ioevent_id, space=pb.PIO, address=port))

    register("one", 0x10)
    register("two", 0x11)
    api.assert_code(lambda: register("three", 0x12), EXHAUSTED, reason=Reason.LIMIT_IOEVENTS)
    api.ioevents.UnregisterIoevent(pb.UnregisterIoeventRequest(vm_id="a", ioevent_id="one"))
    register("three", 0x12)


def test_max_message_bytes(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_message_bytes=MiB)
    api.create_vm("a")
    api.add_memory("a", 0, 2 * MiB)
    api.assert_code(lambda: api.write("a", 0, bytes(MiB + 1), chunk=MiB + 1), EXHAUSTED,
                    details=GRPC_NATIVE)
    assert api.write("a", 0, bytes(2 * MiB), chunk=MiB // 2) == 2 * MiB  # chunks fit
