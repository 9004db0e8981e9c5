"""gRPC servicers: thin translation between proto messages and the core's Host.

No VMM rule lives here: each method parses its request, calls the core, and converts the
result. Domain errors raised by the core become status codes in `interceptors.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from kvmd.api import convert
from kvmd.api.auth import current_grant, current_quota, may_read_guest_state
from kvmd.api.base import MESSAGE_OVERHEAD, Runtime, ServicerBase, caller_identity
from kvmd.api.interceptors import HandlerRegistry, on_loop
from kvmd.api.migration import MigrationService, add_migration_service
from kvmd.api.snapshots import SnapshotsService, add_snapshots_service
from kvmd.api.streams import END_KEY, END_LAGGED
from kvmd.core.errors import DeadlineExceeded, InvalidArgument, Reason, ResourceExhausted
from kvmd.core.errors import limit as limit_metadata
from kvmd.core.host import Host
from kvmd.core.remote import (
    DEFAULT_DEADLINE_MS,
    MAX_DEADLINE_MS,
    ClaimRange,
    HandlerClose,
    RemoteHandler,
)
from kvmd.core.vm import ManagedVm
from kvmd.kvm.memory import PAGE_SIZE
from kvmd.migration.registry import Migrations
from kvmd.state.store import SnapshotStore
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

# ListVms: the most VMs one page holds (fewer when they would not fit in a message).
MAX_PAGE_SIZE = 1000

class HypervisorService(ServicerBase, rpc.HypervisorServicer):
    """What this host's KVM and this daemon can do."""

    @on_loop
    def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.HypervisorInfo:
        """API version, capabilities by name, vCPU mmap size, limits and daemon version."""
        lim = self.host.limits
        return pb.HypervisorInfo(
            api_version=self.host.kvm.api_version,
            capabilities=self.host.capabilities(),
            vcpu_mmap_size=self.host.kvm.vcpu_mmap_size,
            limits=pb.Limits(
                max_vms=lim.max_vms, max_vcpus_per_vm=lim.max_vcpus_per_vm,
                max_memory_per_vm_bytes=lim.max_memory_per_vm_bytes,
                max_memory_total_bytes=lim.max_memory_total_bytes,
                max_memory_slots_per_vm=lim.max_memory_slots_per_vm,
                max_message_bytes=lim.max_message_bytes,
                max_concurrent_rpcs=lim.max_concurrent_rpcs,
                max_irqfds_per_vm=lim.max_irqfds_per_vm,
                max_ioevents_per_vm=lim.max_ioevents_per_vm,
                max_calls_per_identity=lim.max_calls_per_identity,
                max_streams=lim.max_streams,
                max_streams_per_identity=lim.max_streams_per_identity,
                max_fds=lim.max_fds, max_fds_per_identity=lim.max_fds_per_identity),
            daemon_version=self.host.version,
            vm_count=self.host.vm_count(),
            memory_in_use_bytes=self.host.budget.in_use,
            page_size=PAGE_SIZE,
            dirty_log_modes=convert.dirty_modes_to_pb(self.host.dirty_log_modes()),
            fds_in_use=self.host.fds.in_use,
            vcpu_cpus=sorted(self.host.vcpu_cpus()),
            api_cpus=sorted(self.host.api_cpus()),
        )

    def CheckExtension(self, request: pb.CheckExtensionRequest,
                       context: Any) -> pb.CheckExtensionResponse:
        """KVM_CHECK_EXTENSION by name or number, on /dev/kvm or a VM's fd."""
        which = request.WhichOneof("capability")
        if which is None:
            raise InvalidArgument("give a capability name or number",
                                  reason=Reason.FIELD_REQUIRED, field="name")
        cap: int | str = request.name if which == "name" else request.number
        if which == "name" and not request.name:
            raise InvalidArgument("capability name is empty",
                                  reason=Reason.FIELD_REQUIRED, field="name")
        value, number = self.host.check_extension(
            cap, self._vm(request.vm_id) if request.vm_id else "")
        return pb.CheckExtensionResponse(value=value, number=number)

    def GetSupportedCpuid(self, request: pb.GetSupportedCpuidRequest,
                          context: Any) -> pb.CpuidEntries:
        """KVM_GET_SUPPORTED_CPUID, with APIC ID 0 whichever host CPU answers."""
        return convert.cpuid_to_pb(self.host.supported_cpuid())


class VmsService(ServicerBase, rpc.VmsServicer):
    """Create, inspect, list and delete VMs; run control; console; exit statistics."""

    def __init__(self, host: Host, runtime: Runtime,
                 visible: Callable[[str, str], bool]) -> None:
        super().__init__(host, runtime)
        self.visible = visible

    def CreateVm(self, request: pb.CreateVmRequest, context: Any) -> pb.Vm:
        """Create a VM under a caller-chosen id (duplicate: ALREADY_EXISTS)."""
        vm = self.host.create_vm(request.vm_id, dict(request.labels),
                                 convert.vm_options_from_pb(request.options),
                                 owner=caller_identity(), owner_quota=current_quota.get())
        return convert.vm_to_pb(vm)

    @on_loop
    def GetVm(self, request: pb.GetVmRequest, context: Any) -> pb.Vm:
        """One VM's state, options and resource counts."""
        return convert.vm_to_pb(self._vm(request.vm_id))

    @on_loop
    def ListVms(self, request: pb.ListVmsRequest, context: Any) -> pb.ListVmsResponse:
        """The VMs carrying all labels of the selector, in id order, a page at a time: as
        many as page_size says and one message holds."""
        identity = caller_identity()
        after = convert.page_token_id(request.page_token)
        page_size = request.page_size or MAX_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="page_size")
        budget = self.host.limits.max_message_bytes - MESSAGE_OVERHEAD
        response = pb.ListVmsResponse()
        used = 0
        for v in self.host.list_vms(dict(request.label_selector)):
            if v.id <= after or not self.visible(identity, v.owner):
                continue
            vm = convert.vm_to_pb(v)
            size = vm.ByteSize() + 8
            if len(response.vms) == page_size or (response.vms and used + size > budget):
                response.next_page_token = convert.page_token(response.vms[-1].vm_id)
                break
            response.vms.append(vm)
            used += size
        return response

    def DeleteVm(self, request: pb.DeleteVmRequest, context: Any) -> pb.DeleteVmResponse:
        """Stop the VM and release everything it owns."""
        vm = self._vm(request.vm_id)
        self.host.delete_vm(vm.id, vm)
        return pb.DeleteVmResponse()

    def StartVm(self, request: pb.VmRef, context: Any) -> pb.Vm:
        """Start every vCPU in its own thread."""
        vm = self._vm(request.vm_id)
        vm.start()
        return convert.vm_to_pb(vm)

    async def PauseVm(self, request: pb.VmRef, context: Any) -> pb.Vm:
        """Pause every running vCPU; returns once all are out of the guest. Kicks and waits
        on the event loop: no thread is held while the vCPUs leave the guest."""
        vm = self._vm(request.vm_id)
        await self._paused(vm.vcpus(), vm.request_pause)
        return convert.vm_to_pb(vm)

    @on_loop
    def ResumeVm(self, request: pb.VmRef, context: Any) -> pb.Vm:
        """Resume every paused vCPU where it stopped."""
        vm = self._vm(request.vm_id)
        vm.resume()
        return convert.vm_to_pb(vm)

    def StopVm(self, request: pb.VmRef, context: Any) -> pb.Vm:
        """Stop every vCPU thread."""
        vm = self._vm(request.vm_id)
        vm.stop()
        return convert.vm_to_pb(vm)

    async def WatchVm(self, request: pb.WatchVmRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.VmEvent]:
        """Stream state changes until the client cancels or the VM is deleted. A crash's
        registers are guest data: viewers get the event without them."""
        vm = self._vm(request.vm_id)
        with_regs = may_read_guest_state(current_grant.get())
        sub = vm.watch()
        try:
            if request.include_current:
                yield convert.event_to_pb(vm.id, vm.current_event())
            async for event in self._follow(sub, context):
                yield convert.event_to_pb(vm.id, event, with_regs)
        finally:
            sub.close()

    def GetExitStats(self, request: pb.VmRef, context: Any) -> pb.ExitStats:
        """Exit counters per vCPU and per VM."""
        vm = self._vm(request.vm_id)
        total, per_vcpu = vm.exit_stats()
        return pb.ExitStats(vm_id=vm.id, total=total, vcpus={
            vid: pb.ExitCounts(counts=counts) for vid, counts in per_vcpu.items()})

    async def StreamConsole(self, request: pb.StreamConsoleRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.ConsoleOutput]:
        """Console output: the backlog (if asked, or from `from_offset`), then live bytes
        unless no_follow; each message says where its bytes lie in the whole output."""
        start = request.from_offset if request.from_offset else 0 if request.backlog else None
        backlog, offset, sub = self._vm(request.vm_id).console.subscribe_from(start)
        try:
            # The backlog may exceed one message (console_buffer_bytes): chunks, each with
            # its console offset (a client resumes from the last one it saw).
            step = self._chunk_size(0)
            for off in range(0, len(backlog), step):
                piece = backlog[off:off + step]
                yield pb.ConsoleOutput(data=piece, offset=offset)
                offset += len(piece)
            if request.no_follow:
                return
            async for data in self._follow(sub, context):
                if sub.dropped:
                    # This reader fell so far behind that output was dropped: the offsets
                    # would lie. End the stream; a client resumes from its offset.
                    context.set_trailing_metadata(((END_KEY, END_LAGGED),))
                    return
                yield pb.ConsoleOutput(data=data, offset=offset)
                offset += len(data)
        finally:
            sub.close()

    def WriteConsole(self, request: pb.WriteConsoleRequest,
                     context: Any) -> pb.WriteConsoleResponse:
        """Queue input for the guest's COM1; refuses what does not fit the buffer."""
        vm = self._vm(request.vm_id)
        accepted = vm.write_console(request.data)
        if accepted < len(request.data):
            raise ResourceExhausted(
                f"console input buffer has room for {accepted} bytes, not "
                f"{len(request.data)}: nothing was queued", reason=Reason.CONSOLE_FULL)
        return pb.WriteConsoleResponse(accepted=accepted)


class MemoryService(ServicerBase, rpc.MemoryServicer):
    """Guest memory slots, contents and dirty logs."""

    def AddMemoryRegion(self, request: pb.AddMemoryRegionRequest,
                        context: Any) -> pb.MemoryRegion:
        """Map new daemon-owned memory (or a file of the images directory) into the
        guest; returns the slot."""
        vm = self._vm(request.vm_id)
        if request.HasField("file"):
            info = vm.add_file_memory_region(
                request.guest_addr, request.size, request.read_only, request.log_dirty,
                convert.memory_file_from_pb(request.file))
        else:
            info = vm.add_memory_region(
                request.guest_addr, request.size, request.read_only, request.log_dirty)
        return convert.vm_region_to_pb(vm, info)

    def RemoveMemoryRegion(self, request: pb.RemoveMemoryRegionRequest,
                           context: Any) -> pb.RemoveMemoryRegionResponse:
        """Unmap a slot and free its memory (msync-ing its files)."""
        vm = self._vm(request.vm_id)
        files = vm.region_files(request.slot)
        info = vm.remove_memory_region(request.slot)
        return pb.RemoveMemoryRegionResponse(region=convert.region_to_pb(info, files))

    def ListMemoryRegions(self, request: pb.ListMemoryRegionsRequest,
                          context: Any) -> pb.ListMemoryRegionsResponse:
        """Every slot of the VM, by guest address."""
        vm = self._vm(request.vm_id)
        return pb.ListMemoryRegionsResponse(regions=[convert.vm_region_to_pb(vm, r)
                                                     for r in vm.memory_regions()])

    async def WriteGuestMemory(self,
                               request_iterator: AsyncIterator[pb.WriteGuestMemoryRequest],
                               context: grpc.aio.ServicerContext
                               ) -> pb.WriteGuestMemoryResponse:
        """Write streamed chunks contiguously from the first message's guest_addr."""
        vm: ManagedVm | None = None
        addr = written = 0
        async for msg in request_iterator:
            if vm is None:
                vm = self._vm(msg.vm_id)
                addr = msg.guest_addr
            elif msg.vm_id and msg.vm_id != vm.id:
                raise InvalidArgument("every chunk of one write must name the same vm",
                                      reason=Reason.STREAM_INVALID, field="vm_id")
            if msg.data:
                await self._blocking(vm.write_memory, addr + written, msg.data)
                written += len(msg.data)
        if vm is None:
            raise InvalidArgument("empty write: the first message must name vm_id",
                                  reason=Reason.FIELD_REQUIRED, field="vm_id")
        return pb.WriteGuestMemoryResponse(bytes_written=written)

    async def ReadGuestMemory(self, request: pb.ReadGuestMemoryRequest,
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.GuestMemoryChunk]:
        """Stream guest memory in chunks; the whole range is checked before the first."""
        vm = self._vm(request.vm_id)
        vm.check_range(request.guest_addr, request.length)
        chunk = self._chunk_size(request.chunk_size)
        for off in range(0, request.length, chunk):
            n = min(chunk, request.length - off)
            addr = request.guest_addr + off
            data = await self._blocking(vm.read_memory, addr, n)
            yield pb.GuestMemoryChunk(guest_addr=addr, data=data)

    async def GetDirtyLog(self, request: pb.GetDirtyLogRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Fetch (and reset) the slot's dirty log, streamed in chunks of its bitmap or its
        runs (AUTO: whichever is shorter, as PollDirtyLog chooses)."""
        vm = self._vm(request.vm_id)
        form = _dirty_log_form(request.form)  # before the read: a refusal loses no pages
        info, bitmap = await self._blocking(vm.get_dirty_log, request.slot)
        # Serialized already (see interceptors.serialized_as_is).
        for chunk in convert.dirty_log_chunks(info.slot, bitmap, info.size // PAGE_SIZE, form,
                                              self._chunk_size(request.chunk_size)):
            yield chunk

    def PollDirtyLog(self, request: pb.PollDirtyLogRequest,
                     context: Any) -> pb.PollDirtyLogResponse | bytes:
        """GetDirtyLog's answer in one reply (one round trip); slots whose log might not fit
        one message are refused before their log is read."""
        vm = self._vm(request.vm_id)
        form = _dirty_log_form(request.form)
        limit = self.host.limits.max_message_bytes
        for info in vm.memory_regions():
            if info.slot == request.slot and convert.dirty_log_answer_bound(
                    info.size // PAGE_SIZE, form) > limit:
                raise ResourceExhausted(
                    f"the dirty log of slot {info.slot} ({info.size // PAGE_SIZE} pages) might "
                    f"not fit one {limit}-byte message: use the streamed GetDirtyLog",
                    resource=f"{vm.resource}/slot/{info.slot}", reason=Reason.LIMIT_MESSAGE,
                    metadata=limit_metadata("max_message_bytes", limit))
        info, bitmap = vm.get_dirty_log(request.slot)
        # Serialized already (see interceptors.serialized_as_is).
        return convert.whole_dirty_log(info.slot, bitmap, info.size // PAGE_SIZE, form)

    def DiscardGuestMemory(self, request: pb.DiscardGuestMemoryRequest,
                           context: Any) -> pb.DiscardGuestMemoryResponse:
        """Release the host pages behind a range of guest memory (balloon inflate)."""
        released = self._vm(request.vm_id).discard_memory(request.guest_addr, request.size)
        return pb.DiscardGuestMemoryResponse(released_bytes=released)

    def MapGuestMemory(self, request: pb.MapGuestMemoryRequest,
                       context: Any) -> pb.GuestFileMapping:
        """Map a file of the images directory over part of a slot."""
        vm = self._vm(request.vm_id)
        if not request.HasField("file"):
            raise InvalidArgument("MapGuestMemory needs a file",
                                  reason=Reason.FIELD_REQUIRED, field="file")
        record = vm.map_file(request.slot, request.offset, request.size,
                             convert.memory_file_from_pb(request.file))
        return convert.file_mapping_to_pb(record)

    def UnmapGuestMemory(self, request: pb.UnmapGuestMemoryRequest,
                         context: Any) -> pb.UnmapGuestMemoryResponse:
        """Unmap a file mapped over part of a slot (msync first)."""
        record = self._vm(request.vm_id).unmap_file(request.slot, request.offset, request.size)
        return pb.UnmapGuestMemoryResponse(mapping=convert.file_mapping_to_pb(record))

    def SyncGuestMemory(self, request: pb.SyncGuestMemoryRequest,
                        context: Any) -> pb.SyncGuestMemoryResponse:
        """msync the writable files mapped in part of a slot."""
        synced = self._vm(request.vm_id).sync_memory(request.slot, request.offset,
                                                     request.size)
        return pb.SyncGuestMemoryResponse(synced_bytes=synced)


    def ClearDirtyLog(self, request: pb.ClearDirtyLogRequest,
                      context: Any) -> pb.ClearDirtyLogResponse:
        """Manual mode: mark handled pages clean."""
        self._vm(request.vm_id).clear_dirty_log(
            request.slot, [(r.first_page, r.pages) for r in request.ranges])
        return pb.ClearDirtyLogResponse()

    def SetDirtyLogging(self, request: pb.SetDirtyLoggingRequest,
                        context: Any) -> pb.MemoryRegion:
        """Turn dirty logging of a slot on or off."""
        return convert.region_to_pb(self._vm(request.vm_id).set_dirty_logging(
            request.slot, request.enabled))

    def MeasureDirtyRate(self, request: pb.MeasureDirtyRateRequest,
                         context: Any) -> pb.MeasureDirtyRateResponse:
        """The VM's dirty rate over a period (the calling thread waits for it)."""
        pages, seconds = self._vm(request.vm_id).measure_dirty_rate(request.duration_ms)
        return pb.MeasureDirtyRateResponse(dirty_pages_per_second=pages / seconds,
                                           dirty_pages=pages, seconds=seconds)


def _dirty_log_form(form: int) -> int:
    if form not in (pb.GetDirtyLogRequest.AUTO, pb.GetDirtyLogRequest.BITMAP,
                    pb.GetDirtyLogRequest.RANGES):
        raise InvalidArgument(f"unknown dirty-log form {form}",
                              reason=Reason.VALUE_UNKNOWN, field="form")
    return form


class InterruptsService(ServicerBase, rpc.InterruptsServicer):
    """Irqchip lines, GSI routing, MSIs and daemon-owned irqfds."""

    def SetIrqLine(self, request: pb.SetIrqLineRequest, context: Any) -> pb.SetIrqLineResponse:
        """Raise or lower an in-kernel irqchip input."""
        self._vm(request.vm_id).set_irq_line(request.irq, request.active)
        return pb.SetIrqLineResponse()

    def SetGsiRouting(self, request: pb.SetGsiRoutingRequest,
                      context: Any) -> pb.SetGsiRoutingResponse:
        """Replace the GSI routing table."""
        vm = self._vm(request.vm_id)
        vm.set_gsi_routing([convert.route_from_pb(r) for r in request.routes])
        return pb.SetGsiRoutingResponse()

    def SignalMsi(self, request: pb.SignalMsiRequest, context: Any) -> pb.SignalMsiResponse:
        """Inject an MSI; `delivered` is false if the guest blocked it."""
        msi = request.msi
        devid = msi.devid if msi.HasField("devid") else None
        delivered = self._vm(request.vm_id).signal_msi(msi.address, msi.data, devid)
        return pb.SignalMsiResponse(delivered=delivered)

    def RegisterIrqfd(self, request: pb.RegisterIrqfdRequest, context: Any) -> pb.Irqfd:
        """Bind a new daemon-owned eventfd to a GSI."""
        vm = self._vm(request.vm_id)
        entry = vm.register_irqfd(request.irqfd_id, request.gsi, request.resample)
        return convert.irqfd_to_pb(vm.id, entry)

    def TriggerIrqfd(self, request: pb.TriggerIrqfdRequest,
                     context: Any) -> pb.TriggerIrqfdResponse:
        """Signal the irqfd's eventfd, injecting its interrupt."""
        self._vm(request.vm_id).trigger_irqfd(request.irqfd_id)
        return pb.TriggerIrqfdResponse()

    def UnregisterIrqfd(self, request: pb.UnregisterIrqfdRequest,
                        context: Any) -> pb.UnregisterIrqfdResponse:
        """Detach and close the irqfd."""
        self._vm(request.vm_id).unregister_irqfd(request.irqfd_id)
        return pb.UnregisterIrqfdResponse()

    def ListIrqfds(self, request: pb.ListIrqfdsRequest, context: Any) -> pb.ListIrqfdsResponse:
        """Every irqfd of the VM with its counters."""
        vm = self._vm(request.vm_id)
        return pb.ListIrqfdsResponse(irqfds=[convert.irqfd_to_pb(vm.id, e)
                                             for e in vm.irqfds()])

    async def WatchIrqfdResamples(self, request: pb.WatchIrqfdResamplesRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> AsyncIterator[pb.IrqfdResample]:
        """Stream each resample notification until cancelled or the VM is deleted."""
        sub = self._vm(request.vm_id).watch_resamples()
        try:
            async for fired in self._follow(sub, context):
                yield pb.IrqfdResample(irqfd_id=fired.resource_id, count=fired.count)
        finally:
            sub.close()


class IoEventsService(ServicerBase, rpc.IoEventsServicer):
    """Daemon-owned ioeventfds and their notifications."""

    def RegisterIoevent(self, request: pb.RegisterIoeventRequest, context: Any) -> pb.Ioevent:
        """Have KVM signal a daemon-owned eventfd on guest writes to an address."""
        vm = self._vm(request.vm_id)
        if request.space not in convert.SPACES:
            raise InvalidArgument(f"unknown address space {request.space}",
                                  reason=Reason.VALUE_UNKNOWN, field="space")
        datamatch = request.datamatch if request.HasField("datamatch") else None
        entry = vm.register_ioevent(request.ioevent_id, convert.SPACES[request.space],
                                    request.address, request.length, datamatch)
        return convert.ioevent_to_pb(vm.id, entry)

    def UnregisterIoevent(self, request: pb.UnregisterIoeventRequest,
                          context: Any) -> pb.UnregisterIoeventResponse:
        """Remove and close an ioevent."""
        self._vm(request.vm_id).unregister_ioevent(request.ioevent_id)
        return pb.UnregisterIoeventResponse()

    def ListIoevents(self, request: pb.ListIoeventsRequest,
                     context: Any) -> pb.ListIoeventsResponse:
        """Every ioevent of the VM with its fire count."""
        vm = self._vm(request.vm_id)
        return pb.ListIoeventsResponse(ioevents=[convert.ioevent_to_pb(vm.id, e)
                                                 for e in vm.ioevents()])

    async def WatchIoevents(self, request: pb.WatchIoeventsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.IoeventFired]:
        """Stream (ioevent id, count) whenever a guest write fires one."""
        sub = self._vm(request.vm_id).watch_ioevents()
        try:
            async for fired in self._follow(sub, context):
                yield pb.IoeventFired(ioevent_id=fired.resource_id, count=fired.count)
        finally:
            sub.close()


class VcpusService(ServicerBase, rpc.VcpusServicer):
    """vCPU creation and register state."""

    def CreateVcpu(self, request: pb.CreateVcpuRequest, context: Any) -> pb.Vcpu:
        """Create a vCPU with a caller-chosen numeric id."""
        return convert.vcpu_to_pb(self._vm(request.vm_id).create_vcpu(request.vcpu_id))

    @on_loop
    def ListVcpus(self, request: pb.ListVcpusRequest, context: Any) -> pb.ListVcpusResponse:
        """Every vCPU of the VM with its state."""
        vm = self._vm(request.vm_id)
        return pb.ListVcpusResponse(vcpus=[convert.vcpu_to_pb(v) for v in vm.vcpus()])

    def GetRegs(self, request: pb.VcpuRef, context: Any) -> pb.Regs:
        """General-purpose registers."""
        return convert.regs_to_pb(self._vcpu(request).get_regs())

    def SetRegs(self, request: pb.SetRegsRequest, context: Any) -> pb.Regs:
        """Set general-purpose registers; returns them as read back."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_regs(convert.regs_from_pb(request.regs))
        return convert.regs_to_pb(vcpu.get_regs())

    def GetSregs(self, request: pb.VcpuRef, context: Any) -> pb.Sregs:
        """Segment, descriptor-table and control registers."""
        return convert.sregs_to_pb(self._vcpu(request).get_sregs())

    def SetSregs(self, request: pb.SetSregsRequest, context: Any) -> pb.Sregs:
        """Set special registers; returns them as read back."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_sregs(convert.sregs_from_pb(request.sregs))
        return convert.sregs_to_pb(vcpu.get_sregs())

    def GetFpu(self, request: pb.VcpuRef, context: Any) -> pb.Fpu:
        """x87 and SSE state."""
        return convert.fpu_to_pb(self._vcpu(request).get_fpu())

    def SetFpu(self, request: pb.SetFpuRequest, context: Any) -> pb.Fpu:
        """Set x87 and SSE state; returns it as read back."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_fpu(convert.fpu_from_pb(request.fpu))
        return convert.fpu_to_pb(vcpu.get_fpu())

    def SetCpuid(self, request: pb.SetCpuidRequest, context: Any) -> pb.CpuidEntries:
        """Set the vCPU's CPUID (given entries, or the host's supported set with the
        vCPU's own APIC ID)."""
        vcpu = self._vcpu(request.vcpu)
        if request.use_supported and request.entries:
            raise InvalidArgument("give entries or use_supported, not both",
                                  reason=Reason.ARGUMENTS_CONFLICT, field="use_supported")
        if request.use_supported:
            vcpu.set_supported_cpuid(self.host.supported_cpuid())
        else:
            vcpu.set_cpuid(convert.cpuid_from_pb(request.entries))
        return convert.cpuid_to_pb(vcpu.get_cpuid())

    def GetCpuid(self, request: pb.VcpuRef, context: Any) -> pb.CpuidEntries:
        """The vCPU's CPUID entries."""
        return convert.cpuid_to_pb(self._vcpu(request).get_cpuid())

    def GetMsrs(self, request: pb.GetMsrsRequest, context: Any) -> pb.Msrs:
        """Read MSRs by index."""
        values = self._vcpu(request.vcpu).get_msrs(list(request.indices))
        return pb.Msrs(msrs=[pb.Msr(index=i, value=v) for i, v in values.items()])

    def SetMsrs(self, request: pb.SetMsrsRequest, context: Any) -> pb.Msrs:
        """Write MSRs; returns them as read back."""
        vcpu = self._vcpu(request.vcpu)
        values = {m.index: m.value for m in request.msrs}
        if len(values) != len(request.msrs):
            raise InvalidArgument("an MSR index appears twice",
                                  reason=Reason.ARGUMENTS_CONFLICT, field="msrs")
        vcpu.set_msrs(values)
        back = vcpu.get_msrs(list(values))
        return pb.Msrs(msrs=[pb.Msr(index=i, value=v) for i, v in back.items()])

    def GetMpState(self, request: pb.VcpuRef, context: Any) -> pb.MpState:
        """Multiprocessing state."""
        return pb.MpState(state=pb.MpState.State.Name(int(self._vcpu(request).get_mp_state())))

    def SetMpState(self, request: pb.SetMpStateRequest, context: Any) -> pb.MpState:
        """Set multiprocessing state."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_mp_state(request.mp_state.state)
        return pb.MpState(state=pb.MpState.State.Name(int(vcpu.get_mp_state())))

    def GetLapic(self, request: pb.VcpuRef, context: Any) -> pb.Lapic:
        """Local APIC registers (1024 bytes; needs the in-kernel irqchip)."""
        return pb.Lapic(regs=self._vcpu(request).get_lapic())

    def SetLapic(self, request: pb.SetLapicRequest, context: Any) -> pb.Lapic:
        """Set local APIC registers."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_lapic(request.lapic.regs)
        return pb.Lapic(regs=vcpu.get_lapic())

    def GetVcpuEvents(self, request: pb.VcpuRef, context: Any) -> pb.VcpuEvents:
        """Pending and injected exceptions, interrupts, NMI and SMI."""
        return convert.events_to_pb(self._vcpu(request).get_vcpu_events())

    def SetVcpuEvents(self, request: pb.SetVcpuEventsRequest, context: Any) -> pb.VcpuEvents:
        """Set vCPU events; returns them as read back."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.set_vcpu_events(convert.events_from_pb(request.events))
        return convert.events_to_pb(vcpu.get_vcpu_events())

    def StartVcpu(self, request: pb.VcpuRef, context: Any) -> pb.Vcpu:
        """Start one vCPU's thread."""
        vcpu = self._vm(request.vm_id).start_vcpu(request.vcpu_id)
        return convert.vcpu_to_pb(vcpu)

    async def PauseVcpu(self, request: pb.VcpuRef, context: Any) -> pb.Vcpu:
        """Pause one vCPU; returns once it is out of the guest (waiting on the loop)."""
        vm = self._vm(request.vm_id)
        vcpu = vm.vcpu(request.vcpu_id)
        await self._paused([vcpu], lambda: [vm.request_pause_vcpu(request.vcpu_id)])
        return convert.vcpu_to_pb(vcpu)

    @on_loop
    def ResumeVcpu(self, request: pb.VcpuRef, context: Any) -> pb.Vcpu:
        """Resume one paused or halted vCPU."""
        vcpu = self._vm(request.vm_id).resume_vcpu(request.vcpu_id)
        return convert.vcpu_to_pb(vcpu)

    def StopVcpu(self, request: pb.VcpuRef, context: Any) -> pb.Vcpu:
        """Stop one vCPU's thread."""
        vcpu = self._vm(request.vm_id).stop_vcpu(request.vcpu_id)
        return convert.vcpu_to_pb(vcpu)

    @on_loop
    def GetVcpuState(self, request: pb.VcpuRef, context: Any) -> pb.Vcpu:
        """The vCPU's state and the reason it stopped or crashed."""
        return convert.vcpu_to_pb(self._vcpu(request))

    def InjectInterrupt(self, request: pb.InjectInterruptRequest, context: Any) -> pb.Vcpu:
        """Queue an interrupt for a vCPU of a VM without the in-kernel irqchip."""
        vcpu = self._vcpu(request.vcpu)
        vcpu.inject_interrupt(request.vector)
        return convert.vcpu_to_pb(vcpu)


class ExitHandlersService(ServicerBase, rpc.ExitHandlersServicer):
    """Remote device emulation over a bidirectional stream."""

    async def HandleExits(self, request_iterator: AsyncIterator[pb.ExitHandlerMessage],
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.ExitHandlerEvent]:
        """First message: a claim. Then exits flow out and replies flow in until either
        side ends; the claims die with the stream."""
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            first = None
        if first is None or first.WhichOneof("message") != "claim":
            raise InvalidArgument("the first message of HandleExits must be a claim",
                                  reason=Reason.STREAM_INVALID, field="claim")
        claim = first.claim
        vm = self._vm(claim.vm_id)
        deadline = claim.deadline_ms or DEFAULT_DEADLINE_MS
        if deadline > MAX_DEADLINE_MS:
            raise InvalidArgument(f"deadline_ms must be at most {MAX_DEADLINE_MS}",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="claim.deadline_ms")
        ranges = []
        for r in claim.ranges:
            if r.space not in convert.SPACES:
                raise InvalidArgument(f"unknown address space {r.space}",
                                      reason=Reason.VALUE_UNKNOWN, field="claim.ranges.space")
            ranges.append(ClaimRange(convert.SPACES[r.space], r.base, r.length))
        # The VM's lock can be held for milliseconds (a slot being mapped): not on the loop.
        handler = await self._acquire(
            vm.add_handler, ranges, deadline,
            release=lambda h: vm.release_handler(h, HandlerClose.STREAM_ENDED))
        replies = asyncio.get_running_loop().create_task(
            self._read_replies(requests, handler), name=f"exits-{handler.id}")
        try:
            yield pb.ExitHandlerEvent(claimed=pb.Claimed(handler_id=handler.id,
                                                         ranges=claim.ranges))
            async for item in self._follow(handler.outbound, context):
                yield pb.ExitHandlerEvent(exit=pb.ExitRequest(
                    exit_id=item.id, vcpu_id=item.vcpu_id, space=convert.SPACES_PB[item.space],
                    address=item.address, size=item.size, is_write=item.is_write,
                    data=item.data, count=item.count))
        finally:
            replies.cancel()
            await self._cleanup(vm.release_handler, handler, HandlerClose.STREAM_ENDED)
        if handler.close_cause is HandlerClose.BAD_REPLY:
            raise InvalidArgument(handler.close_reason, reason=Reason.STREAM_INVALID, field="reply")
        if handler.close_cause is HandlerClose.DEADLINE:
            raise DeadlineExceeded(f"handler {handler.id} {handler.close_reason}; its claims "
                                   "were released", reason=Reason.HANDLER_DEADLINE_MISSED)

    @staticmethod
    async def _read_replies(requests: AsyncIterator[pb.ExitHandlerMessage],
                            handler: RemoteHandler) -> None:
        """Hand each reply to the waiting vCPU. A bad message, or the client closing its
        side, ends the handler's outbound stream; HandleExits then releases the claims."""
        cause: HandlerClose | None = HandlerClose.CLIENT_CLOSED
        detail = ""
        try:
            async for msg in requests:
                if msg.WhichOneof("message") != "reply":
                    cause, detail = HandlerClose.BAD_REPLY, "only replies may follow the claim"
                    return
                error = handler.answer(msg.reply.exit_id, msg.reply.data)
                if error is not None:
                    cause, detail = HandlerClose.BAD_REPLY, error
                    return
        except asyncio.CancelledError:
            cause = None  # HandleExits is ending and releases the claims itself
            raise
        except Exception:  # the request stream broke: the client is gone
            cause = HandlerClose.CLIENT_GONE
        finally:
            if cause is not None:
                handler.fail(cause, f"{cause}: {detail}" if detail else "")


def add_services(server: HandlerRegistry, host: Host, runtime: Runtime,
                 visible: Callable[[str, str], bool] = lambda identity, owner: True,
                 store: SnapshotStore | None = None,
                 migrations: Migrations | None = None) -> list[str]:
    """Register every kvmd service on `server`; returns their full names. `visible` decides
    which VMs (and snapshot files, by their VM's owner) a caller sees (identity, owner);
    `store` holds the state directory's snapshot files (None: no state directory);
    `migrations` the daemon's live migrations (default: plain TCP to loopback only)."""

    rpc.add_HypervisorServicer_to_server(HypervisorService(host, runtime), server)
    rpc.add_VmsServicer_to_server(VmsService(host, runtime, visible), server)
    rpc.add_MemoryServicer_to_server(MemoryService(host, runtime), server)
    rpc.add_InterruptsServicer_to_server(InterruptsService(host, runtime), server)
    rpc.add_IoEventsServicer_to_server(IoEventsService(host, runtime), server)
    rpc.add_VcpusServicer_to_server(VcpusService(host, runtime), server)
    rpc.add_ExitHandlersServicer_to_server(ExitHandlersService(host, runtime), server)
    add_snapshots_service(server, SnapshotsService(host, runtime, store, visible))
    add_migration_service(server, MigrationService(
        host, runtime, migrations if migrations is not None else Migrations(host), visible))
    return [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]
