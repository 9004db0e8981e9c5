"""PauseVm and PauseVcpu wait on the event loop through listeners on the vCPUs; a pause,
whatever its outcome, takes its listeners off again (else every pause would leave one
behind, woken at each later state change)."""

from __future__ import annotations

import grpc
from api_support import RunningDaemon

from kvmd_proto import vmm_pb2 as pb

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def test_pauses_leave_no_listener_on_the_vcpus(api: RunningDaemon) -> None:
    """After refused PauseVm and PauseVcpu calls the vCPU has the listeners it had."""
    api.create_vm("p")
    api.create_vcpu("p", 0)
    vcpu = api.daemon.host.get_vm("p").vcpu(0)
    before = len(vcpu._listeners)
    for _ in range(3):  # refused (nothing runs), after the listeners were installed
        api.assert_code(lambda: api.vms.PauseVm(pb.VmRef(vm_id="p")), PRECONDITION)
        api.assert_code(lambda: api.vcpus.PauseVcpu(pb.VcpuRef(vm_id="p", vcpu_id=0)),
                        PRECONDITION)
    assert len(vcpu._listeners) == before
    api.assert_healthy()
