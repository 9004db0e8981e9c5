"""Hypervisor service: GetInfo, CheckExtension, GetSupportedCpuid; and the server's extras."""

from __future__ import annotations

import grpc
from api_support import DaemonFactory, RunningDaemon
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmd import __version__
from kvmd.core.errors import Reason
from kvmd.kvm import CAPABILITY_NUMBERS, Kvm
from kvmd_proto import vmm_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_get_info_reports_kvm_and_daemon(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_vms=7, max_vcpus_per_vm=3, max_memory_per_vm_bytes=1 << 24,
                         max_memory_total_bytes=1 << 25, max_memory_slots_per_vm=5,
                         max_irqfds_per_vm=6, max_ioevents_per_vm=9,
                         max_message_bytes=3 << 20, max_concurrent_rpcs=33,
                         max_calls_per_identity=11, max_streams=444,
                         max_streams_per_identity=44, max_fds=555, max_fds_per_identity=55)
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    with Kvm() as kvm:
        assert info.api_version == 12
        assert info.vcpu_mmap_size == kvm.vcpu_mmap_size
        assert info.capabilities["KVM_CAP_IRQFD"] == kvm.check_extension("KVM_CAP_IRQFD") > 0
        assert info.capabilities["KVM_CAP_NR_MEMSLOTS"] == kvm.check_extension(
            "KVM_CAP_NR_MEMSLOTS")
    assert set(info.capabilities) == set(CAPABILITY_NUMBERS)
    assert info.page_size == 4096
    assert info.daemon_version == __version__
    assert (info.vm_count, info.memory_in_use_bytes) == (0, 0)
    lim = info.limits
    assert (lim.max_vms, lim.max_vcpus_per_vm, lim.max_memory_per_vm_bytes,
            lim.max_memory_total_bytes, lim.max_memory_slots_per_vm, lim.max_irqfds_per_vm,
            lim.max_ioevents_per_vm, lim.max_message_bytes, lim.max_concurrent_rpcs) == (
        7, 3, 1 << 24, 1 << 25, 5, 6, 9, 3 << 20, 33)
    assert (lim.max_calls_per_identity, lim.max_streams, lim.max_streams_per_identity,
            lim.max_fds, lim.max_fds_per_identity) == (11, 444, 44, 555, 55)


def test_get_info_counts_vms_and_memory(api: RunningDaemon) -> None:
    """GetInfo's vm_count, memory_in_use_bytes and fds_in_use follow the VMs there are."""
    api.create_vm("a")
    api.create_vm("b")
    api.add_memory("a", 0, 0x10000)
    api.add_memory("b", 0x100000, 0x3000)
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    assert (info.vm_count, info.memory_in_use_bytes) == (2, 0x13000)
    assert info.fds_in_use == api.daemon.host.fds.in_use > 0  # type: ignore[union-attr]
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="a"))
    info = api.hypervisor.GetInfo(pb.GetInfoRequest())
    assert (info.vm_count, info.memory_in_use_bytes) == (1, 0x3000)
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="b"))
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).fds_in_use == 0


def test_check_extension_by_full_name_short_name_and_number(api: RunningDaemon) -> None:
    number = CAPABILITY_NUMBERS["KVM_CAP_IRQFD"]
    by_name = api.hypervisor.CheckExtension(pb.CheckExtensionRequest(name="KVM_CAP_IRQFD"))
    by_short = api.hypervisor.CheckExtension(pb.CheckExtensionRequest(name="irqfd"))
    by_number = api.hypervisor.CheckExtension(pb.CheckExtensionRequest(number=number))
    assert by_name.value > 0
    assert (by_name.value, by_name.number) == (by_short.value, by_short.number) == (
        by_number.value, number)


def test_check_extension_on_a_vm(api: RunningDaemon) -> None:
    api.create_vm("capvm")
    with Kvm() as kvm, kvm.create_vm() as vm:
        expected = vm.check_extension("KVM_CAP_NR_MEMSLOTS")
    resp = api.hypervisor.CheckExtension(pb.CheckExtensionRequest(
        name="nr_memslots", vm_id="capvm"))
    assert resp.value == expected > 0
    assert resp.number == CAPABILITY_NUMBERS["KVM_CAP_NR_MEMSLOTS"]


def test_check_extension_unknown_number_is_zero(api: RunningDaemon) -> None:
    # The kernel answers 0 for capabilities it does not know: that is not an error.
    resp = api.hypervisor.CheckExtension(pb.CheckExtensionRequest(number=999_999))
    assert (resp.value, resp.number) == (0, 999_999)


def test_check_extension_bad_inputs(api: RunningDaemon) -> None:
    check = api.hypervisor.CheckExtension
    api.assert_code(lambda: check(pb.CheckExtensionRequest(name="KVM_CAP_NO_SUCH_THING")),
                    INVALID)
    api.assert_code(lambda: check(pb.CheckExtensionRequest(name="")), INVALID,
                    reason=Reason.FIELD_REQUIRED, field="name")
    api.assert_code(lambda: check(pb.CheckExtensionRequest()), INVALID,
                    reason=Reason.FIELD_REQUIRED, field="name")
    api.assert_code(lambda: check(pb.CheckExtensionRequest(name="irqfd", vm_id="nope")),
                    NOT_FOUND)


def test_get_supported_cpuid(api: RunningDaemon) -> None:
    entries = api.hypervisor.GetSupportedCpuid(pb.GetSupportedCpuidRequest()).entries
    with Kvm() as kvm:
        expected = kvm.get_supported_cpuid()
    assert len(entries) == len(expected) > 1
    leaf0 = next(e for e in entries if e.function == 0)
    assert leaf0.eax >= 1  # highest basic leaf
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")
    assert [(e.function, e.index, e.eax) for e in entries] == [
        (e.function, e.index, e.eax) for e in expected]


def test_health_and_reflection(api: RunningDaemon) -> None:
    for service in ["", "kvmd.v1.Vms", "kvmd.v1.Memory", "kvmd.v1.Vcpus"]:
        resp = api.stubs.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(api.stubs.channel)
    (answer,) = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"kvmd.v1.Hypervisor", "kvmd.v1.Vms", "kvmd.v1.Memory", "kvmd.v1.Interrupts",
            "kvmd.v1.IoEvents", "kvmd.v1.Vcpus", "grpc.health.v1.Health"} <= names
