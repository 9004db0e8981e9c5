"""Plain-data types of the binding: register files, CPUID, routes, ioevent addresses.

Kernel structs never leave `kvmd.kvm`: these dataclasses are what callers see, and they are
serializable (for snapshots and migration) with `dataclasses.asdict`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

REG_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)


@dataclass
class Regs:
    """General-purpose registers (struct kvm_regs)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


SEGMENT_FIELDS: tuple[str, ...] = (
    "base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
    "unusable",
)


@dataclass
class Segment:
    """A segment register (struct kvm_segment)."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the kernel's name for the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass
class DTable:
    """A descriptor-table register, GDTR or IDTR (struct kvm_dtable)."""

    base: int = 0
    limit: int = 0


SEGMENT_NAMES: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
DTABLE_NAMES: tuple[str, ...] = ("gdt", "idt")
CONTROL_NAMES: tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


@dataclass
class Sregs:
    """Special registers (struct kvm_sregs)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


@dataclass
class Fpu:
    """x87/SSE state (struct kvm_fpu): 8 x87 registers and 16 XMM registers of 16 bytes."""

    fpr: list[bytes] = field(default_factory=lambda: [bytes(16)] * 8)
    fcw: int = 0x37F
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: list[bytes] = field(default_factory=lambda: [bytes(16)] * 16)
    mxcsr: int = 0x1F80


@dataclass
class CpuidEntry:
    """One CPUID leaf (struct kvm_cpuid_entry2)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


@dataclass
class VcpuEvents:
    """Pending/injected exceptions, interrupts, NMI and SMI (struct kvm_vcpu_events)."""

    exception_injected: int = 0
    exception_nr: int = 0
    exception_has_error_code: int = 0
    exception_pending: int = 0
    exception_error_code: int = 0
    interrupt_injected: int = 0
    interrupt_nr: int = 0
    interrupt_soft: int = 0
    interrupt_shadow: int = 0
    nmi_injected: int = 0
    nmi_pending: int = 0
    nmi_masked: int = 0
    sipi_vector: int = 0
    flags: int = 0
    smi_smm: int = 0
    smi_pending: int = 0
    smi_smm_inside_nmi: int = 0
    smi_latched_init: int = 0
    triple_fault_pending: int = 0
    exception_has_payload: int = 0
    exception_payload: int = 0


VCPU_EVENT_FIELDS: tuple[str, ...] = tuple(VcpuEvents.__dataclass_fields__)


class MpState(enum.IntEnum):
    """Multiprocessing state of a vCPU (KVM_MP_STATE_*)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class IrqChip(enum.IntEnum):
    """Targets of an irqchip GSI route."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


@dataclass(frozen=True)
class IrqChipRoute:
    """Route a GSI to a pin of the in-kernel PIC or IOAPIC."""

    gsi: int
    chip: IrqChip
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """Route a GSI to an MSI message."""

    gsi: int
    address: int
    data: int
    devid: int | None = None


IrqRoute = IrqChipRoute | MsiRoute


class IoSpace(enum.Enum):
    """Address space of an ioevent or a guest access."""

    PIO = "pio"
    MMIO = "mmio"


@dataclass(frozen=True)
class IoEventAddress:
    """Where an ioeventfd listens: a port or a guest physical address."""

    space: IoSpace
    address: int

    @classmethod
    def pio(cls, port: int) -> IoEventAddress:
        return cls(IoSpace.PIO, port)

    @classmethod
    def mmio(cls, address: int) -> IoEventAddress:
        return cls(IoSpace.MMIO, address)


@dataclass(frozen=True)
class Datamatch:
    """Which writes fire an ioeventfd: any write (length 0), or a write of `length` bytes
    (1, 2, 4 or 8) equal to `value`."""

    length: int = 0
    value: int | None = None

    @classmethod
    def any_length(cls) -> Datamatch:
        return cls(0, None)

    @classmethod
    def u8(cls, value: int | None = None) -> Datamatch:
        return cls(1, value)

    @classmethod
    def u16(cls, value: int | None = None) -> Datamatch:
        return cls(2, value)

    @classmethod
    def u32(cls, value: int | None = None) -> Datamatch:
        return cls(4, value)

    @classmethod
    def u64(cls, value: int | None = None) -> Datamatch:
        return cls(8, value)


@dataclass(frozen=True)
class StatDescriptor:
    """One kernel binary statistic (struct kvm_stats_desc), decoded."""

    name: str
    kind: str  # cumulative, instant, peak, linear_hist, log_hist
    unit: str  # none, bytes, seconds, cycles, boolean
    base: int  # 10 or 2
    exponent: int
    size: int
    offset: int
    bucket_size: int
