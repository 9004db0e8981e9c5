"""kvmd.kvm: a safe cffi binding of the x86_64 KVM API.

One class per file descriptor, as in rust-vmm's kvm-ioctls and crosvm: `Kvm` (/dev/kvm) ->
`Vm` -> `Vcpu`. Kernel structs stay inside this package; callers see dataclasses. Every
failure is a `KvmError` carrying the errno and the ioctl's name. Imports only the stdlib and
cffi: nothing of gRPC, Prometheus or the daemon.
"""

from kvmd.kvm.dirty import DirtyBitmaps, DirtyLogModes
from kvmd.kvm.errors import KvmError
from kvmd.kvm.eventfd import EventFd
from kvmd.kvm.exits import (
    EXIT_REASON_NAMES,
    DebugExit,
    DirtyRingFullExit,
    ExceptionExit,
    FailEntryExit,
    HltExit,
    HypercallExit,
    HypervExit,
    InternalErrorExit,
    IntrExit,
    IoapicEoiExit,
    IoExit,
    MmioExit,
    OtherExit,
    RdMsrExit,
    ShutdownExit,
    SystemEventExit,
    VcpuExit,
    WrMsrExit,
)
from kvmd.kvm.memory import (
    PAGE_SIZE,
    FileBacking,
    FileMapping,
    MemfdBacking,
    MemoryRegionInfo,
    dirty_log_bitmap_size,
)
from kvmd.kvm.stats import StatsReader
from kvmd.kvm.system import CAPABILITY_NUMBERS, KVM_API_VERSION, Kvm, capability_number
from kvmd.kvm.types import (
    CpuidEntry,
    Datamatch,
    DTable,
    Fpu,
    IoEventAddress,
    IoSpace,
    IrqChip,
    IrqChipRoute,
    IrqRoute,
    MpState,
    MsiRoute,
    Regs,
    Segment,
    Sregs,
    StatDescriptor,
    VcpuEvents,
)
from kvmd.kvm.vcpu import PioMap, Vcpu, kick_signal
from kvmd.kvm.vm import Device, Vm

__all__ = [
    "CAPABILITY_NUMBERS",
    "EXIT_REASON_NAMES",
    "KVM_API_VERSION",
    "PAGE_SIZE",
    "CpuidEntry",
    "DTable",
    "Datamatch",
    "DebugExit",
    "Device",
    "DirtyBitmaps",
    "DirtyLogModes",
    "DirtyRingFullExit",
    "EventFd",
    "ExceptionExit",
    "FailEntryExit",
    "FileBacking",
    "FileMapping",
    "Fpu",
    "HltExit",
    "HypercallExit",
    "HypervExit",
    "InternalErrorExit",
    "IntrExit",
    "IoEventAddress",
    "IoExit",
    "IoSpace",
    "IoapicEoiExit",
    "IrqChip",
    "IrqChipRoute",
    "IrqRoute",
    "Kvm",
    "KvmError",
    "MemfdBacking",
    "MemoryRegionInfo",
    "MmioExit",
    "MpState",
    "MsiRoute",
    "OtherExit",
    "PioMap",
    "RdMsrExit",
    "Regs",
    "Segment",
    "ShutdownExit",
    "Sregs",
    "StatDescriptor",
    "StatsReader",
    "SystemEventExit",
    "Vcpu",
    "VcpuEvents",
    "VcpuExit",
    "Vm",
    "WrMsrExit",
    "capability_number",
    "dirty_log_bitmap_size",
    "kick_signal",
]
