"""Conversions between the state model (kvmd.core.state and the binding's plain types) and
protobuf: used by the API for register files, CPUID and routes, and by the snapshot format
for whole VMs. Contents that cannot be right (a 1000-byte LAPIC, an unknown address space)
are refused here with InvalidArgument; what only the kernel can judge is left to it.
"""

from __future__ import annotations

from typing import Any

from kvmd.core.errors import InvalidArgument, Reason
from kvmd.core.state import (
    ConsoleState,
    FileMappingState,
    IoeventState,
    IrqchipState,
    IrqfdState,
    SlotState,
    UartState,
    VcpuState,
    VmState,
)
from kvmd.kvm import (
    CpuidEntry,
    DTable,
    Fpu,
    IrqChip,
    IrqChipRoute,
    IrqRoute,
    MsiRoute,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
)
from kvmd.kvm.state_types import (
    ClockData,
    DebugRegs,
    IoapicState,
    PicState,
    PitChannelState,
    PitState,
    Xcr,
    Xcrs,
    Xsave,
)
from kvmd.kvm.types import (
    CONTROL_NAMES,
    DTABLE_NAMES,
    REG_NAMES,
    SEGMENT_FIELDS,
    SEGMENT_NAMES,
    VCPU_EVENT_FIELDS,
)
from kvmd_proto import vmm_pb2 as pb

LAPIC_BYTES = 1024
SPACE_NAMES = {pb.PIO: "pio", pb.MMIO: "mmio"}
SPACE_VALUES = {v: k for k, v in SPACE_NAMES.items()}
VM_OPTION_FIELDS = ("irqchip", "pit", "tss_address", "identity_map_address",
                    "debug_exit_port", "strict_io", "console_buffer_bytes", "dirty_tracking",
                    "dirty_ring_bytes")


# -- the binding's register files, CPUID and routes ----------------------------------------

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
        raise InvalidArgument("interrupt_bitmap must have 4 words", reason=Reason.STATE_INVALID)
    s = Sregs(interrupt_bitmap=list(msg.interrupt_bitmap) or [0, 0, 0, 0])
    for name in SEGMENT_NAMES:
        src = getattr(msg, name)
        for f in SEGMENT_FIELDS[1:]:
            limit = 0xFFFFFFFF if f == "limit" else 0xFFFF if f == "selector" else 0xFF
            if getattr(src, f) > limit:
                raise InvalidArgument(f"{name}.{f} = {getattr(src, f)} is out of range",
                                      reason=Reason.STATE_INVALID)
        setattr(s, name, Segment(**_fields(src, SEGMENT_FIELDS)))
    for name in DTABLE_NAMES:
        src = getattr(msg, name)
        if src.limit > 0xFFFF:
            raise InvalidArgument(f"{name}.limit = {src.limit} is out of range",
                                  reason=Reason.STATE_INVALID)
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
        raise InvalidArgument("fpu needs 8 fpr and 16 xmm registers of 16 bytes each",
                              reason=Reason.STATE_INVALID)
    for name, limit in (("fcw", 0xFFFF), ("fsw", 0xFFFF), ("ftwx", 0xFF),
                        ("last_opcode", 0xFFFF)):
        if getattr(msg, name) > limit:
            raise InvalidArgument(f"fpu.{name} is out of range", reason=Reason.STATE_INVALID)
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
            raise InvalidArgument(f"vcpu_events.{name} = {value} is out of range",
                                  reason=Reason.STATE_INVALID)
    return VcpuEvents(**values)


def cpuid_to_pb(entries: list[CpuidEntry]) -> pb.CpuidEntries:
    return pb.CpuidEntries(entries=[
        pb.CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax, ebx=e.ebx,
                      ecx=e.ecx, edx=e.edx) for e in entries])


def cpuid_from_pb(entries: Any) -> list[CpuidEntry]:
    return [CpuidEntry(function=e.function, index=e.index, flags=e.flags, eax=e.eax,
                       ebx=e.ebx, ecx=e.ecx, edx=e.edx) for e in entries]


def route_from_pb(msg: pb.IrqRoute) -> IrqRoute:
    which = msg.WhichOneof("target")
    if which == "irqchip":
        chip = int(msg.irqchip.chip)
        if chip not in tuple(IrqChip):
            raise InvalidArgument(f"route for gsi {msg.gsi}: unknown irqchip {chip}",
                                  reason=Reason.STATE_INVALID)
        return IrqChipRoute(msg.gsi, IrqChip(chip), msg.irqchip.pin)
    if which == "msi":
        devid = msg.msi.devid if msg.msi.HasField("devid") else None
        return MsiRoute(msg.gsi, msg.msi.address, msg.msi.data, devid)
    raise InvalidArgument(f"route for gsi {msg.gsi} has no target (irqchip or msi)",
                          reason=Reason.STATE_INVALID)




def route_to_pb(route: IrqRoute) -> pb.IrqRoute:
    if isinstance(route, IrqChipRoute):
        chip = pb.IrqChipPin.Chip.Name(int(route.chip))
        return pb.IrqRoute(gsi=route.gsi, irqchip=pb.IrqChipPin(chip=chip, pin=route.pin))
    msi = pb.MsiMessage(address=route.address, data=route.data)
    if route.devid is not None:
        msi.devid = route.devid
    return pb.IrqRoute(gsi=route.gsi, msi=msi)


# -- state dataclasses of the binding --------------------------------------------------------

def _dataclass_to_pb(value: Any, cls: Any) -> Any:
    return cls(**{name: getattr(value, name) for name in cls.DESCRIPTOR.fields_by_name
                  if hasattr(value, name)})


def _pb_fields(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


def pic_to_pb(p: PicState) -> pb.SavedPic:
    return _dataclass_to_pb(p, pb.SavedPic)


def pic_from_pb(msg: pb.SavedPic) -> PicState:
    return PicState(**_pb_fields(msg))


def ioapic_to_pb(s: IoapicState) -> pb.SavedIoapic:
    return pb.SavedIoapic(base_address=s.base_address, ioregsel=s.ioregsel, id=s.id,
                          irr=s.irr, redirtbl=s.redirtbl)


def ioapic_from_pb(msg: pb.SavedIoapic) -> IoapicState:
    if len(msg.redirtbl) != len(IoapicState().redirtbl):
        raise InvalidArgument(f"IOAPIC state has {len(msg.redirtbl)} redirection entries",
                              reason=Reason.STATE_INVALID)
    return IoapicState(base_address=msg.base_address, ioregsel=msg.ioregsel, id=msg.id,
                       irr=msg.irr, redirtbl=list(msg.redirtbl))


def pit_to_pb(p: PitState) -> pb.SavedPit:
    return pb.SavedPit(channels=[_dataclass_to_pb(c, pb.SavedPitChannel) for c in p.channels],
                       flags=p.flags)


def pit_from_pb(msg: pb.SavedPit) -> PitState:
    if len(msg.channels) != 3:
        raise InvalidArgument(f"PIT state has {len(msg.channels)} channels, not 3",
                              reason=Reason.STATE_INVALID)
    return PitState(channels=[PitChannelState(**_pb_fields(c)) for c in msg.channels],
                    flags=msg.flags)


def clock_to_pb(c: ClockData) -> pb.SavedClock:
    return pb.SavedClock(clock=c.clock, flags=c.flags, realtime=c.realtime,
                         host_tsc=c.host_tsc)


def clock_from_pb(msg: pb.SavedClock) -> ClockData:
    return ClockData(clock=msg.clock, flags=msg.flags, realtime=msg.realtime,
                     host_tsc=msg.host_tsc)


def debugregs_to_pb(d: DebugRegs) -> pb.SavedDebugRegs:
    return pb.SavedDebugRegs(db=d.db, dr6=d.dr6, dr7=d.dr7, flags=d.flags)


def debugregs_from_pb(msg: pb.SavedDebugRegs) -> DebugRegs:
    if len(msg.db) != 4:
        raise InvalidArgument(f"debug registers: {len(msg.db)} breakpoints, not 4",
                              reason=Reason.STATE_INVALID)
    return DebugRegs(db=list(msg.db), dr6=msg.dr6, dr7=msg.dr7, flags=msg.flags)


# -- the daemon's state model -----------------------------------------------------------------

def vcpu_state_to_pb(v: VcpuState) -> pb.SavedVcpu:
    msg = pb.SavedVcpu(
        vcpu_id=v.vcpu_id, run_state=v.run_state, reason=v.reason, cpuid=cpuid_to_pb(
            v.cpuid).entries, tsc_khz=v.tsc_khz, regs=regs_to_pb(v.regs),
        sregs=sregs_to_pb(v.sregs), lapic=v.lapic,
        msrs=[pb.Msr(index=i, value=x) for i, x in sorted(v.msrs.items())],
        mp_state=v.mp_state, events=events_to_pb(v.events), pending_irqs=v.pending_irqs,
        exit_counts=v.exit_counts, cpu_ns=v.cpu_ns)
    if v.xsave is not None:
        msg.xsave = v.xsave.region
    if v.fpu is not None:
        msg.fpu.CopyFrom(fpu_to_pb(v.fpu))
    if v.xcrs is not None:
        msg.has_xcrs = True
        msg.xcrs_flags = v.xcrs.flags
        msg.xcrs.extend(pb.Msr(index=x.xcr, value=x.value) for x in v.xcrs.xcrs)
    if v.debugregs is not None:
        msg.has_debugregs = True
        msg.debugregs.CopyFrom(debugregs_to_pb(v.debugregs))
    return msg


def vcpu_state_from_pb(msg: pb.SavedVcpu) -> VcpuState:
    if msg.lapic and len(msg.lapic) != LAPIC_BYTES:
        raise InvalidArgument(f"vcpu {msg.vcpu_id}: LAPIC state of {len(msg.lapic)} bytes",
                              reason=Reason.STATE_INVALID)
    return VcpuState(
        vcpu_id=msg.vcpu_id, run_state=msg.run_state, reason=msg.reason,
        cpuid=cpuid_from_pb(msg.cpuid), tsc_khz=msg.tsc_khz, regs=regs_from_pb(msg.regs),
        sregs=sregs_from_pb(msg.sregs),
        xsave=Xsave(bytes(msg.xsave)) if msg.xsave else None,
        fpu=fpu_from_pb(msg.fpu) if msg.HasField("fpu") else None,
        xcrs=Xcrs(xcrs=[Xcr(m.index, m.value) for m in msg.xcrs], flags=msg.xcrs_flags)
        if msg.has_xcrs else None,
        debugregs=debugregs_from_pb(msg.debugregs) if msg.has_debugregs else None,
        lapic=bytes(msg.lapic), msrs={m.index: m.value for m in msg.msrs},
        mp_state=msg.mp_state, events=events_from_pb(msg.events),
        pending_irqs=list(msg.pending_irqs), exit_counts=dict(msg.exit_counts),
        cpu_ns=msg.cpu_ns)


def vm_state_to_pb(s: VmState) -> pb.SavedVm:
    msg = pb.SavedVm(
        vm_id=s.vm_id, labels=s.labels, owner=s.owner,
        options=pb.VmOptions(**{k: s.options[k] for k in VM_OPTION_FIELDS  # type: ignore[arg-type]
                                if k in s.options}),
        reason=s.reason,
        slots=[pb.SavedSlot(slot=x.slot, guest_addr=x.guest_addr, size=x.size,
                            read_only=x.read_only, log_dirty=x.log_dirty) for x in s.slots],
        vcpus=[vcpu_state_to_pb(v) for v in s.vcpus],
        custom_gsi_routes=s.gsi_routes is not None,
        gsi_routes=[route_to_pb(r) for r in s.gsi_routes or []],
        irqfds=[pb.SavedIrqfd(irqfd_id=i.irqfd_id, gsi=i.gsi, resample=i.resample,
                              triggers=i.triggers, resamples=i.resamples) for i in s.irqfds],
        uart=_dataclass_to_pb(s.uart, pb.SavedUart),
        console=pb.SavedConsole(backlog=s.console.backlog, bytes_out=s.console.bytes_out,
                                bytes_in=s.console.bytes_in),
        files=[pb.SavedFileMapping(slot=f.slot, offset=f.offset, size=f.size, image=f.image,
                                   file_offset=f.file_offset, writable=f.writable,
                                   whole_slot=f.whole_slot, file_size=f.file_size,
                                   xxh3_128=f.digest) for f in s.files])
    if s.exit_code is not None:
        msg.exit_code = s.exit_code
    for e in s.ioevents:
        saved = msg.ioevents.add(ioevent_id=e.ioevent_id, space=SPACE_VALUES[e.space],
                                 address=e.address, length=e.length, fired=e.fired)
        if e.datamatch is not None:
            saved.datamatch = e.datamatch
    if s.irqchip is not None:
        msg.irqchip.CopyFrom(pb.SavedIrqchip(pic_master=pic_to_pb(s.irqchip.pic_master),
                                             pic_slave=pic_to_pb(s.irqchip.pic_slave),
                                             ioapic=ioapic_to_pb(s.irqchip.ioapic)))
    if s.pit is not None:
        msg.pit.CopyFrom(pit_to_pb(s.pit))
    if s.clock is not None:
        msg.clock.CopyFrom(clock_to_pb(s.clock))
    return msg


def vm_state_from_pb(msg: pb.SavedVm) -> VmState:
    ioevents = []
    for e in msg.ioevents:
        if e.space not in SPACE_NAMES:
            raise InvalidArgument(f"ioevent {e.ioevent_id!r}: unknown address space {e.space}",
                                  reason=Reason.STATE_INVALID)
        ioevents.append(IoeventState(e.ioevent_id, SPACE_NAMES[e.space], e.address, e.length,
                                     e.datamatch if e.HasField("datamatch") else None,
                                     e.fired))
    return VmState(
        vm_id=msg.vm_id, labels=dict(msg.labels), owner=msg.owner,
        options={k: getattr(msg.options, k) for k in VM_OPTION_FIELDS},
        reason=msg.reason, exit_code=msg.exit_code if msg.HasField("exit_code") else None,
        slots=[SlotState(x.slot, x.guest_addr, x.size, x.read_only, x.log_dirty)
               for x in msg.slots],
        vcpus=[vcpu_state_from_pb(v) for v in msg.vcpus],
        irqchip=IrqchipState(pic_from_pb(msg.irqchip.pic_master),
                             pic_from_pb(msg.irqchip.pic_slave),
                             ioapic_from_pb(msg.irqchip.ioapic))
        if msg.HasField("irqchip") else None,
        pit=pit_from_pb(msg.pit) if msg.HasField("pit") else None,
        clock=clock_from_pb(msg.clock) if msg.HasField("clock") else None,
        gsi_routes=[route_from_pb(r) for r in msg.gsi_routes]
        if msg.custom_gsi_routes else None,
        irqfds=[IrqfdState(i.irqfd_id, i.gsi, i.resample, i.triggers, i.resamples)
                for i in msg.irqfds],
        ioevents=ioevents,
        uart=UartState(**{k: getattr(msg.uart, k) for k in UartState.__dataclass_fields__}),
        console=ConsoleState(bytes(msg.console.backlog), msg.console.bytes_out,
                             msg.console.bytes_in),
        files=[FileMappingState(f.slot, f.offset, f.size, f.image, f.file_offset, f.writable,
                                f.whole_slot, f.file_size, bytes(f.xxh3_128))
               for f in msg.files],
    )
