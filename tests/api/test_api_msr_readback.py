"""SetMsrs answers with the MSRs as KVM reads them back after the write, not with the values
the client sent."""

from __future__ import annotations

from api_support import RunningDaemon

from kvmd_proto import vmm_pb2 as pb

IA32_TSC = 0x10


def test_set_msrs_returns_the_values_read_back(api: RunningDaemon) -> None:
    """The guest TSC keeps counting after it is set, so the value read back is past the
    one written: an echo of the request would equal it."""
    api.create_vm("m")
    api.create_vcpu("m", 0)
    written = 1 << 40
    back = api.vcpus.SetMsrs(pb.SetMsrsRequest(
        vcpu=pb.VcpuRef(vm_id="m", vcpu_id=0), msrs=[pb.Msr(index=IA32_TSC, value=written)]))
    assert [m.index for m in back.msrs] == [IA32_TSC]
    assert back.msrs[0].value > written
