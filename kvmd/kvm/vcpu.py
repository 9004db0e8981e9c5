"""Vcpu: one KVM vCPU fd with its kvm_run mapping."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

from kvmd.kvm._ffi import ffi, ioctl, lib
from kvmd.kvm._names import COUNTER_SLOTS, EXIT_COUNTER_SLOTS, X86_EXIT_REASONS
from kvmd.kvm.caps import capability_number
from kvmd.kvm.dirty import DirtyBitmaps, DirtyRing
from kvmd.kvm.errors import KvmError, check, invalid
from kvmd.kvm.exits import IntrExit, VcpuExit, decode_exit
from kvmd.kvm.marshal import cpuid2_struct, cpuid_entries, enable_cap_struct, exact, u32, u64
from kvmd.kvm.state_types import XSAVE_LEGACY_SIZE, DebugRegs, Xcr, Xcrs, Xsave
from kvmd.kvm.stats import StatsReader
from kvmd.kvm.types import (
    CONTROL_NAMES,
    DTABLE_NAMES,
    REG_NAMES,
    SEGMENT_FIELDS,
    SEGMENT_NAMES,
    VCPU_EVENT_FIELDS,
    CpuidEntry,
    DTable,
    Fpu,
    IoSpace,
    MpState,
    Regs,
    Segment,
    Sregs,
    VcpuEvents,
)
from kvmd.kvm.uart import REGISTERS, UartRegs

LAPIC_SIZE = 1024
# KVM_GET_MSRS/KVM_SET_MSRS refuse nmsrs >= MAX_IO_MSRS (256) with E2BIG (arch/x86/kvm/x86.c
# msr_io): 255 per call is the kernel's real limit, not the 256 of rust-vmm's
# KVM_MAX_MSR_ENTRIES.
MAX_MSRS_PER_CALL = 255
_MAX_MSRS = MAX_MSRS_PER_CALL

# (number, short name) of every x86 exit reason, in kernel order: what exit_counts reports.
X86_EXIT_NUMBERS: list[tuple[int, str]] = [
    (int(getattr(lib, name)), name.removeprefix("KVM_EXIT_").lower()) for name in X86_EXIT_REASONS
]

_get_ident = threading.get_ident
_kvmd_run = lib.kvmd_run

_kick_lock = threading.Lock()
_kick_installed = False
# Asked once: a kick must make no C call, which would drop the GIL (see _kick_locked).
_KICK_SIGNAL = int(lib.kvmd_kick_signal())


def kick_signal() -> int:
    """The signal used to kick a vCPU thread out of KVM_RUN (SIGRTMIN+1)."""
    return _KICK_SIGNAL


def _install_kick_handler() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            check(lib.kvmd_install_kick_handler(), "sigaction")
            _kick_installed = True


class ThreadScheduling:
    """A scheduling the calling thread takes on its way into the guest
    (`Vcpu.run_until_unhandled`'s `sched`): a policy (os.SCHED_OTHER, SCHED_BATCH,
    SCHED_IDLE), a nice value, and whether to go back to the kernel's default slice.

    Set in C after the GIL is released: a thread that lowers itself below other threads of
    the process then never runs Python, holding the GIL, at the lower priority on its way
    in, where preempted by what shares its CPU it would stall every thread waiting for the
    GIL. Skipped (`applied` False) when the vCPU is already kicked; `error` is the errno
    of a failed call (0 if none). One per vCPU thread: not shared between threads."""

    def __init__(self, policy: int, nice: int, default_slice: bool) -> None:
        self.cdata = ffi.new("struct kvmd_sched *", {
            "policy": policy, "nice": nice, "default_slice": int(default_slice)})

    @property
    def applied(self) -> bool:
        return bool(self.cdata.applied)

    @property
    def error(self) -> int:
        return int(self.cdata.error)


class Vcpu:
    """A vCPU: registers, CPUID, MSRs, LAPIC, events, and `run()` returning decoded exits.

    Created by `Vm.create_vcpu`, which owns it; `close()` (or closing the VM) kicks a running
    `run()` out of the kernel, waits for it, then unmaps kvm_run and closes the fd.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        _install_kick_handler()
        ptr = lib.mmap(ffi.NULL, mmap_size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if ptr == ffi.cast("void *", -1):
            err = ffi.errno
            os.close(fd)
            raise KvmError(err, "mmap(kvm_run)")
        self._fd = fd
        self.id = vcpu_id
        self._mmap_size = mmap_size
        self._run_ptr = ptr
        self._run = ffi.cast("struct kvm_run *", ptr)
        self._exit = ffi.new("struct kvmd_exit *")
        # Per-reason exit counters written only by the running thread (no lock per exit).
        self._counters = ffi.new("uint64_t[]", EXIT_COUNTER_SLOTS)
        self._state_lock = threading.Lock()
        self._idle = threading.Condition(self._state_lock)
        self._running_thread: int | None = None
        self._closers = 0  # threads in close() waiting for run() to return
        # Opened now, not on first use: KVM_GET_STATS_FD takes the vCPU's kernel mutex,
        # which a vCPU spinning in KVM_RUN holds indefinitely.
        self._stats: StatsReader | None = None
        self._stats_error: KvmError | None = None
        try:
            self._stats = StatsReader(ioctl(fd, "KVM_GET_STATS_FD"))
        except KvmError as exc:  # kernels without binary stats (before 5.14)
            self._stats_error = exc
        except OSError as exc:
            self._stats_error = KvmError(exc.errno or errno.EIO, "KVM_GET_STATS_FD", "read")

    # -- lifetime -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Stop any run() in progress, then release kvm_run, the stats fd and the vCPU fd."""
        with self._state_lock:
            if self._fd < 0:
                return
            self._closers += 1
            try:
                while self._running_thread is not None:
                    self._kick_locked()
                    self._idle.wait(0.05)
            finally:
                self._closers -= 1
            fd, self._fd = self._fd, -1
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            lib.munmap(self._run_ptr, self._mmap_size)
            self._run = ffi.NULL
            if self._dirty_ring is not None:
                self._dirty_ring.close()
            os.close(fd)

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self, op: str) -> int:
        if self._fd < 0:
            raise KvmError(errno.EBADF, op, "vcpu is closed")
        return self._fd

    # -- running --------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """Enter the guest until the next exit and return it, decoded.

        Blocks in KVM_RUN with the GIL released. Returns IntrExit when kicked (see `kick`);
        the caller then decides whether to clear `immediate_exit` and run again.
        """
        return self._enter(None)

    def run_until_unhandled(self, pio_map: PioMap,
                            sched: ThreadScheduling | None = None) -> VcpuExit:
        """Like `run()`, but port IO to ports `pio_map` marks unclaimed is completed in C
        (writes dropped, reads all-ones) and counted, and IO to the UART it has attached
        goes to that UART in C, without returning: the exit path for such ports costs no
        Python and holds no GIL. With `sched`, the calling thread first takes that
        scheduling, once the GIL is released (see ThreadScheduling)."""
        return self._enter(pio_map, sched)

    def _enter(self, pio_map: PioMap | None,
               sched: ThreadScheduling | None = None) -> VcpuExit:
        # The per-exit path: kept to two uncontended lock round trips and one C call.
        lock = self._state_lock
        with lock:
            fd = self._fd
            if fd < 0:
                raise KvmError(errno.EBADF, "KVM_RUN", "vcpu is closed")
            if self._running_thread is not None:
                raise KvmError(errno.EBUSY, "KVM_RUN", "vcpu is already running in a thread")
            self._running_thread = _get_ident()
        try:
            if pio_map is None:
                ret = _kvmd_run(fd, self._run, self._exit, self._counters)
            else:
                ret = lib.kvmd_run_loop(fd, self._run, self._exit, self._counters, pio_map.cdata,
                                        pio_map.uart_cdata,
                                        ffi.NULL if sched is None else sched.cdata)
        finally:
            with lock:
                self._running_thread = None
                if self._closers:
                    self._idle.notify_all()
        if ret < 0:
            if -ret == errno.EINTR:
                self._counters[lib.KVM_EXIT_INTR] += 1
                return IntrExit()
            raise KvmError(-ret, "KVM_RUN")
        return decode_exit(self._exit)

    def complete_pending_io(self) -> None:
        """Finish the last IO/MMIO exit inside KVM (IN data into the register, RIP past the
        instruction) without running guest code: one KVM_RUN with immediate_exit set, as
        the KVM API documents. Not counted as an exit. Call from the vCPU's own thread."""
        with self._state_lock:
            fd = self._require_open("KVM_RUN")
            if self._running_thread is not None:
                raise KvmError(errno.EBUSY, "KVM_RUN", "vcpu is already running in a thread")
            self._running_thread = threading.get_ident()
        try:
            self._run.immediate_exit = 1
            ret = lib.kvmd_run(fd, self._run, self._exit, ffi.NULL)
            self._run.immediate_exit = 0
        finally:
            with self._state_lock:
                self._running_thread = None
                if self._closers:
                    self._idle.notify_all()
        if ret < 0 and -ret != errno.EINTR:
            raise KvmError(-ret, "KVM_RUN", "completing pending IO")

    def set_immediate_exit(self, value: bool) -> None:
        """Set kvm_run.immediate_exit: while set, KVM_RUN returns EINTR at once."""
        self._require_open("immediate_exit")
        self._run.immediate_exit = 1 if value else 0

    def kick(self) -> None:
        """Make a run() in progress in another thread (or the next one) return IntrExit.

        Sets immediate_exit, then signals the running thread so a guest spinning in KVM_RUN
        is interrupted. The caller clears immediate_exit before running again.
        """
        with self._state_lock:
            self._require_open("kick")
            self._kick_locked()

    def _kick_locked(self) -> None:
        # No C call here: cffi drops the GIL around each, and the thread kicking a VM's
        # vCPUs (the event loop) would queue for it again behind every vCPU thread already
        # out of the guest, once per vCPU (a pause of 64 took up to 0.6 s). A store through
        # the cffi pointer and pthread_kill keep it. The vCPU thread takes _state_lock
        # before KVM_RUN, so it sees the store; one already in KVM_RUN gets the signal.
        self._run.immediate_exit = 1
        if self._running_thread is not None:
            # The thread cannot leave run() without this lock, so it is alive to signal.
            signal.pthread_kill(self._running_thread, _KICK_SIGNAL)

    @property
    def is_running(self) -> bool:
        return self._running_thread is not None

    def complete_io_in(self, data: bytes) -> None:
        """Supply the bytes an IN exit reads (size*count); the guest sees them on next run."""
        self._require_open("complete_io_in")
        check(lib.kvmd_complete_io_in(self._run, data, len(data)), "complete_io_in",
              "last exit was not an IO IN of this length")

    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the bytes an MMIO read returns (exactly the access length)."""
        self._require_open("complete_mmio_read")
        check(lib.kvmd_complete_mmio_read(self._run, data, len(data)), "complete_mmio_read",
              "last exit was not an MMIO read of this length")

    def complete_msr(self, value: int = 0, error: bool = False) -> None:
        """Complete an RDMSR (with `value`) or WRMSR exit; `error` injects #GP instead."""
        self._require_open("complete_msr")
        check(lib.kvmd_complete_msr(self._run, value, 1 if error else 0), "complete_msr",
              "last exit was not an MSR exit")

    def complete_hyperv(self, result: int) -> None:
        """Set the result of a Hyper-V hypercall exit."""
        self._require_open("complete_hyperv")
        check(lib.kvmd_complete_hyperv(self._run, result), "complete_hyperv",
              "last exit was not a Hyper-V hypercall")

    def exit_counts(self) -> dict[str, int]:
        """Exits seen by this vCPU, by reason name, plus the IO/MMIO direction splits
        (io_in, io_out, mmio_read, mmio_write) and unclaimed_pio/unclaimed_mmio. Read
        without stopping the vCPU: the counters are plain words only its thread writes."""
        counts = {name: int(self._counters[number]) for number, name in X86_EXIT_NUMBERS}
        for name, slot in COUNTER_SLOTS.items():
            if name != "first_extra":
                counts[name] = int(self._counters[slot])
        counts["other"] = int(self._counters[EXIT_COUNTER_SLOTS - 1])
        return counts

    def restore_exit_counts(self, counts: dict[str, int]) -> None:
        """Set the counters from `exit_counts()` of another vCPU (a restore: before this
        one runs). Names it does not know are ignored; missing ones stay as they are."""
        slots = {name: number for number, name in X86_EXIT_NUMBERS}
        slots.update({n: s for n, s in COUNTER_SLOTS.items() if n != "first_extra"})
        slots["other"] = EXIT_COUNTER_SLOTS - 1
        for name, value in counts.items():
            slot = slots.get(name)
            if slot is not None:
                self._counters[slot] = u64(value, f"exit count {name}")

    def count_unclaimed(self, space: IoSpace) -> None:
        """Count a port or MMIO access the caller completed as unclaimed (call from the
        vCPU's own thread, which is the only writer of its counters)."""
        slot = "unclaimed_pio" if space == IoSpace.PIO else "unclaimed_mmio"
        self._counters[COUNTER_SLOTS[slot]] += 1

    def exit_counters(self) -> Any:
        """The raw per-reason counter array (uint64_t[EXIT_COUNTER_SLOTS]), for collectors."""
        return self._counters

    # -- registers ------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self._require_open("KVM_GET_REGS"), "KVM_GET_REGS", regs)
        return Regs(**{name: int(getattr(regs, name)) for name in REG_NAMES})

    def set_regs(self, value: Regs) -> None:
        regs = ffi.new("struct kvm_regs *")
        for name in REG_NAMES:
            setattr(regs, name, u64(getattr(value, name), name))
        ioctl(self._require_open("KVM_SET_REGS"), "KVM_SET_REGS", regs)

    def get_sregs(self) -> Sregs:
        s = ffi.new("struct kvm_sregs *")
        ioctl(self._require_open("KVM_GET_SREGS"), "KVM_GET_SREGS", s)
        out = Sregs()
        for name in SEGMENT_NAMES:
            seg = getattr(s, name)
            setattr(out, name, Segment(**{f: int(getattr(seg, f)) for f in SEGMENT_FIELDS}))
        for name in DTABLE_NAMES:
            dt = getattr(s, name)
            setattr(out, name, DTable(int(dt.base), int(dt.limit)))
        for name in CONTROL_NAMES:
            setattr(out, name, int(getattr(s, name)))
        out.interrupt_bitmap = [int(s.interrupt_bitmap[i]) for i in range(4)]
        return out

    def set_sregs(self, value: Sregs) -> None:
        s = ffi.new("struct kvm_sregs *")
        try:
            for name in SEGMENT_NAMES:
                seg = getattr(s, name)
                src = getattr(value, name)
                for f in SEGMENT_FIELDS:
                    setattr(seg, f, getattr(src, f))
            for name in DTABLE_NAMES:
                dt = getattr(s, name)
                dt.base = getattr(value, name).base
                dt.limit = getattr(value, name).limit
            for name in CONTROL_NAMES:
                setattr(s, name, getattr(value, name))
            for i in range(4):
                s.interrupt_bitmap[i] = value.interrupt_bitmap[i]
        except (OverflowError, TypeError, IndexError) as exc:
            raise invalid("KVM_SET_SREGS", str(exc)) from None
        ioctl(self._require_open("KVM_SET_SREGS"), "KVM_SET_SREGS", s)

    def get_fpu(self) -> Fpu:
        """x87 and SSE registers (KVM_GET_FPU). KVM transfers no MXCSR in KVM_GET_FPU or
        KVM_SET_FPU: `mxcsr` always reads 0 and is ignored when set."""
        f = ffi.new("struct kvm_fpu *")
        ioctl(self._require_open("KVM_GET_FPU"), "KVM_GET_FPU", f)
        return Fpu(
            fpr=[bytes(ffi.buffer(f.fpr[i], 16)) for i in range(8)],
            fcw=int(f.fcw), fsw=int(f.fsw), ftwx=int(f.ftwx), last_opcode=int(f.last_opcode),
            last_ip=int(f.last_ip), last_dp=int(f.last_dp),
            xmm=[bytes(ffi.buffer(f.xmm[i], 16)) for i in range(16)],
            mxcsr=int(f.mxcsr),
        )

    def set_fpu(self, value: Fpu) -> None:
        """Set x87 and SSE registers (KVM_SET_FPU; `mxcsr` is ignored by KVM)."""
        if len(value.fpr) != 8 or len(value.xmm) != 16:
            raise invalid("KVM_SET_FPU", "need 8 fpr and 16 xmm registers")
        f = ffi.new("struct kvm_fpu *")
        try:
            for i, reg in enumerate(value.fpr):
                f.fpr[i] = list(exact(reg, 16, "fpr"))
            for i, reg in enumerate(value.xmm):
                f.xmm[i] = list(exact(reg, 16, "xmm"))
            f.fcw, f.fsw, f.ftwx = value.fcw, value.fsw, value.ftwx
            f.last_opcode, f.last_ip, f.last_dp = value.last_opcode, value.last_ip, value.last_dp
            f.mxcsr = value.mxcsr
        except (OverflowError, TypeError) as exc:
            raise invalid("KVM_SET_FPU", str(exc)) from None
        ioctl(self._require_open("KVM_SET_FPU"), "KVM_SET_FPU", f)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """Set the CPUID leaves the guest sees (usually Kvm.get_supported_cpuid())."""
        c = cpuid2_struct(entries, "KVM_SET_CPUID2")
        ioctl(self._require_open("KVM_SET_CPUID2"), "KVM_SET_CPUID2", c)

    def get_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """The CPUID leaves set on this vCPU."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        ioctl(self._require_open("KVM_GET_CPUID2"), "KVM_GET_CPUID2", c)
        return cpuid_entries(c)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Read MSRs by index; raises KvmError if the kernel refuses any of them."""
        if len(indices) > _MAX_MSRS:
            raise invalid("KVM_GET_MSRS", f"at most {_MAX_MSRS} MSRs per call", errno.E2BIG)
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            m.entries[i].index = u32(index, "msr index")
        n = ioctl(self._require_open("KVM_GET_MSRS"), "KVM_GET_MSRS", m)
        if n != len(indices):
            raise invalid("KVM_GET_MSRS", f"MSR {indices[n]:#x} is not readable")
        return {int(m.entries[i].index): int(m.entries[i].data) for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write MSRs; raises KvmError naming the first MSR the kernel refused."""
        if len(values) > _MAX_MSRS:
            raise invalid("KVM_SET_MSRS", f"at most {_MAX_MSRS} MSRs per call", errno.E2BIG)
        items = list(values.items())
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, data) in enumerate(items):
            m.entries[i].index = u32(index, "msr index")
            m.entries[i].data = u64(data, "msr value")
        n = ioctl(self._require_open("KVM_SET_MSRS"), "KVM_SET_MSRS", m)
        if n != len(items):
            raise invalid("KVM_SET_MSRS", f"MSR {items[n][0]:#x} was refused")

    def get_mp_state(self) -> MpState:
        s = ffi.new("struct kvm_mp_state *")
        ioctl(self._require_open("KVM_GET_MP_STATE"), "KVM_GET_MP_STATE", s)
        return MpState(int(s.mp_state))

    def set_mp_state(self, state: MpState | int) -> None:
        s = ffi.new("struct kvm_mp_state *")
        s.mp_state = u32(int(state), "mp_state")
        ioctl(self._require_open("KVM_SET_MP_STATE"), "KVM_SET_MP_STATE", s)

    def get_lapic(self) -> bytes:
        """The local APIC register page (1024 bytes); needs the in-kernel irqchip."""
        s = ffi.new("struct kvm_lapic_state *")
        ioctl(self._require_open("KVM_GET_LAPIC"), "KVM_GET_LAPIC", s)
        return bytes(ffi.buffer(s.regs, LAPIC_SIZE))

    def set_lapic(self, regs: bytes) -> None:
        s = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(s.regs, exact(regs, LAPIC_SIZE, "lapic"), LAPIC_SIZE)
        ioctl(self._require_open("KVM_SET_LAPIC"), "KVM_SET_LAPIC", s)

    def get_vcpu_events(self) -> VcpuEvents:
        e = ffi.new("struct kvmd_vcpu_events *")
        check(lib.kvmd_get_vcpu_events(self._require_open("KVM_GET_VCPU_EVENTS"), e),
              "KVM_GET_VCPU_EVENTS")
        return VcpuEvents(**{name: int(getattr(e, name)) for name in VCPU_EVENT_FIELDS})

    def set_vcpu_events(self, value: VcpuEvents) -> None:
        e = ffi.new("struct kvmd_vcpu_events *")
        try:
            for name in VCPU_EVENT_FIELDS:
                setattr(e, name, getattr(value, name))
        except (OverflowError, TypeError) as exc:
            raise invalid("KVM_SET_VCPU_EVENTS", str(exc)) from None
        check(lib.kvmd_set_vcpu_events(self._require_open("KVM_SET_VCPU_EVENTS"), e),
              "KVM_SET_VCPU_EVENTS")

    def set_signal_mask(self, signals: list[int]) -> None:
        """Signals blocked while in KVM_RUN (KVM_SET_SIGNAL_MASK)."""
        arr = ffi.new("int[]", list(signals) or [0])
        check(lib.kvmd_set_signal_mask(self._require_open("KVM_SET_SIGNAL_MASK"), arr,
                                       len(signals)), "KVM_SET_SIGNAL_MASK")

    def interrupt(self, vector: int) -> None:
        """Queue an external interrupt (KVM_INTERRUPT; only without an in-kernel irqchip)."""
        irq = ffi.new("uint32_t *", u32(vector, "vector"))
        if vector > 255:
            raise invalid("KVM_INTERRUPT", "vector must be 0..255")
        ioctl(self._require_open("KVM_INTERRUPT"), "KVM_INTERRUPT", irq)

    @property
    def ready_for_interrupt_injection(self) -> bool:
        """kvm_run.ready_for_interrupt_injection after the last exit: KVM_INTERRUPT would be
        taken at the next entry (only meaningful without an in-kernel irqchip)."""
        self._require_open("ready_for_interrupt_injection")
        return bool(self._run.ready_for_interrupt_injection)

    @property
    def interrupts_enabled(self) -> bool:
        """kvm_run.if_flag after the last exit: the guest's RFLAGS.IF."""
        self._require_open("if_flag")
        return bool(self._run.if_flag)

    def set_request_interrupt_window(self, value: bool) -> None:
        """Ask KVM to exit (IRQ_WINDOW_OPEN) as soon as the guest can take an interrupt."""
        self._require_open("request_interrupt_window")
        self._run.request_interrupt_window = 1 if value else 0

    def nmi(self) -> None:
        """Inject a non-maskable interrupt (KVM_NMI)."""
        ioctl(self._require_open("KVM_NMI"), "KVM_NMI")

    def set_single_step(self, enabled: bool) -> None:
        """Enable single-stepping: each instruction then ends in a DebugExit."""
        dbg = ffi.new("struct kvm_guest_debug *")
        if enabled:
            dbg.control = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        ioctl(self._require_open("KVM_SET_GUEST_DEBUG"), "KVM_SET_GUEST_DEBUG", dbg)

    def enable_cap(self, cap: int | str, args: tuple[int, ...] = (), flags: int = 0) -> None:
        """KVM_ENABLE_CAP on this vCPU (`cap` by number or name, as for Vm.enable_cap)."""
        ioctl(self._require_open("KVM_ENABLE_CAP"), "KVM_ENABLE_CAP", enable_cap_struct(
            capability_number(cap), args, flags))

    def stats(self) -> StatsReader:
        """The kernel's binary statistics for this vCPU (fd owned by the vCPU)."""
        self._require_open("KVM_GET_STATS_FD")
        if self._stats is None:
            raise self._stats_error or KvmError(errno.ENOTTY, "KVM_GET_STATS_FD")
        return self._stats

    # -- state for snapshot/restore -------------------------------------------------------

    # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd, set by Vm.create_vcpu (the guest's
    # XSAVE permissions, hence this size, are fixed once a vCPU exists). 0: the kernel has
    # no KVM_GET_XSAVE2, and the XSAVE image is KVM_GET_XSAVE's 4096 bytes.
    _xsave2_size: int = 0

    # The order in which the core layer restores a vCPU, as (Vcpu method, why here).
    # See state_restore_order() for the sources.
    STATE_RESTORE_ORDER: tuple[tuple[str, str], ...] = (
        ("set_cpuid", "first: CPUID decides what later steps accept (XCR0, x2APIC mode in "
         "the APIC base, MSRs, the LAPIC timer's TSC-deadline mode)"),
        ("set_tsc_khz", "before MSRs: MSR_IA32_TSC and the TSC deadline count guest TSC "
         "ticks of this rate"),
        ("set_regs", "before vcpu events: KVM_SET_REGS drops a pending exception"),
        ("set_sregs", "before mp_state (it makes a BSP at F000:FFF0 RUNNABLE) and the "
         "LAPIC (it restores the APIC base)"),
        ("set_xsave", "no ioctl dependency (KVM checks it against the host's features, "
         "not CPUID); never KVM_SET_FPU instead: that leaves XSTATE_BV alone"),
        ("set_xcrs", "after CPUID: XCR0 must be a subset of the guest's XSAVE features"),
        ("set_debugregs", "no dependency; before events, with the other registers"),
        ("set_lapic", "after sregs (APIC base), before MSRs (TSC deadline)"),
        ("set_msrs", "after the LAPIC: MSR_IA32_TSC_DEADLINE is dropped unless LVTT is "
         "already in TSC-deadline mode; after CPUID and the TSC rate"),
        ("set_mp_state", "after sregs and the LAPIC (non-RUNNABLE states need the "
         "in-kernel LAPIC); QEMU sets it after events: the same for a consistent state"),
        ("set_vcpu_events", "last: it overwrites the pending exception KVM_SET_REGS drops "
         "and the interrupt KVM_SET_SREGS queues from interrupt_bitmap"),
    )

    @classmethod
    def state_restore_order(cls) -> tuple[tuple[str, str], ...]:
        """How to restore a vCPU from saved state: (Vcpu method, reason) in order.

        Restore into a vCPU that has not run, in a VM whose in-kernel irqchip and PIT
        exist (KVM_CREATE_IRQCHIP must precede the vCPUs). Then restore the VM-level state
        (Vm.set_irqchip for both PICs and the IOAPIC, Vm.set_pit2, Vm.set_clock) after
        all vCPUs, as Firecracker does: KVM_SET_CLOCK decides KVM's master clock from the
        vCPUs present (with none, KVM_GET_CLOCK reports no flags until a vCPU runs), and
        KVM_SET_IRQCHIP asks existing vCPUs to rescan the IOAPIC. Save in the reverse
        spirit: get_mp_state first (KVM_GET_MP_STATE can accept a pending INIT/SIPI,
        changing CS:RIP and the LAPIC), get_vcpu_events last. On the first resume, call
        kvmclock_ctrl() on each vCPU (QEMU does it on every transition to running,
        ignoring EINVAL from guests without kvmclock).

        Sources: Firecracker src/vmm/src/vstate/vcpu/x86_64.rs restore_state (cpuid,
        mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, vcpu_events, with
        its ordering comments; Cloud Hypervisor's set_state is the same) and
        src/vmm/src/builder.rs (TSC rate before, VM state after the vCPUs); QEMU
        target/i386/kvm/kvm.c kvm_arch_put_registers (sregs, TSC rate, regs, xsave,
        xcrs, msrs, vcpu_events, mp_state, the TSC-deadline MSR after the LAPIC,
        debugregs; CPUID at vCPU init). Where they differ this order follows the kernel:
        mp_state after sregs, because __set_sregs_common() makes a BSP at the reset
        vector RUNNABLE (Firecracker sets mp_state before sregs). Each dependency this
        host's KVM has is shown by a test in tests/kvm/test_kvm_state.py.
        """
        return cls.STATE_RESTORE_ORDER

    @property
    def xsave_size(self) -> int:
        """Bytes in this vCPU's XSAVE image (Xsave.region): the VM's KVM_CAP_XSAVE2 size,
        or 4096 without it."""
        return self._xsave2_size or XSAVE_LEGACY_SIZE

    def get_xsave(self) -> Xsave:
        """The x87/SSE/AVX/... state: KVM_GET_XSAVE2 (xsave_size bytes) where the kernel
        has it, else KVM_GET_XSAVE (4096 bytes)."""
        op = "KVM_GET_XSAVE2" if self._xsave2_size else "KVM_GET_XSAVE"
        fd = self._require_open(op)
        buf = ffi.new("uint8_t[]", self.xsave_size)
        ioctl(fd, op, ffi.cast("struct kvm_xsave *", buf))
        return Xsave(bytes(ffi.buffer(buf)))

    def set_xsave(self, value: Xsave) -> None:
        """Restore the x87/SSE/AVX/... state (KVM_SET_XSAVE). The image must be exactly
        xsave_size bytes (else EINVAL, before the kernel: it reads that many bytes
        whatever it is given). KVM refuses (EINVAL) XSTATE_BV bits this host's KVM does
        not support (it does not look at the guest's CPUID), a non-zero XCOMP_BV or
        reserved header bytes, and MXCSR bits outside MXCSR_MASK."""
        size = self.xsave_size
        if len(value.region) != size:
            raise invalid("KVM_SET_XSAVE", f"the XSAVE image of this vCPU is {size} bytes, "
                          f"not {len(value.region)}")
        buf = ffi.new("uint8_t[]", value.region)
        ioctl(self._require_open("KVM_SET_XSAVE"), "KVM_SET_XSAVE",
              ffi.cast("struct kvm_xsave *", buf))

    def get_xcrs(self) -> Xcrs:
        """Extended control registers (KVM_GET_XCRS): XCR0, with KVM's flags."""
        x = ffi.new("struct kvm_xcrs *")
        ioctl(self._require_open("KVM_GET_XCRS"), "KVM_GET_XCRS", x)
        n = min(int(x.nr_xcrs), lib.KVM_MAX_XCRS)
        return Xcrs([Xcr(int(x.xcrs[i].xcr), int(x.xcrs[i].value)) for i in range(n)],
                    int(x.flags))

    def set_xcrs(self, value: Xcrs) -> None:
        """Set extended control registers (KVM_SET_XCRS; at most 16 entries). KVM applies
        the XCR0 entry and ignores others; it refuses (EINVAL) non-zero flags and an XCR0
        without x87, with AVX but not SSE, or with features outside the guest's CPUID
        (so set CPUID first)."""
        op = "KVM_SET_XCRS"
        if len(value.xcrs) > lib.KVM_MAX_XCRS:
            raise invalid(op, f"at most {lib.KVM_MAX_XCRS} XCRs")
        x = ffi.new("struct kvm_xcrs *")
        x.nr_xcrs = len(value.xcrs)
        x.flags = u32(value.flags, "xcrs flags")
        for i, xcr in enumerate(value.xcrs):
            x.xcrs[i].xcr = u32(xcr.xcr, "xcr index")
            x.xcrs[i].value = u64(xcr.value, "xcr value")
        ioctl(self._require_open(op), op, x)

    def get_debugregs(self) -> DebugRegs:
        """DR0-3, DR6, DR7 (KVM_GET_DEBUGREGS): the guest's own, not those of
        KVM_SET_GUEST_DEBUG."""
        d = ffi.new("struct kvm_debugregs *")
        ioctl(self._require_open("KVM_GET_DEBUGREGS"), "KVM_GET_DEBUGREGS", d)
        return DebugRegs([int(d.db[i]) for i in range(4)], int(d.dr6), int(d.dr7),
                         int(d.flags))

    def set_debugregs(self, value: DebugRegs) -> None:
        """Set DR0-3, DR6, DR7 (KVM_SET_DEBUGREGS). KVM refuses (EINVAL) non-zero flags
        and bits above 31 in DR6 or DR7."""
        op = "KVM_SET_DEBUGREGS"
        if len(value.db) != 4:
            raise invalid(op, "need 4 breakpoint address registers (DR0-DR3)")
        d = ffi.new("struct kvm_debugregs *")
        for i, addr in enumerate(value.db):
            d.db[i] = u64(addr, "debug address")
        d.dr6 = u64(value.dr6, "dr6")
        d.dr7 = u64(value.dr7, "dr7")
        d.flags = u64(value.flags, "debugregs flags")
        ioctl(self._require_open(op), op, d)

    def get_tsc_khz(self) -> int:
        """The guest TSC frequency in kHz (KVM_GET_TSC_KHZ)."""
        return ioctl(self._require_open("KVM_GET_TSC_KHZ"), "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """Set the guest TSC frequency (KVM_SET_TSC_KHZ; 0 means the host's).

        With KVM_CAP_TSC_CONTROL (hardware TSC scaling) any rate below the kernel's
        maximum works. Without it (this host), KVM accepts the host rate (within
        tsc_tolerance_ppm), and faster rates by catching the guest TSC up in software,
        but refuses slower ones with EINVAL: a snapshot from a slower host cannot be
        restored at its rate; callers map that to UNIMPLEMENTED. KVM records a refused
        rate before refusing it (KVM_GET_TSC_KHZ then reports it), so on failure this
        puts the previous rate back before raising.
        """
        op = "KVM_SET_TSC_KHZ"
        fd = self._require_open(op)
        u32(khz, "tsc khz")
        before = ioctl(fd, "KVM_GET_TSC_KHZ")
        try:
            ioctl(fd, op, khz)
        except KvmError as exc:
            with contextlib.suppress(KvmError):
                ioctl(fd, op, before)
            raise KvmError(exc.errno or errno.EINVAL, op,
                           f"the guest TSC cannot run at {khz} kHz here (without "
                           "KVM_CAP_TSC_CONTROL only the host rate or faster)") from None

    def kvmclock_ctrl(self) -> None:
        """Tell the guest it was paused (KVM_KVMCLOCK_CTRL): KVM sets PVCLOCK_GUEST_STOPPED
        in the vCPU's kvmclock page at the next entry, so the guest's soft-lockup watchdog
        ignores the gap. EINVAL when the guest has not enabled kvmclock
        (MSR_KVM_SYSTEM_TIME_NEW), which callers may ignore as QEMU does."""
        ioctl(self._require_open("KVM_KVMCLOCK_CTRL"), "KVM_KVMCLOCK_CTRL")

    def saveable_msrs(self, candidates: Iterable[int]) -> list[int]:
        """The MSRs of `candidates` (usually Kvm.get_msr_index_list()) that KVM_GET_MSRS
        reads on this vCPU, in their order, without duplicates: the MSR list to save.

        KVM_GET_MSRS reads entries in order and stops at the first it refuses, returning
        how many it read. So one ioctl per batch of up to MAX_MSRS_PER_CALL, plus one per
        refused MSR: read the batch, keep what was read, skip the refused one, go on from
        the next. What KVM accepts depends on CPUID: call after set_cpuid. Readable is
        not always writable: without the in-kernel LAPIC, KVM reads MSR_KVM_ASYNC_PF_INT
        but refuses to write it back (tests/kvm/test_kvm_state.py).
        """
        op = "KVM_GET_MSRS"
        fd = self._require_open(op)
        pending = [u32(i, "msr index") for i in dict.fromkeys(candidates)]
        kept: list[int] = []
        while pending:
            batch = pending[:MAX_MSRS_PER_CALL]
            m = ffi.new("struct kvm_msrs *", {"nmsrs": len(batch), "entries": len(batch)})
            for i, index in enumerate(batch):
                m.entries[i].index = index
            n = ioctl(fd, op, m)
            kept += batch[:n]
            # batch[n], if any, was refused: drop it and carry on after it.
            pending = pending[n + 1:] if n < len(batch) else pending[n:]
        return kept
    # -- dirty ring (KVM_CAP_DIRTY_LOG_RING) -----------------------------------------------

    # Set by Vm.create_vcpu when the VM has a dirty ring; a class default keeps __init__ as is.
    _dirty_ring: DirtyRing | None = None

    def _attach_dirty_ring(self, size_bytes: int) -> None:
        self._dirty_ring = DirtyRing(self._require_open("mmap(dirty ring)"), size_bytes)

    @property
    def dirty_ring_entries(self) -> int:
        """Entries in this vCPU's dirty ring (0: the VM has no dirty ring)."""
        return 0 if self._dirty_ring is None else self._dirty_ring.entries

    def harvest_dirty_ring(self, bitmaps: DirtyBitmaps) -> int:
        """Collect this vCPU's dirty ring into `bitmaps` (in C, no Python per entry) and
        mark the entries for reset; returns how many were collected. Safe while the vCPU
        runs. The pages are re-protected and the entries reused after
        `Vm.reset_dirty_rings()`."""
        ring = self._dirty_ring
        if ring is None:
            self._require_open("harvest_dirty_ring")
            raise invalid("harvest_dirty_ring", "the VM has no dirty ring (enable_dirty_ring)",
                          errno.ENXIO)
        return ring.harvest(bitmaps)


_EVERY_PORT_TO_CALLER = bytes([lib.KVMD_PIO_CALLER]) * (1 << 16)


class PioMap:
    """Which of the 65536 ports are unclaimed (completed in C by `run_until_unhandled`),
    which belong to a UART kept in C, and which must reach the caller. Shared by the vCPUs
    of a VM; updates take effect at the next exit."""

    def __init__(self, unclaimed: bool = True) -> None:
        # A private anonymous mapping, not ffi.new: its zero pages (every port unclaimed)
        # are not written here, so a new VM does not fault in 64 KiB it mostly never reads
        # (about 50 us of CreateVm here), and a read of an untouched page maps the kernel's
        # zero page. Unmapped when the last reference goes, as ffi.new's memory was freed.
        self._memory = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.cdata = ffi.from_buffer("uint8_t[]", self._memory)
        if not unclaimed:
            self._memory[:] = _EVERY_PORT_TO_CALLER
        self.uart: UartRegs | None = None
        self.uart_cdata: Any = ffi.NULL

    def set_claimed(self, first: int, length: int, claimed: bool) -> None:
        """Mark ports [first, first+length) as reaching the caller (claimed) or not."""
        if first < 0 or length < 0 or first + length > 1 << 16:
            raise invalid("PioMap", f"ports {first:#x}+{length} out of range")
        value = lib.KVMD_PIO_CALLER if claimed else lib.KVMD_PIO_UNCLAIMED
        self._memory[first:first + length] = bytes([value]) * length

    def attach_uart(self, uart: UartRegs) -> None:
        """Complete IO to the UART's eight ports in C, on `uart` (one UART per map)."""
        if self.uart is not None:
            raise invalid("PioMap", "a UART is attached already")
        self.uart, self.uart_cdata = uart, uart.cdata
        self._memory[uart.base:uart.base + REGISTERS] = bytes([lib.KVMD_PIO_UART]) * REGISTERS

    def is_claimed(self, port: int) -> bool:
        return int(self.cdata[port]) != lib.KVMD_PIO_UNCLAIMED

