"""The Handover service: stranded VMs (a hand-over could not restore them) and the last
hand-over's measured outage. Thin translation to kvmd.handover; admins only (the
authorization rules, kvmd.api.auth.ADMIN_METHODS)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmd.api import convert
from kvmd.api.base import Runtime, ServicerBase
from kvmd.core.errors import InvalidArgument
from kvmd.core.host import Host
from kvmd.core.vm import validate_id
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

if TYPE_CHECKING:
    from kvmd.handover import Handover


def _vm_id(request: pb.StrandedVmRef) -> str:
    if not request.vm_id:
        raise InvalidArgument("vm_id is required")
    return validate_id("vm id", request.vm_id)


class HandoverService(ServicerBase, rpc.HandoverServicer):
    def __init__(self, host: Host, runtime: Runtime, handover: Handover) -> None:
        super().__init__(host, runtime)
        self.handover = handover

    def ListStrandedVms(self, request: pb.ListStrandedVmsRequest,
                        context: Any) -> pb.ListStrandedVmsResponse:
        return pb.ListStrandedVmsResponse(vms=[
            pb.StrandedVm(vm_id=s.carried.vm_id, reason=s.reason,
                          state_file=s.carried.state_file, memory_bytes=s.memory_bytes,
                          memory_fds=sorted(s.carried.fds), since_unix_ms=s.since_unix_ms)
            for s in self.handover.stranded.all()])

    def RetryStrandedVm(self, request: pb.StrandedVmRef, context: Any) -> pb.Vm:
        vm_id = _vm_id(request)
        return convert.vm_to_pb(self.handover.stranded.retry(vm_id))

    def DeleteStrandedVm(self, request: pb.StrandedVmRef,
                         context: Any) -> pb.DeleteStrandedVmResponse:
        vm_id = _vm_id(request)
        self.handover.stranded.delete(vm_id)
        return pb.DeleteStrandedVmResponse()

    def GetHandoverReport(self, request: pb.GetHandoverReportRequest,
                          context: Any) -> pb.HandoverReport:
        r = self.handover.report
        if r is None:
            return pb.HandoverReport()
        return pb.HandoverReport(
            mode=r.mode, unix_ms=r.unix_ms, previous_version=r.previous_version,
            vms=len(r.vms), restored=r.restored, stranded=len(r.vms) - r.restored,
            save_seconds=r.save_seconds, start_seconds=r.start_seconds,
            restore_seconds=r.restore_seconds, max_paused_seconds=r.max_paused_seconds,
            api_unavailable_seconds=r.api_unavailable_seconds,
            startup_seconds=r.startup_seconds,
            vm_reports=[pb.HandoverVmReport(vm_id=v.vm_id, restored=v.restored, error=v.error,
                                            paused_seconds=v.paused_seconds,
                                            was_running=v.was_running) for v in r.vms])
