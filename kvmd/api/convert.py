"""Conversions between proto messages and the binding's/core's plain data types."""

from __future__ import annotations

from typing import Any

from kvmd.api.gen import vmm_pb2 as pb
from kvmd.core.errors import InvalidArgument
from kvmd.core.images import FileBackedRange, MemoryFile
from kvmd.core.vcpu import ManagedVcpu
from kvmd.core.vm import IoeventEntry, IrqfdEntry, ManagedVm, VmEvent, VmOptions
from kvmd.kvm import (
    CpuidEntry,
    DTable,
    Fpu,
    IoSpace,
    IrqChip,
    IrqChipRoute,
    IrqRoute,
    MemoryRegionInfo,
    MsiRoute,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
)
from kvmd.kvm.types import (
    CONTROL_NAMES,
    DTABLE_NAMES,
    REG_NAMES,
    SEGMENT_FIELDS,
    SEGMENT_NAMES,
    VCPU_EVENT_FIELDS,
)


def _fields(msg: Any, names: tuple[str, ...]) -> dict[str, int]:
    return {name: getattr(msg, name) for name in names}


def regs_to_pb(regs: Regs) -> pb.Regs:
    return pb.Regs(**{name: getattr(regs, name) for name in REG_NAMES})


def regs_from_pb(msg: pb.Regs) -> Regs:
    return Regs(**_fields(msg, REG_NAMES))


def sregs_to_pb(s: Sregs) -> pb.Sregs:
    out = pb.Sregs(interrupt_bitmap=s.interrupt_bitmap)
    for name in SEGMENT_NAMES:
        seg = getattr(s, name)
        getattr(out, name).CopyFrom(pb.Segment(**{f: getattr(seg, f) for f in SEGMENT_FIELDS}))
    for name in DTABLE_NAMES:
        dt = getattr(s, name)
        getattr(out, name).CopyFrom(pb.DTable(base=dt.base, limit=dt.limit))
    for name in CONTROL_NAMES:
        setattr(out, name, getattr(s, name))
    return out


def sregs_from_pb(msg: pb.Sregs) -> Sregs:
    if len(msg.interrupt_bitmap) not in (0, 4):
        raise InvalidArgument("interrupt_bitmap must have 4 words")
    s = Sregs(interrupt_bitmap=list(msg.interrupt_bitmap) or [0, 0, 0, 0])
    for name in SEGMENT_NAMES:
        src = getattr(msg, name)
        for f in SEGMENT_FIELDS[1:]:
            limit = 0xFFFFFFFF if f == "limit" else 0xFFFF if f == "selector" else 0xFF
            if getattr(src, f) > limit:
                raise InvalidArgument(f"{name}.{f} = {getattr(src, f)} is out of range")
        setattr(s, name, Segment(**_fields(src, SEGMENT_FIELDS)))
    for name in DTABLE_NAMES:
        src = getattr(msg, name)
        if src.limit > 0xFFFF:
            raise InvalidArgument(f"{name}.limit = {src.limit} is out of range")
        setattr(s, name, DTable(src.base, src.limit))
    for name in CONTROL_NAMES:
        setattr(s, name, getattr(msg, name))
    return s


def fpu_to_pb(f: Fpu) -> pb.Fpu:
    return pb.Fpu(fpr=f.fpr, fcw=f.fcw, fsw=f.fsw, ftwx=f.ftwx, last_opcode=f.last_opcode,
                  last_ip=f.last_ip, last_dp=f.last_dp, xmm=f.xmm, mxcsr=f.mxcsr)


def fpu_from_pb(msg: pb.Fpu) -> Fpu:
    if len(msg.fpr) != 8 or len(msg.xmm) != 16 or any(
            len(r) != 16 for r in list(msg.fpr) + list(msg.xmm)):
        raise InvalidArgument("fpu needs 8 fpr and 16 xmm registers of 16 bytes each")
    for name, limit in (("fcw", 0xFFFF), ("fsw", 0xFFFF), ("ftwx", 0xFF),
                        ("last_opcode", 0xFFFF)):
        if getattr(msg, name) > limit:
            raise InvalidArgument(f"fpu.{name} is out of range")
    return Fpu(fpr=list(msg.fpr), fcw=msg.fcw, fsw=msg.fsw, ftwx=msg.ftwx,
               last_opcode=msg.last_opcode, last_ip=msg.last_ip, last_dp=msg.last_dp,
               xmm=list(msg.xmm), mxcsr=msg.mxcsr)


def events_to_pb(e: VcpuEvents) -> pb.VcpuEvents:
    return pb.VcpuEvents(**{name: getattr(e, name) for name in VCPU_EVENT_FIELDS})


def events_from_pb(msg: pb.VcpuEvents) -> VcpuEvents:
    values = _fields(msg, VCPU_EVENT_FIELDS)
    for name, value in values.items():
        limit = (1 << 64) if name == "exception_payload" else (1 << 32) if name in (
            "exception_error_code", "sipi_vector", "flags") else 256
        if value >= limit:
            raise InvalidArgument(f"vcpu_events.{name} = {value} is out of range")
    return VcpuEvents(**values)


def cpuid_to_pb(entries: list[CpuidEntry]) -> pb.CpuidEntries:
    return pb.CpuidEntries(entries=[
        pb.CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx,
                      ecx=e.ecx, edx=e.edx) for e in entries])


def cpuid_from_pb(entries: Any) -> list[CpuidEntry]:
    return [CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax,
                       ebx=e.ebx, ecx=e.ecx, edx=e.edx) for e in entries]


def region_to_pb(r: MemoryRegionInfo, files: list[FileBackedRange] | None = None,
                 allocated_bytes: int = 0) -> pb.MemoryRegion:
    msg = pb.MemoryRegion(slot=r.slot, guest_addr=r.guest_addr, size=r.size,
                          read_only=r.read_only, log_dirty=r.log_dirty,
                          allocated_bytes=allocated_bytes)
    for f in files or []:
        if f.whole_slot:
            msg.file.CopyFrom(memory_file_to_pb(f.memory_file))
        else:
            msg.mappings.append(file_mapping_to_pb(f))
    return msg


def vm_region_to_pb(vm: ManagedVm, r: MemoryRegionInfo) -> pb.MemoryRegion:
    """A slot of `vm` with its files and the host memory it holds now."""
    return region_to_pb(r, vm.region_files(r.slot), vm.slot_allocated_bytes(r.slot))


def memory_file_to_pb(f: MemoryFile) -> pb.MemoryFile:
    return pb.MemoryFile(name=f.name, offset=f.offset, read_only=f.read_only)


def memory_file_from_pb(msg: pb.MemoryFile) -> MemoryFile:
    return MemoryFile(msg.name, msg.offset, msg.read_only)


def file_mapping_to_pb(f: FileBackedRange) -> pb.GuestFileMapping:
    return pb.GuestFileMapping(slot=f.slot, offset=f.offset, size=f.size,
                               guest_addr=f.guest_addr, file=memory_file_to_pb(f.memory_file))


def route_from_pb(msg: pb.IrqRoute) -> IrqRoute:
    which = msg.WhichOneof("target")
    if which == "irqchip":
        chip = int(msg.irqchip.chip)
        if chip not in tuple(IrqChip):
            raise InvalidArgument(f"route for gsi {msg.gsi}: unknown irqchip {chip}")
        return IrqChipRoute(msg.gsi, IrqChip(chip), msg.irqchip.pin)
    if which == "msi":
        devid = msg.msi.devid if msg.msi.HasField("devid") else None
        return MsiRoute(msg.gsi, msg.msi.address, msg.msi.data, devid)
    raise InvalidArgument(f"route for gsi {msg.gsi} has no target (irqchip or msi)")


def vm_options_from_pb(o: pb.VmOptions) -> VmOptions:
    return VmOptions(irqchip=o.irqchip, pit=o.pit, tss_address=o.tss_address,
                     identity_map_address=o.identity_map_address,
                     debug_exit_port=o.debug_exit_port, strict_io=o.strict_io,
                     console_buffer_bytes=o.console_buffer_bytes)


def vm_to_pb(vm: ManagedVm) -> pb.Vm:
    regions = vm.memory_regions()
    o = vm.options
    vcpus = vm.vcpus()
    msg = pb.Vm(
        vm_id=vm.id, labels=vm.labels, state=vm.state, reason=vm.reason,
        options=pb.VmOptions(irqchip=o.irqchip, pit=o.pit, tss_address=o.tss_address,
                             identity_map_address=o.identity_map_address,
                             debug_exit_port=vm.debug_exit.base, strict_io=o.strict_io,
                             console_buffer_bytes=vm.console.capacity),
        vcpu_count=len(vcpus), memory_slot_count=len(regions),
        memory_bytes=sum(r.size for r in regions), created_unix_ms=vm.created_unix_ms,
        owner=vm.owner, vcpu_states={v.id: v.state for v in vcpus},
        discarded_bytes=vm.discarded_bytes_total,
        memory_allocated_bytes=vm.memory_allocated_bytes())
    if vm.exit_code is not None:
        msg.exit_code = vm.exit_code
    return msg


def vcpu_to_pb(v: ManagedVcpu) -> pb.Vcpu:
    return pb.Vcpu(vm_id=v.vm_id, vcpu_id=v.id, state=v.state, reason=v.reason)


def event_to_pb(vm_id: str, e: VmEvent) -> pb.VmEvent:
    msg = pb.VmEvent(vm_id=vm_id, type=e.type, vcpu_id=e.vcpu_id, state=e.state,
                     reason=e.reason, unix_ms=e.unix_ms)
    if e.exit_code is not None:
        msg.exit_code = e.exit_code
    if e.regs is not None:
        msg.regs.CopyFrom(regs_to_pb(e.regs))
    return msg


def irqfd_to_pb(vm_id: str, e: IrqfdEntry) -> pb.Irqfd:
    return pb.Irqfd(vm_id=vm_id, irqfd_id=e.irqfd_id, gsi=e.gsi,
                    resample=e.resample is not None, triggers=e.triggers, resamples=e.resamples)


SPACES = {pb.PIO: IoSpace.PIO, pb.MMIO: IoSpace.MMIO}
SPACES_PB = {v: k for k, v in SPACES.items()}


def ioevent_to_pb(vm_id: str, e: IoeventEntry) -> pb.Ioevent:
    msg = pb.Ioevent(vm_id=vm_id, ioevent_id=e.ioevent_id, space=SPACES_PB[e.space],
                     address=e.address, length=e.length, fired=e.fired)
    if e.datamatch is not None:
        msg.datamatch = e.datamatch
    return msg
