"""Decoded vCPU exits: plain data copied out of kvm_run by `kvmd_run` (in C)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvmd.kvm._ffi import ffi, lib
from kvmd.kvm._names import EXIT_REASONS

# Kernel exit reason number -> short lower-case name ("io", "mmio", "hlt", ...).
EXIT_REASON_NAMES: dict[int, str] = {
    int(getattr(lib, name)): name.removeprefix("KVM_EXIT_").lower() for name in EXIT_REASONS
}

SYSTEM_EVENT_NAMES: dict[int, str] = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    lib.KVM_SYSTEM_EVENT_RESET: "reset",
    lib.KVM_SYSTEM_EVENT_CRASH: "crash",
    lib.KVM_SYSTEM_EVENT_WAKEUP: "wakeup",
    lib.KVM_SYSTEM_EVENT_SUSPEND: "suspend",
    lib.KVM_SYSTEM_EVENT_SEV_TERM: "sev_term",
}

INTERNAL_ERROR_NAMES: dict[int, str] = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "emulation",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous_exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "delivery_event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected_exit_reason",
}


@dataclass(frozen=True)
class VcpuExit:
    """Base of every decoded exit; `reason` is the kernel's KVM_EXIT_* number."""

    reason: ClassVar[int] = -1

    @property
    def name(self) -> str:
        return EXIT_REASON_NAMES.get(self.reason, f"unknown_{self.reason}")


@dataclass(frozen=True)
class IoExit(VcpuExit):
    """Port IO. For OUT, `data` holds size*count bytes; for IN, complete with
    `Vcpu.complete_io_in(data)` before the next run."""

    reason: ClassVar[int] = lib.KVM_EXIT_IO
    is_write: bool
    port: int
    size: int
    count: int
    data: bytes

    @property
    def direction(self) -> str:
        return "out" if self.is_write else "in"


@dataclass(frozen=True)
class MmioExit(VcpuExit):
    """Memory-mapped IO. For reads, complete with `Vcpu.complete_mmio_read(data)`."""

    reason: ClassVar[int] = lib.KVM_EXIT_MMIO
    address: int
    length: int
    is_write: bool
    data: bytes


@dataclass(frozen=True)
class HltExit(VcpuExit):
    """The guest executed HLT (only without an in-kernel irqchip)."""

    reason: ClassVar[int] = lib.KVM_EXIT_HLT


@dataclass(frozen=True)
class ShutdownExit(VcpuExit):
    """Triple fault or similar: the guest cannot continue."""

    reason: ClassVar[int] = lib.KVM_EXIT_SHUTDOWN


@dataclass(frozen=True)
class FailEntryExit(VcpuExit):
    """VM entry failed; `hardware_entry_failure_reason` is the VMX/SVM reason."""

    reason: ClassVar[int] = lib.KVM_EXIT_FAIL_ENTRY
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalErrorExit(VcpuExit):
    """KVM could not handle the exit (e.g. an emulation failure)."""

    reason: ClassVar[int] = lib.KVM_EXIT_INTERNAL_ERROR
    suberror: int
    data: tuple[int, ...]

    @property
    def suberror_name(self) -> str:
        return INTERNAL_ERROR_NAMES.get(self.suberror, f"suberror_{self.suberror}")


@dataclass(frozen=True)
class SystemEventExit(VcpuExit):
    """A system event: shutdown, reset, crash, wakeup, suspend."""

    reason: ClassVar[int] = lib.KVM_EXIT_SYSTEM_EVENT
    type: int
    flags: int
    data: tuple[int, ...]

    @property
    def event(self) -> str:
        return SYSTEM_EVENT_NAMES.get(self.type, f"event_{self.type}")


@dataclass(frozen=True)
class RdMsrExit(VcpuExit):
    """A guest RDMSR sent to userspace; complete with `Vcpu.complete_msr(value)`, else the
    guest gets #GP."""

    reason: ClassVar[int] = lib.KVM_EXIT_X86_RDMSR
    index: int
    msr_reason: int


@dataclass(frozen=True)
class WrMsrExit(VcpuExit):
    """A guest WRMSR sent to userspace; complete with `Vcpu.complete_msr()`, else #GP."""

    reason: ClassVar[int] = lib.KVM_EXIT_X86_WRMSR
    index: int
    data: int
    msr_reason: int


@dataclass(frozen=True)
class HypervExit(VcpuExit):
    """A Hyper-V SynIC or hypercall exit; `fields` by type (synic: msr, control, evt_page,
    msg_page; hcall: input, params0, params1)."""

    reason: ClassVar[int] = lib.KVM_EXIT_HYPERV
    type: int
    fields: tuple[int, ...]


@dataclass(frozen=True)
class IoapicEoiExit(VcpuExit):
    """End of interrupt for a level-triggered vector (split irqchip)."""

    reason: ClassVar[int] = lib.KVM_EXIT_IOAPIC_EOI
    vector: int


@dataclass(frozen=True)
class DebugExit(VcpuExit):
    """A debug exception (single step, breakpoint) with guest debugging enabled."""

    reason: ClassVar[int] = lib.KVM_EXIT_DEBUG
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True)
class IntrExit(VcpuExit):
    """KVM_RUN returned because of a signal or `immediate_exit` (a kick)."""

    reason: ClassVar[int] = lib.KVM_EXIT_INTR


@dataclass(frozen=True)
class ExceptionExit(VcpuExit):
    """An exception exit (KVM_EXIT_EXCEPTION)."""

    reason: ClassVar[int] = lib.KVM_EXIT_EXCEPTION
    exception: int
    error_code: int


@dataclass(frozen=True)
class HypercallExit(VcpuExit):
    """A hypercall forwarded to userspace (KVM_CAP_EXIT_HYPERCALL)."""

    reason: ClassVar[int] = lib.KVM_EXIT_HYPERCALL
    nr: int
    args: tuple[int, ...]


@dataclass(frozen=True)
class OtherExit(VcpuExit):
    """Any exit reason with no fields of interest here, or one unknown to this binding:
    reported as its number, never as a crash. `value` is hardware_exit_reason for UNKNOWN."""

    exit_reason: int
    value: int = 0

    @property
    def name(self) -> str:
        return EXIT_REASON_NAMES.get(self.exit_reason, f"unknown_{self.exit_reason}")


def _words(ex: Any) -> tuple[int, ...]:
    return tuple(ex.words[0 : ex.ndata])


# Exit reasons as plain ints: decode_exit runs once per exit, so it avoids attribute
# lookups on `lib` and keyword construction (both measurable at a few microseconds per exit).
_IO = int(lib.KVM_EXIT_IO)
_IO_OUT = int(lib.KVM_EXIT_IO_OUT)
_MMIO = int(lib.KVM_EXIT_MMIO)
_HLT = int(lib.KVM_EXIT_HLT)
_UNKNOWN = int(lib.KVM_EXIT_UNKNOWN)
_HLT_EXIT = HltExit()
_SHUTDOWN_EXIT = ShutdownExit()
_INTR_EXIT = IntrExit()
_buffer = ffi.buffer


def decode_exit(ex: Any) -> VcpuExit:
    """Turn a filled `struct kvmd_exit` into a VcpuExit dataclass."""
    reason = ex.reason
    if reason == _IO:
        return IoExit(ex.direction == _IO_OUT, ex.address, ex.size, ex.count,
                      _buffer(ex.data, ex.data_len)[:])
    if reason == _MMIO:
        return MmioExit(ex.address, ex.size, bool(ex.direction),
                        _buffer(ex.data, ex.data_len)[:])
    if reason == _HLT:
        return _HLT_EXIT
    return _DECODERS.get(reason, _other)(ex)


def _other(ex: Any) -> VcpuExit:
    reason = ex.reason
    return OtherExit(reason, ex.value if reason == _UNKNOWN else 0)


_DECODERS: dict[int, Callable[[Any], VcpuExit]] = {
    lib.KVM_EXIT_SHUTDOWN: lambda ex: _SHUTDOWN_EXIT,
    lib.KVM_EXIT_FAIL_ENTRY: lambda ex: FailEntryExit(ex.value, ex.subtype),
    lib.KVM_EXIT_INTERNAL_ERROR: lambda ex: InternalErrorExit(ex.subtype, _words(ex)),
    lib.KVM_EXIT_SYSTEM_EVENT: lambda ex: SystemEventExit(ex.subtype, ex.value, _words(ex)),
    lib.KVM_EXIT_X86_RDMSR: lambda ex: RdMsrExit(ex.address, ex.subtype),
    lib.KVM_EXIT_X86_WRMSR: lambda ex: WrMsrExit(ex.address, ex.value, ex.subtype),
    lib.KVM_EXIT_HYPERV: lambda ex: HypervExit(ex.subtype, _words(ex)),
    lib.KVM_EXIT_IOAPIC_EOI: lambda ex: IoapicEoiExit(ex.value),
    lib.KVM_EXIT_DEBUG: lambda ex: DebugExit(ex.subtype, ex.value, ex.words[0], ex.words[1]),
    lib.KVM_EXIT_INTR: lambda ex: _INTR_EXIT,
    lib.KVM_EXIT_EXCEPTION: lambda ex: ExceptionExit(ex.subtype, ex.value),
    lib.KVM_EXIT_HYPERCALL: lambda ex: HypercallExit(ex.value, _words(ex)),
}


# -- dirty ring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DirtyRingFullExit(VcpuExit):
    """The vCPU's dirty ring is (soft-)full: KVM stopped it before it dirties pages it could
    not record. The caller harvests (`Vm.harvest_dirty_rings` or
    `Vcpu.harvest_dirty_ring`), calls `Vm.reset_dirty_rings()`, then runs the vCPU again;
    running it again without the reset returns this exit at once."""

    reason: ClassVar[int] = lib.KVM_EXIT_DIRTY_RING_FULL


_DIRTY_RING_FULL_EXIT = DirtyRingFullExit()
_DECODERS[lib.KVM_EXIT_DIRTY_RING_FULL] = lambda ex: _DIRTY_RING_FULL_EXIT
