"""One tenant cannot exhaust the daemon's file descriptors (issue 13 #6): at a low
RLIMIT_NOFILE an operator filling VMs with descriptor-holding objects is refused with
RESOURCE_EXHAUSTED by the daemon's budget, before the kernel's EMFILE, and the admin (and
the daemon) carry on."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, Stubs, TlsDaemon

from kvmd_proto import vmm_pb2 as pb


@pytest.fixture
def low_nofile() -> Iterator[int]:
    """The soft RLIMIT_NOFILE of this process lowered to what is open now plus 700."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(os.listdir("/proc/self/fd")) + 700
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fill(s: Stubs, prefix: str) -> tuple[grpc.StatusCode, str, list[str]]:
    """Create VMs full of resample irqfds (two descriptors each) until refused: the code and
    details of the refusal and the VMs made."""
    made: list[str] = []
    for i in range(20):
        vm_id = f"{prefix}{i}"
        try:
            s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, options=pb.VmOptions(irqchip=True)),
                           timeout=RPC_TIMEOUT)
            made.append(vm_id)
            for n in range(256):
                s.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
                    vm_id=vm_id, irqfd_id=f"i{n}", gsi=n % 24, resample=True),
                    timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), made  # type: ignore[attr-defined]
    raise AssertionError("never refused")


def test_an_operator_cannot_exhaust_descriptors_for_the_admin(
        low_nofile: int, tls_daemon: Callable[..., TlsDaemon]) -> None:
    d = tls_daemon(policy=[{"name": "admin-1", "role": "admin"},
                           {"name": "operator-a", "role": "operator"},
                           {"name": "operator-b", "role": "operator"}])
    admin, a, b = d.tls("admin-1"), d.tls("operator-a"), d.tls("operator-b")
    for s in (admin, a, b):
        assert s.serving()  # connected before the descriptors run short
    code, details, made = fill(a, "a-")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "file descriptors" in details
    assert made
    # Another operator is refused too (what non-admins may hold is used up) ...
    code_b, details_b, _made = fill(b, "b-")
    assert code_b == grpc.StatusCode.RESOURCE_EXHAUSTED, details_b
    # ... but the admin, and the daemon, carry on.
    assert admin.serving()
    admin.vms.CreateVm(pb.CreateVmRequest(vm_id="adm", options=pb.VmOptions(irqchip=True)),
                       timeout=RPC_TIMEOUT)
    admin.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="adm", vcpu_id=0), timeout=RPC_TIMEOUT)
    admin.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(vm_id="adm", irqfd_id="x", gsi=5,
                                                           resample=True), timeout=RPC_TIMEOUT)
    admin.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="adm", guest_addr=0,
                                                           size=0x10000), timeout=RPC_TIMEOUT)
    info = admin.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT)
    assert 0 < info.limits.max_fds < low_nofile
    assert 0 < info.fds_in_use <= info.limits.max_fds
    # What the operator gives back, others can use.
    for vm_id in made:
        a.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)
    b.vms.CreateVm(pb.CreateVmRequest(vm_id="b-late"), timeout=RPC_TIMEOUT)
    for vm_id in admin.list_ids():
        admin.delete_vm(vm_id)
    assert admin.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT).fds_in_use == 0
