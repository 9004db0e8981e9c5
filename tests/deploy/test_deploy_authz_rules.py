"""The per-RPC rules of kvmd.api.auth that test_deploy_authz's mTLS tests do not reach,
driven over the Unix socket, whose caller is the identity "local": the metadata reads a
viewer may make (irqfd and ioevent lists, the host's supported CPUID), the host methods an
operator may call without naming a VM, the viewer's guest-data refusal, and reflection,
which stays open to a caller without a role."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inprocess_daemon import raw_stubs

from kvmd.core.vm import VmOptions
from kvmd.server import Daemon
from kvmd_proto import vmm_pb2 as pb

T = 10  # seconds, per RPC


def code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined,no-any-return]
    return grpc.StatusCode.OK


def local_as(start_daemon: Callable[..., Daemon], role: str) -> Daemon:
    """A daemon whose policy gives the Unix socket's caller `role`, holding a VM "other-vm"
    that another identity owns."""
    d = start_daemon(authorization={"identities": [{"name": "local", "role": role},
                                                   {"name": "admin-1", "role": "admin"}]})
    assert d.host is not None
    d.host.create_vm("other-vm", {}, VmOptions(), owner="admin-1")
    return d


def test_viewer_lists_irqfds_and_ioevents_of_any_vm_and_the_supported_cpuid(
        start_daemon: Callable[..., Daemon]) -> None:
    """Irqfd and ioevent lists are a VM's metadata, the supported CPUID the host's: a
    viewer reads them, for VMs it does not own too."""
    s = raw_stubs(local_as(start_daemon, "viewer"))
    try:
        assert list(s.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id="other-vm"),
                                            timeout=T).irqfds) == []
        assert list(s.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id="other-vm"),
                                            timeout=T).ioevents) == []
        assert len(s.hypervisor.GetSupportedCpuid(pb.GetSupportedCpuidRequest(),
                                                  timeout=T).entries) > 0
        # ... but never the guest's data, whichever RPC carries it; the refusal says why.
        for call in (
                lambda: next(iter(s.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="other-vm"),
                                                      timeout=T))),
                lambda: next(iter(s.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
                    vm_id="other-vm", guest_addr=0, length=16), timeout=T))),
                lambda: next(iter(s.snapshots.SnapshotVm(pb.SnapshotVmRequest(
                    vm_id="other-vm"), timeout=T))),
                lambda: s.vcpus.GetRegs(pb.VcpuRef(vm_id="other-vm", vcpu_id=0), timeout=T)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "reads guest data" in err.value.details()  # type: ignore[attr-defined]
    finally:
        s.close()


def test_operator_calls_the_host_methods_without_naming_a_vm(
        start_daemon: Callable[..., Daemon]) -> None:
    """GetInfo, CheckExtension (without a VM), GetSupportedCpuid and ListVms are about the
    host: an operator calls them without naming a VM; another identity's VM stays hidden."""
    s = raw_stubs(local_as(start_daemon, "operator"))
    try:
        assert len(s.hypervisor.GetSupportedCpuid(pb.GetSupportedCpuidRequest(),
                                                  timeout=T).entries) > 0
        assert s.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=T).api_version == 12
        assert s.hypervisor.CheckExtension(pb.CheckExtensionRequest(name="KVM_CAP_IRQFD"),
                                           timeout=T).value > 0
        assert list(s.vms.ListVms(pb.ListVmsRequest(), timeout=T).vms) == []
        assert code(lambda: s.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id="other-vm"),
                                                    timeout=T)) == grpc.StatusCode.NOT_FOUND
    finally:
        s.close()


def test_a_viewer_without_a_vm_id_gets_invalid_argument(
        start_daemon: Callable[..., Daemon]) -> None:
    """A viewer may call the VM reads: one that names no VM is a malformed request
    (INVALID_ARGUMENT), not a missing permission (an operator, who may act only on its own
    VMs, is denied a VM call that names none)."""
    s = raw_stubs(local_as(start_daemon, "viewer"))
    try:
        for call in (lambda: s.vms.GetVm(pb.GetVmRequest(vm_id=""), timeout=T),
                     lambda: s.vcpus.ListVcpus(pb.ListVcpusRequest(vm_id=""), timeout=T),
                     lambda: s.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=""),
                                                        timeout=T)):
            assert code(call) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        s.close()


def list_services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=T)
    return {s.name for reply in replies for s in reply.list_services_response.service}


@pytest.mark.parametrize("policy", [
    [{"name": "admin-1", "role": "admin"}],  # the Unix socket's caller has no role
    [{"name": "local", "role": "viewer"}],   # a viewer, who may call only what it reads
])
def test_health_and_reflection_are_open_to_every_caller(
        start_daemon: Callable[..., Daemon], policy: list[dict[str, str]]) -> None:
    s = raw_stubs(start_daemon(authorization={"identities": policy}))
    try:
        assert "kvmd.v1.Vms" in list_services(s.channel)
        from grpc_health.v1 import health_pb2
        assert s.health.Check(health_pb2.HealthCheckRequest(), timeout=T).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert code(lambda: s.vms.CreateVm(pb.CreateVmRequest(vm_id="x"), timeout=T)) == \
            grpc.StatusCode.PERMISSION_DENIED
    finally:
        s.close()
