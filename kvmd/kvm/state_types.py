"""Plain-data VM and vCPU state for snapshot/restore: XSAVE, XCRs, debug registers, the
in-kernel PIC/IOAPIC and PIT, and the kvmclock.

Like `types.py`, kernel structs never leave `kvmd.kvm`: these dataclasses hold only ints,
bytes, lists and nested dataclasses, compare equal field by field, and round-trip through
`dataclasses.asdict` (the next layer serializes them to protobuf for snapshots).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmd.kvm.errors import invalid

# struct kvm_xsave's fixed part; KVM_GET_XSAVE always transfers exactly this much, and
# KVM_CAP_XSAVE2 never reports less.
XSAVE_LEGACY_SIZE = 4096

# Offsets in the (non-compacted, "standard") XSAVE format KVM uses for struct kvm_xsave,
# Intel SDM vol. 1, 10.5.1 (FXSAVE layout) and 13.4 (XSAVE area).
XSAVE_FCW = 0            # u16 x87 control word
XSAVE_FSW = 2            # u16 x87 status word
XSAVE_FTW = 4            # u8 abridged x87 tag word
XSAVE_MXCSR = 24         # u32
XSAVE_MXCSR_MASK = 28    # u32
XSAVE_ST0 = 32           # 8 x87 registers, 16 bytes apart (10 used)
XSAVE_XMM0 = 160         # 16 XMM registers, 16 bytes each
XSAVE_HEADER = 512       # XSTATE_BV (u64), XCOMP_BV (u64), 48 reserved bytes
XSAVE_XSTATE_BV = XSAVE_HEADER
XSAVE_XCOMP_BV = XSAVE_HEADER + 8
XSAVE_YMM_HI128 = 576    # upper halves of YMM0-15 (CPUID.(EAX=0DH,ECX=2).EBX on x86)

# XSTATE_BV / XCR0 bits (state components).
XFEATURE_X87 = 1 << 0
XFEATURE_SSE = 1 << 1
XFEATURE_AVX = 1 << 2

XMM_REGISTERS = 16
X87_REGISTERS = 8


@dataclass
class Xsave:
    """The vCPU's x87/SSE/AVX/... state as the kernel's XSAVE image (struct kvm_xsave).

    `region` is opaque to the binding except for the helpers below, which read and write
    the legacy (FXSAVE) area and the header. Its length is the vCPU's XSAVE size: 4096
    bytes (KVM_GET_XSAVE), or KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM when that is
    larger (dynamically enabled features such as AMX). The header's XSTATE_BV says which
    components hold data: a component whose bit is clear is in its initial state whatever
    its bytes say, which is why the setters below also set that bit.
    """

    region: bytes = bytes(XSAVE_LEGACY_SIZE)

    def _u(self, fmt: str, offset: int) -> int:
        return int(struct.unpack_from(fmt, self.region, offset)[0])

    def _put(self, offset: int, data: bytes, xfeature: int = 0) -> None:
        region = bytearray(self.region)
        region[offset:offset + len(data)] = data
        if xfeature:
            bv = struct.unpack_from("<Q", region, XSAVE_XSTATE_BV)[0] | xfeature
            struct.pack_into("<Q", region, XSAVE_XSTATE_BV, bv)
        self.region = bytes(region)

    @property
    def xstate_bv(self) -> int:
        """XSTATE_BV: the state components present in this image."""
        return self._u("<Q", XSAVE_XSTATE_BV)

    @property
    def fcw(self) -> int:
        """The x87 control word."""
        return self._u("<H", XSAVE_FCW)

    def set_fcw(self, value: int) -> None:
        """Set the x87 control word (and mark the x87 component present)."""
        if not 0 <= value < 1 << 16:
            raise invalid("Xsave.set_fcw", "the x87 control word is 16 bits")
        self._put(XSAVE_FCW, struct.pack("<H", value), XFEATURE_X87)

    @property
    def mxcsr(self) -> int:
        """The SSE control/status register."""
        return self._u("<I", XSAVE_MXCSR)

    def set_mxcsr(self, value: int) -> None:
        """Set MXCSR (and mark SSE present). Bits outside MXCSR_MASK make KVM_SET_XSAVE
        fail with EINVAL."""
        if not 0 <= value < 1 << 32:
            raise invalid("Xsave.set_mxcsr", "MXCSR is 32 bits")
        self._put(XSAVE_MXCSR, struct.pack("<I", value), XFEATURE_SSE)

    def xmm(self, index: int) -> bytes:
        """XMM register `index` (0-15), 16 bytes, little-endian as in memory."""
        if not 0 <= index < XMM_REGISTERS:
            raise invalid("Xsave.xmm", f"no XMM register {index}")
        offset = XSAVE_XMM0 + 16 * index
        return self.region[offset:offset + 16]

    def set_xmm(self, index: int, value: bytes) -> None:
        """Set XMM register `index` to 16 bytes (and mark SSE present)."""
        if not 0 <= index < XMM_REGISTERS:
            raise invalid("Xsave.set_xmm", f"no XMM register {index}")
        if len(value) != 16:
            raise invalid("Xsave.set_xmm", "an XMM register is 16 bytes")
        self._put(XSAVE_XMM0 + 16 * index, bytes(value), XFEATURE_SSE)

    def st(self, index: int) -> bytes:
        """x87 register ST(`index`)/MM`index` as stored: 10 significant bytes."""
        if not 0 <= index < X87_REGISTERS:
            raise invalid("Xsave.st", f"no x87 register {index}")
        offset = XSAVE_ST0 + 16 * index
        return self.region[offset:offset + 10]


@dataclass
class Xcr:
    """One extended control register: its index (0 is XCR0) and value."""

    xcr: int
    value: int


@dataclass
class Xcrs:
    """The vCPU's extended control registers (struct kvm_xcrs). KVM reports and accepts
    XCR0 only: KVM_SET_XCRS silently ignores entries for any other index."""

    xcrs: list[Xcr] = field(default_factory=list)
    flags: int = 0

    def get(self, xcr: int) -> int | None:
        """The value of one XCR, or None if absent."""
        return next((x.value for x in self.xcrs if x.xcr == xcr), None)


@dataclass
class DebugRegs:
    """Debug registers DR0-3, DR6 and DR7 (struct kvm_debugregs). The upper 32 bits of
    DR6 and DR7 must be zero and `flags` must be 0, or KVM_SET_DEBUGREGS fails (EINVAL)."""

    db: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    dr6: int = 0xFFFF0FF0   # the architectural reset value
    dr7: int = 0x400
    flags: int = 0


PIC_STATE_FIELDS: tuple[str, ...] = (
    "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
    "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
    "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
)


@dataclass
class PicState:
    """One in-kernel 8259 PIC (struct kvm_pic_state), every field a byte."""

    last_irr: int = 0                   # edge detection
    irr: int = 0                        # interrupt request register
    imr: int = 0                        # interrupt mask register
    isr: int = 0                        # in-service register
    priority_add: int = 0               # highest priority IRQ (rotation)
    irq_base: int = 0                   # vector of IRQ0 (ICW2)
    read_reg_select: int = 0            # OCW3: read ISR (1) or IRR (0)
    poll: int = 0
    special_mask: int = 0
    init_state: int = 0                 # ICW sequence position
    auto_eoi: int = 0
    rotate_on_auto_eoi: int = 0
    special_fully_nested_mode: int = 0
    init4: int = 0                      # ICW4 expected
    elcr: int = 0                       # PIIX edge/level control
    elcr_mask: int = 0                  # ELCR bits the guest may change


IOAPIC_PINS = 24
IOAPIC_REDIR_MASKED = 1 << 16   # the mask bit of a redirection entry


@dataclass
class IoapicState:
    """The in-kernel IOAPIC (struct kvm_ioapic_state). `redirtbl` holds the 24
    redirection entries as raw 64-bit values (vector in bits 0-7, mask in bit 16,
    destination in bits 56-63)."""

    base_address: int = 0xFEC00000
    ioregsel: int = 0
    id: int = 0
    irr: int = 0
    redirtbl: list[int] = field(default_factory=lambda: [IOAPIC_REDIR_MASKED] * IOAPIC_PINS)


PIT_CHANNEL_FIELDS: tuple[str, ...] = (
    "count", "latched_count", "count_latched", "status_latched", "status", "read_state",
    "write_state", "write_latch", "rw_mode", "mode", "bcd", "gate", "count_load_time",
)


@dataclass
class PitChannelState:
    """One i8254 channel (struct kvm_pit_channel_state).

    `count_load_time` is the host's monotonic clock (ns) when channels 1 and 2 loaded
    their count: not portable. KVM_SET_PIT2 reloads their counts at the time of the call
    (count_load_time becomes "now": a restored channel counts down afresh from `count`).
    Channel 0 measures time with its timer instead; KVM stores its count_load_time as
    given and never uses it.
    """

    count: int = 0x10000                # can be 65536
    latched_count: int = 0
    count_latched: int = 0              # 0, or which byte(s) of latched_count remain to read
    status_latched: int = 0
    status: int = 0
    read_state: int = 0
    write_state: int = 0
    write_latch: int = 0
    rw_mode: int = 0
    mode: int = 0
    bcd: int = 0
    gate: int = 0
    count_load_time: int = 0            # signed 64-bit


@dataclass
class PitState:
    """The in-kernel PIT (struct kvm_pit_state2): three channels and KVM_PIT_FLAGS_*."""

    channels: list[PitChannelState] = field(
        default_factory=lambda: [PitChannelState() for _ in range(3)])
    flags: int = 0


# KVM_GET_CLOCK / KVM_SET_CLOCK flags (struct kvm_clock_data).
KVM_CLOCK_TSC_STABLE = 2        # the clock is the same on every vCPU (KVM's master clock)
KVM_CLOCK_REALTIME = 1 << 2     # `realtime` is valid
KVM_CLOCK_HOST_TSC = 1 << 3     # `host_tsc` is valid


@dataclass
class ClockData:
    """The VM's kvmclock (struct kvm_clock_data).

    `clock` is the guest's kvmclock in ns. With KVM_CLOCK_REALTIME, `realtime` is the host
    wall clock (CLOCK_REALTIME, ns) at which `clock` was read; given back to KVM_SET_CLOCK
    with that flag, KVM advances `clock` by the wall time elapsed since, which is what a
    restore on another host (or later) wants. With KVM_CLOCK_HOST_TSC, `host_tsc` is the
    host TSC at that moment.
    """

    clock: int = 0
    flags: int = 0
    realtime: int = 0
    host_tsc: int = 0
