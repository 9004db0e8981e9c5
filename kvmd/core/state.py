"""Plain-data state of a VM and everything in it, as saved for snapshots, migration and
daemon take-over.

Each stateful object of the core saves and restores its own part (`ManagedVcpu`,
`ManagedVm`, `Uart16550`, `Console`, ...): these dataclasses are only the shapes they
exchange, with no behaviour, so there is exactly one owner of every piece of state.
Guest memory contents are not here: they travel separately (sparse, by page), or not at
all when memfds are handed over. Remote exit claims and watch streams belong to clients
and are not VM state: after a restore, clients claim and watch again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmd.kvm import CpuidEntry, Fpu, IrqRoute, Regs, Sregs, UartRegsState, VcpuEvents
from kvmd.kvm.state_types import (
    ClockData,
    DebugRegs,
    IoapicState,
    PicState,
    PitState,
    Xcrs,
    Xsave,
)


@dataclass
class VcpuState:
    """One vCPU: its run state and every register file KVM lets userspace save.

    `run_state` is the daemon's state when the save was asked for (running, halted,
    paused, created, stopped, crashed), so a restore can put the vCPU back where it was.
    `fpu` is kept for vCPUs without XSAVE only; with XSAVE the image in `xsave` is the one
    KVM restores (KVM_SET_FPU alone is invisible to the guest on a new vCPU).
    """

    vcpu_id: int
    run_state: str
    reason: str = ""
    cpuid: list[CpuidEntry] = field(default_factory=list)
    tsc_khz: int = 0
    regs: Regs = field(default_factory=Regs)
    sregs: Sregs = field(default_factory=Sregs)
    xsave: Xsave | None = None
    fpu: Fpu | None = None
    xcrs: Xcrs | None = None
    debugregs: DebugRegs | None = None
    lapic: bytes = b""  # empty without the in-kernel irqchip
    msrs: dict[int, int] = field(default_factory=dict)
    mp_state: int = 0
    events: VcpuEvents = field(default_factory=VcpuEvents)
    pending_irqs: list[int] = field(default_factory=list)  # queued KVM_INTERRUPT vectors
    exit_counts: dict[str, int] = field(default_factory=dict)
    cpu_ns: int = 0  # CPU time of its threads so far


@dataclass
class SlotState:
    """A memory slot's layout and flags (its contents travel separately)."""

    slot: int
    guest_addr: int
    size: int
    read_only: bool = False
    log_dirty: bool = False


@dataclass
class FileMappingState:
    """A file of the images directory mapped into guest memory: it travels by reference.
    `digest` (XXH3-128 of the mapped bytes, filled by the state layer when saved) and
    `file_size` are what the restoring side checks its file of the same name against."""

    slot: int
    offset: int
    size: int
    image: str
    file_offset: int
    writable: bool
    whole_slot: bool
    file_size: int = 0
    digest: bytes = b""

    def place(self) -> tuple[int, int, int, str, int, bool, bool]:
        """Where and what is mapped (without the check values)."""
        return (self.slot, self.offset, self.size, self.image, self.file_offset,
                self.writable, self.whole_slot)


@dataclass
class IrqchipState:
    """The in-kernel interrupt controllers (VMs created with the irqchip option)."""

    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState


@dataclass
class IrqfdState:
    """A daemon-owned irqfd: restored with new eventfds, same id, GSI and counters."""

    irqfd_id: str
    gsi: int
    resample: bool
    triggers: int = 0
    resamples: int = 0


@dataclass
class IoeventState:
    """A daemon-owned ioevent: restored with a new eventfd, same id, address and count."""

    ioevent_id: str
    space: str  # "pio" or "mmio"
    address: int
    length: int
    datamatch: int | None
    fired: int = 0


# The COM1 16550's registers and its receive FIFO (guest input not yet read): the state the
# binding's UART registers (kvmd.kvm.uart, in C) save and restore, as they are.
UartState = UartRegsState


@dataclass
class ConsoleState:
    """The console backlog a restored VM's StreamConsole replays, and its byte counts."""

    backlog: bytes = b""
    bytes_out: int = 0
    bytes_in: int = 0


@dataclass
class VmState:
    """Everything about a VM except its guest memory contents.

    `options` are the VmOptions as dataclass fields (irqchip, pit, ...), `gsi_routes` is
    None while the VM uses KVM's default routing (the daemon keeps the table it set, since
    KVM cannot return it).
    """

    vm_id: str
    labels: dict[str, str]
    owner: str
    options: dict[str, int | bool]
    reason: str = ""
    exit_code: int | None = None
    slots: list[SlotState] = field(default_factory=list)
    vcpus: list[VcpuState] = field(default_factory=list)
    irqchip: IrqchipState | None = None
    pit: PitState | None = None
    clock: ClockData | None = None
    gsi_routes: list[IrqRoute] | None = None
    irqfds: list[IrqfdState] = field(default_factory=list)
    ioevents: list[IoeventState] = field(default_factory=list)
    uart: UartState = field(default_factory=UartState)
    console: ConsoleState = field(default_factory=ConsoleState)
    files: list[FileMappingState] = field(default_factory=list)
    dirty_pages_total: int = 0

    @property
    def memory_bytes(self) -> int:
        return sum(s.size for s in self.slots)
