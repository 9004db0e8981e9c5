"""ManagedVm: a KVM VM with its rules and limits, its devices and remote claims, the
eventfds it hands out by id, and the dispatch of its vCPUs' exits."""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvmd.core.devices import (
    COM1_IRQ,
    CONSOLE_INPUT_LIMIT,
    DEFAULT_CONSOLE_BUFFER,
    DEFAULT_DEBUG_EXIT_PORT,
    MAX_CONSOLE_BUFFER,
    Console,
    DebugExit,
    DeviceBus,
    Uart16550,
)
from kvmd.core.dirty import (
    API,
    BITMAP,
    MANUAL,
    MIGRATION,
    MODES,
    RING,
    SNAPSHOT,
    DirtyTracker,
)
from kvmd.core.errors import (
    AlreadyExists,
    DomainError,
    InvalidArgument,
    InvalidState,
    NotFound,
    Reason,
    ResourceExhausted,
    Unsupported,
    argument_rule,
    from_kvm_error,
    kernel_errors,
    limit,
)
from kvmd.core.events import Broadcaster, Subscription
from kvmd.core.fds import (
    FDS_PER_FILE_MAPPING,
    FDS_PER_IOEVENT,
    FDS_PER_SLOT,
    FDS_PER_VCPU,
    FDS_PER_VM,
    FdAccount,
    irqfd_fds,
)
from kvmd.core.images import (
    FileBackedRange,
    ImagesDir,
    MemoryFile,
    OpenedImage,
    normalize_name,
)
from kvmd.core.owners import CLAIM, IOEVENT, Owned, check_free, ioevent_range
from kvmd.core.remote import (
    ClaimConflict,
    ClaimRange,
    ClaimTable,
    HandlerClose,
    RemoteExit,
    RemoteHandler,
)
from kvmd.core.shared import Charge, HostShared
from kvmd.core.state import (
    FileMappingState,
    IoeventState,
    IrqchipState,
    IrqfdState,
    SlotState,
    VmState,
)
from kvmd.core.vcpu import (
    CONTINUE,
    CRASHED,
    CREATED,
    HALT,
    HALTED,
    PAUSABLE,
    PAUSED,
    RESUMABLE,
    RUNNING,
    STARTABLE,
    STATE_CHANGE_TIMEOUT,
    STOPPED,
    Action,
    ManagedVcpu,
    Outcome,
    PauseTicket,
    VcpuRunState,
    VmLink,
)
from kvmd.kvm import (
    Datamatch,
    EventFd,
    FailEntryExit,
    FileBacking,
    HltExit,
    InternalErrorExit,
    IoEventAddress,
    IoExit,
    IoSpace,
    IrqChip,
    IrqRoute,
    KvmError,
    MemfdBacking,
    MemoryRegionInfo,
    MmioExit,
    PioMap,
    RdMsrExit,
    Regs,
    ShutdownExit,
    SystemEventExit,
    VcpuExit,
    Vm,
    WrMsrExit,
    check_datamatch,
)
from kvmd.kvm import (
    DebugExit as KvmDebugExit,
)
from kvmd.kvm.exits import DirtyRingFullExit
from kvmd.kvm.memory import PAGE_SIZE, round_up_to_page
from kvmd.kvm.vm import check_page_aligned, check_positive_size

log = logging.getLogger(__name__)
# What ManagedVm.state can be (a vCPU may also be halted; its VM is then running).
VM_STATES = (CREATED, RUNNING, PAUSED, STOPPED, CRASHED)
COM1_BASE_RANGE = (0x3F8, 0x400)
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# 65536 entries per vCPU (or the kernel's maximum, if smaller): with the daemon's reaper
# (kvmd.core.dirty) a ring this long never fills between two harvests, even on hosts whose
# KVM pushes an entry for every emulated store.
DEFAULT_DIRTY_RING_BYTES = 1 << 20
# A vCPU whose ring is full but yields nothing to harvest this many times in a row is
# stuck (seen on PVM under a tight store loop): crash it rather than spin.
STUCK_RING_EXITS = 1000
DEFAULT_TSS_ADDRESS = 0xFFFBD000
DEFAULT_IDENTITY_MAP_ADDRESS = 0xFFFBC000
MAX_LABELS = 64
MAX_LABEL_LEN = 256


def validate_id(kind: str, value: str) -> str:
    """Ids are 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidArgument(
            f"{kind} {shown!r} is not a valid id (1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit)",
            reason=Reason.ID_INVALID, field=kind.replace(" ", "_"))
    return value


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels",
                              reason=Reason.VALUE_OUT_OF_RANGE, field="labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_LEN or len(value) > MAX_LABEL_LEN:
            raise InvalidArgument(
                f"label keys must be 1-{MAX_LABEL_LEN} characters and values at most "
                f"{MAX_LABEL_LEN}", reason=Reason.VALUE_OUT_OF_RANGE, field="labels")
    return dict(labels)


@dataclass(frozen=True)
class VmOptions:
    """How a VM is built: in-kernel irqchip and PIT, TSS and identity-map addresses, the
    debug-exit port, strict IO, the console backlog size, and how KVM reports dirty pages
    (bitmap, manual or ring; the ring's size per vCPU)."""

    irqchip: bool = False
    pit: bool = False
    tss_address: int = 0
    identity_map_address: int = 0
    debug_exit_port: int = 0
    strict_io: bool = False
    console_buffer_bytes: int = 0
    dirty_tracking: str = ""  # "" = bitmap
    dirty_ring_bytes: int = 0  # 0 = DEFAULT_DIRTY_RING_BYTES (ring mode only)


@dataclass(frozen=True)
class VmEvent:
    """A state change of a VM or one of its vCPUs, as WatchVm reports it."""

    type: str
    vcpu_id: int
    state: str
    reason: str = ""
    exit_code: int | None = None
    regs: Regs | None = None
    unix_ms: int = 0


@dataclass
class IrqfdEntry:
    """A daemon-owned eventfd bound to a GSI; `resample` is set for level-triggered ones."""

    irqfd_id: str
    gsi: int
    event: EventFd
    resample: EventFd | None
    triggers: int = 0
    resamples: int = 0


@dataclass
class IoeventEntry:
    """A daemon-owned eventfd KVM signals when the guest writes `address`."""

    ioevent_id: str
    space: IoSpace
    address: int
    length: int
    datamatch: int | None
    event: EventFd
    fired: int = 0

    @property
    def kvm_address(self) -> IoEventAddress:
        return IoEventAddress(self.space, self.address)

    @property
    def kvm_datamatch(self) -> Datamatch:
        return Datamatch(self.length, self.datamatch)


@dataclass(frozen=True)
class Fired:
    """A watched eventfd fired `count` times since the last report."""

    resource_id: str
    count: int


class VcpuThrottler:
    """Auto-converge's throttle of one VM: every slice, each running vCPU is kicked out of
    the guest and sleeps for percent/(100-percent) of a slice (QEMU's cpu-throttle), so the
    guest runs (100-percent)% of the time. Stays RUNNING meanwhile: a pause or stop ends
    the sleep at once."""

    SLICE_SECONDS = 0.010

    def __init__(self, vm: ManagedVm) -> None:
        self.vm = vm
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"throttle-{vm.id}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(STATE_CHANGE_TIMEOUT)

    def _run(self) -> None:
        while not self._stopped.is_set():
            percent = self.vm.throttle_percent
            if not percent:
                return
            sleep = self.SLICE_SECONDS * percent / (100 - percent)
            for vcpu in self.vm.vcpus():
                vcpu.throttle(sleep)
            self._stopped.wait(self.SLICE_SECONDS + sleep)


@dataclass
class PausedHold:
    """A VM held paused (ManagedVm.held_paused): each vCPU's state from before, and whether
    the VM stays paused when the hold ends."""

    run_states: dict[int, str]
    leave_paused: bool = False


class ManagedVm:
    """A VM owned by the daemon: its kernel VM (and through it every guest memory mapping
    and vCPU fd), the eventfds it hands out by id, and watchers of those eventfds.

    All state lives here, not in the API layer, so it can later be snapshotted or handed
    over. `close()` releases everything, on every path.
    """

    def __init__(self, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
                 shared: HostShared, owner: str, fds: FdAccount | None = None) -> None:
        self.id = vm_id
        # The descriptors this VM holds, charged to its owner (kvmd.core.fds): the VM's own
        # (charged before it was made, by Host.build_vm), then each object's before it is.
        self.fds = fds if fds is not None else shared.fds.account(owner, FDS_PER_VM)
        self.labels = labels
        self.options = options
        self.owner = owner
        self.created_unix_ms = int(time.time() * 1000)
        self.vm = vm
        self.shared = shared
        self._limits = shared.limits
        self._budget = shared.budget
        # Each slot's claim on the daemon's memory budget (with its discard credit).
        self._charges: dict[int, Charge] = {}
        self._watcher = shared.watcher
        self.dirty = DirtyTracker(vm, options.dirty_tracking or BITMAP)
        # The GSI routing table this VM set (KVM cannot return it); None: KVM's default.
        self._gsi_routes: list[IrqRoute] | None = None
        # Set while a snapshot (or migration) holds the VM paused: run control must wait.
        self.busy = ""
        # The snapshot a diff snapshot of this VM applies on: the last one taken of it, or
        # the one it was restored from.
        self.last_snapshot_id = ""
        self.last_snapshot_layout: list[SlotState] = []
        self.lock = threading.RLock()
        self._vcpus: dict[int, ManagedVcpu] = {}
        # The vCPUs by id, replaced (never changed in place) under the lock: `vcpus()` and
        # `vcpu()` read without the lock, so state reads (GetVm, the events a vCPU publishes
        # under its own lock) never wait behind a long holder of the VM's lock.
        self._vcpu_list: tuple[ManagedVcpu, ...] = ()
        self.ioevent_fired: Broadcaster[Fired] = Broadcaster()
        self.irqfd_resampled: Broadcaster[Fired] = Broadcaster()
        self.events: Broadcaster[VmEvent] = Broadcaster()
        self.closed = False
        self.reason = ""
        self.exit_code: int | None = None
        # Devices and claims: what the vCPU threads dispatch exits to.
        self.console = Console(options.console_buffer_bytes or DEFAULT_CONSOLE_BUFFER)
        # The UART's registers live in C and the run loop completes the guest's accesses;
        # this eventfd fires when its transmit ring gets bytes, and the console pump drains
        # them into the console in bulk.
        self._console_ready = EventFd()
        self.uart = Uart16550(self.console, raise_irq=self._pulse_com1_irq
                              if options.irqchip else None,
                              notify_fd=self._console_ready.fileno())
        if shared.console_pump is not None:
            shared.console_pump.add(self._console_ready, self.uart)
        else:
            self._watcher.add(self._console_ready.fileno(), self._on_console_ready)
        self.debug_exit = DebugExit(options.debug_exit_port or DEFAULT_DEBUG_EXIT_PORT)
        self.bus = DeviceBus()
        self.bus.add(self.uart)
        self.bus.add(self.debug_exit)
        self.claims = ClaimTable()
        # Ports completed in C without Python: all but devices and claims (none if strict).
        self.pio_map = PioMap(unclaimed=not options.strict_io)
        for device in self.bus:
            self.pio_map.set_claimed(device.base, device.length, True)
        self.pio_map.attach_uart(self.uart.regs)
        # All a vCPU sees of this VM (kvmd.core.vcpu.VmLink).
        self._vcpu_link = VmLink(
            vm_id=vm_id, irqchip=options.irqchip, pio_map=self.pio_map,
            priority=(shared.vcpu_policy, shared.vcpu_nice), cpus=shared.vcpu_cpus,
            capabilities=shared.capabilities, msr_index_list=shared.msr_index_list,
            is_closed=lambda: self.closed, require_irqchip=self._require_irqchip,
            dispatch=self.dispatch, record_outcome=self.record_outcome,
            on_event=self.on_vcpu_event, on_ended=self.on_vcpu_ended)

    @classmethod
    def build(cls, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
              shared: HostShared, owner: str, fds: FdAccount | None = None) -> ManagedVm:
        """Configure the kernel VM per `options`; closes `vm` if that fails."""
        try:
            with kernel_errors(f"vm/{vm_id}"):
                caps = shared.capabilities
                if caps.get("KVM_CAP_SET_TSS_ADDR"):
                    vm.set_tss_address(options.tss_address or DEFAULT_TSS_ADDRESS)
                if caps.get("KVM_CAP_SET_IDENTITY_MAP_ADDR"):
                    vm.set_identity_map_address(
                        options.identity_map_address or DEFAULT_IDENTITY_MAP_ADDRESS)
                if options.irqchip:
                    vm.create_irq_chip()
                if options.pit:
                    if not options.irqchip:
                        raise InvalidArgument("the in-kernel PIT needs the in-kernel irqchip",
                                              reason=Reason.ARGUMENTS_CONFLICT, field="options.pit")
                    vm.create_pit2()
                cls._enable_dirty_mode(vm, options)
            if options.console_buffer_bytes > MAX_CONSOLE_BUFFER:
                raise InvalidArgument(f"console_buffer_bytes {options.console_buffer_bytes} is "
                                      f"above {MAX_CONSOLE_BUFFER} (16 MiB)",
                                      reason=Reason.VALUE_OUT_OF_RANGE,
                                      field="options.console_buffer_bytes")
            if options.debug_exit_port and not 0 < options.debug_exit_port < 1 << 16:
                raise InvalidArgument(f"debug_exit_port {options.debug_exit_port:#x} is not "
                                      "a port",
                                      reason=Reason.VALUE_OUT_OF_RANGE,
                                      field="options.debug_exit_port")
            if options.debug_exit_port and COM1_BASE_RANGE[0] <= options.debug_exit_port < \
                    COM1_BASE_RANGE[1]:
                raise InvalidArgument("debug_exit_port collides with the COM1 UART",
                                      reason=Reason.ARGUMENTS_CONFLICT,
                                      field="options.debug_exit_port")
            managed = cls(vm_id, labels, options, vm, shared, owner, fds)
        except BaseException:
            vm.close()
            raise
        try:
            managed.dirty.start_reaper(vm_id)
        except RuntimeError as exc:  # "can't start new thread": a tasks limit
            managed.close()
            raise ResourceExhausted(f"cannot start the dirty-ring reaper of vm {vm_id}: "
                                    f"{exc}", resource=f"vm/{vm_id}",
                                    reason=Reason.HOST_EXHAUSTED) from None
        return managed

    @staticmethod
    def _enable_dirty_mode(vm: Vm, options: VmOptions) -> None:
        """Turn on the VM's dirty-tracking mode (before any vCPU: rings need that)."""
        mode = options.dirty_tracking or BITMAP
        if mode not in MODES:
            raise InvalidArgument(f"dirty_tracking {mode!r} is not one of {', '.join(MODES)}",
                                  reason=Reason.VALUE_UNKNOWN, field="options.dirty_tracking")
        if options.dirty_ring_bytes and mode != RING:
            raise InvalidArgument("dirty_ring_bytes needs dirty_tracking \"ring\"",
                                  reason=Reason.ARGUMENTS_CONFLICT,
                                  field="options.dirty_ring_bytes")
        if mode == BITMAP:  # the default: always there, nothing to enable
            return
        offered = vm.dirty_log_modes()  # three ioctls: asked only for the other modes
        if mode == MANUAL:
            if not offered.manual_protect:
                raise Unsupported("this kernel has no manual dirty-log protect "
                                  "(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
            vm.enable_manual_dirty_log_protect()
            return
        if not offered.ring:
            raise Unsupported("this kernel has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        size = options.dirty_ring_bytes or min(DEFAULT_DIRTY_RING_BYTES, offered.ring_max_bytes)
        if size > offered.ring_max_bytes:
            raise InvalidArgument(f"dirty_ring_bytes {size} is above this kernel's "
                                  f"{offered.ring_max_bytes}", reason=Reason.VALUE_OUT_OF_RANGE,
                                  field="options.dirty_ring_bytes")
        vm.enable_dirty_ring(size)

    @property
    def resource(self) -> str:
        return f"vm/{self.id}"

    def close(self) -> None:
        """Stop vCPU threads and remote handlers, release eventfds, the VM, its vCPUs and
        its memory."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            vcpus = list(self._vcpus.values())
            throttler, self._throttler = self._throttler, None
        if throttler is not None:
            throttler.stop()
        self.dirty.stop_reaper()
        for handler in self.claims.handlers():
            self.release_handler(handler, HandlerClose.VM_DELETED)
        for mvcpu in vcpus:
            mvcpu.request_stop("vm deleted")
        for mvcpu in vcpus:
            try:
                mvcpu.join()
            except Exception:  # closing the fd below kicks it again and waits
                pass
        with self.lock:
            # Their KVM registrations go with the VM fd (self.vm.close() below).
            for irqfd in self._irqfds().values():
                self._release_irqfd(irqfd)
            for ioevent in self._ioevents().values():
                self._release_ioevent(ioevent)
            self.ioevent_fired.end()
            self.irqfd_resampled.end()
            self.events.end()
            self.console.end()
            self.vm.close()
            self._vcpus.clear()
            self._vcpu_list = ()
            for charge in self._charges.values():  # and their discard credits
                self._budget.release(charge)
            self._charges.clear()
            if self.shared.console_pump is not None:
                self.shared.console_pump.remove(self._console_ready)
            else:
                self._watcher.remove(self._console_ready.fileno())
            self._console_ready.close()
            self.fds.close()

    # -- memory ---------------------------------------------------------------------------

    def add_memory_region(self, guest_addr: int, size: int, read_only: bool,
                          log_dirty: bool, *, slot: int | None = None,
                          backing: FileBacking | MemfdBacking | None = None,
                          credit: int = 0) -> MemoryRegionInfo:
        """Map new zeroed guest memory (or, for a take-over, an adopted memfd; or a file of
        the images directory, see add_file_memory_region) within the VM's and the daemon's
        limits. `slot` asks for an exact slot number (restores). `credit`: the discard
        credit an adopted memfd carries from the daemon before (a take-over), charged
        again for what the memfd holds now (MemoryBudget)."""
        # KVM's rules (kvmd.kvm), checked before any state.
        op = "KVM_SET_USER_MEMORY_REGION"
        argument_rule(lambda: check_positive_size(op, size), field="size",
                      reason=Reason.VALUE_OUT_OF_RANGE)
        argument_rule(lambda: check_page_aligned(op, "guest address", guest_addr),
                      field="guest_addr", reason=Reason.ADDRESS_UNALIGNED)
        rounded = round_up_to_page(size)
        with self.lock:
            self.check_layout_fixed("add memory to")
            regions = self.vm.memory_regions()
            if len(regions) >= self._limits.max_memory_slots_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {len(regions)} memory slots, the limit is "
                    f"{self._limits.max_memory_slots_per_vm}",
                    reason=Reason.LIMIT_MEMORY_SLOTS,
                    metadata=limit("max_memory_slots_per_vm", self._limits.max_memory_slots_per_vm))
            in_use = sum(r.size for r in regions)
            if in_use + rounded > self._limits.max_memory_per_vm_bytes:
                raise ResourceExhausted(
                    f"vm {self.id} would have {in_use + rounded} bytes of guest memory, the "
                    f"limit is {self._limits.max_memory_per_vm_bytes}",
                    reason=Reason.LIMIT_VM_MEMORY,
                    metadata=limit("max_memory_per_vm_bytes", self._limits.max_memory_per_vm_bytes))
            self.fds.take(FDS_PER_SLOT, "a memory slot")
            try:
                adopted = backing if isinstance(backing, MemfdBacking) and credit else None
                charge = self._budget.reserve(
                    rounded, credit if adopted else 0,
                    (lambda: os.fstat(adopted.fd).st_blocks * 512) if adopted else None)
            except BaseException:
                self.fds.give(FDS_PER_SLOT)
                raise
            try:
                with kernel_errors(self.resource):
                    slot = self.vm.add_memory_region(guest_addr, rounded, read_only, log_dirty,
                                                     backing=backing, slot=slot)
                    info = self.vm.memory_region(slot)
            except BaseException:
                self._budget.release(charge)
                self.fds.give(FDS_PER_SLOT)
                raise
            self._charges[info.slot] = charge
            if not isinstance(backing, FileBacking):  # files are never discarded
                self._budget.track(charge, lambda: self.slot_allocated_bytes(info.slot))
            return info

    def remove_memory_region(self, slot: int) -> MemoryRegionInfo:
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            self.check_layout_fixed("remove memory from")
            info = self.vm.remove_memory_region(slot)
            self.dirty.forget_slot(slot)
            overlays = sum(1 for r in self._files().values() if r.slot == slot
                           and not r.whole_slot)
            self._forget_files(slot)
            self.fds.give(FDS_PER_SLOT + FDS_PER_FILE_MAPPING * overlays)
            charge = self._charges.pop(slot, None)
        if charge is not None:
            self._budget.release(charge)  # and its discard credit
        return info

    def memory_regions(self) -> list[MemoryRegionInfo]:
        """The slots as callers set them up (logging a migration turned on is not shown)."""
        regions = self.vm.memory_regions()
        if not self._forced_logging:
            return regions
        return [dataclasses.replace(r, log_dirty=False) if r.slot in self._forced_logging
                else r for r in regions]

    @property
    def dirty_pages_total(self) -> int:
        """Dirty pages the kernel reported for this VM (every consumer's harvests)."""
        return self.dirty.harvested_pages

    def write_memory(self, guest_addr: int, data: bytes | memoryview) -> None:
        """Write guest memory from the host; the pages count as dirty for the daemon's own
        consumers (snapshots, migration), which must send them. GetDirtyLog follows KVM,
        which logs only guest writes."""
        with kernel_errors(self.resource):
            self.vm.write(guest_addr, data)
        end = guest_addr + len(data)
        for r in self.vm.memory_regions():
            lo, hi = max(r.guest_addr, guest_addr), min(r.end, end)
            if lo < hi and r.log_dirty:
                self.dirty.mark(r.slot, lo - r.guest_addr, hi - lo)

    def read_memory(self, guest_addr: int, length: int) -> bytes:
        with kernel_errors(self.resource):
            return self.vm.read(guest_addr, length)

    def check_range(self, guest_addr: int, length: int) -> None:
        """Raise unless [guest_addr, guest_addr+length) is all backed by memory."""
        with kernel_errors(self.resource):
            self.vm.read(guest_addr, 0)
            if length:
                self.vm.read(guest_addr + length - 1, 1)
                covered = 0
                for region in self.vm.memory_regions():
                    lo = max(region.guest_addr, guest_addr)
                    hi = min(region.end, guest_addr + length)
                    covered += max(0, hi - lo)
                if covered != length:
                    raise InvalidArgument(
                        f"{guest_addr:#x}+{length:#x} is not entirely backed by guest memory",
                        reason=Reason.RANGE_OUTSIDE_MEMORY, field="guest_addr")

    def get_dirty_log(self, slot: int) -> tuple[MemoryRegionInfo, bytes]:
        """The slot's pages the guest dirtied since the last GetDirtyLog (as KVM logs them:
        host writes are not in it); reading resets this view only, not other consumers'."""
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            info = self.vm.memory_region(slot)
            if not info.log_dirty or slot in self._forced_logging:
                raise InvalidArgument(f"slot {slot} was added without dirty logging",
                                      resource=f"{self.resource}/slot/{slot}",
                                      reason=Reason.SLOT_NOT_LOGGED, field="slot")
            # Manual mode: reading does not reset the API's view; ClearDirtyLog does.
            if self.dirty.mode == MANUAL:
                return info, self.dirty.peek_bitmap(API, info)
            return info, self.dirty.take_bitmap(API, info)

    def measure_dirty_rate(self, duration_ms: int) -> tuple[int, float]:
        """Pages dirtied over `duration_ms` (see DirtyTracker.measure_rate)."""
        if not 0 <= duration_ms <= 60_000:
            raise InvalidArgument("duration_ms must be 1-60000 (0: 1000)",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="duration_ms")
        if not any(r.log_dirty for r in self.vm.memory_regions()):
            raise InvalidState(f"vm {self.id} has no slot with dirty logging",
                               resource=self.resource, reason=Reason.DIRTY_MODE)
        with kernel_errors(self.resource):
            return self.dirty.measure_rate((duration_ms or 1000) / 1000)

    def clear_dirty_log(self, slot: int, ranges: list[tuple[int, int]]) -> None:
        """Manual mode: mark pages [first, first+count) of the API's view of a slot clean
        (the caller has dealt with them), as KVM_CLEAR_DIRTY_LOG does."""
        if self.dirty.mode != MANUAL:
            raise InvalidState(f"vm {self.id} tracks dirty pages in {self.dirty.mode} mode; "
                               "ClearDirtyLog is for manual mode (GetDirtyLog resets the "
                               "log in the others)", resource=self.resource,
                               reason=Reason.DIRTY_MODE)
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            info = self.vm.memory_region(slot)
            pages = info.size // PAGE_SIZE
            for first, count in ranges:
                if first < 0 or count <= 0 or first + count > pages:
                    raise InvalidArgument(f"pages {first}+{count} are outside slot {slot} "
                                          f"({pages} pages)",
                                          reason=Reason.RANGE_OUTSIDE_MEMORY, field="ranges")
            for first, count in ranges:
                self.dirty.clear(API, slot, first, count)

    def set_dirty_logging(self, slot: int, enabled: bool) -> MemoryRegionInfo:
        """Turn dirty logging of an existing slot on or off, keeping its memory. While off,
        nothing tracks the slot: the daemon's own consumers (diff snapshots, a migration)
        then count every page of it as dirty, so nothing is missed."""
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            self.check_layout_fixed("change dirty logging of")
            info = self.vm.memory_region(slot)
            if info.log_dirty == enabled:
                return info
            if not enabled:
                self.dirty.harvest([info])  # what KVM logged so far reaches every consumer
            info = self.vm.set_dirty_logging(slot, enabled)
            if not enabled:
                for consumer in (SNAPSHOT, MIGRATION):
                    self.dirty.mark_all(consumer, info)
            return info

    # -- discard and file-backed memory ---------------------------------------------------
    #
    # "Pages the guest has" are the pages its slots' own memfds hold: the binding reads them
    # (allocated_bytes: st_blocks; populated_ranges: SEEK_DATA/SEEK_HOLE; nonzero_page_runs)
    # and this section is the one place the daemon asks. DiscardGuestMemory punches holes
    # there; sparse snapshots and migration copy only what `guest_pages` returns.
    #
    # The daemon-wide memory budget charges a slot its full size from AddMemoryRegion to
    # RemoveMemoryRegion (or DeleteVm), file-backed or not, less a credit for what a discard
    # released from its memfd, for as long as the memfd still does not hold it (the kernel's
    # word: st_blocks; see MemoryBudget). That is the point of a balloon: memory an idle
    # guest gave back admits other slots. The guest may touch the range again at any time
    # without asking (the daemon cannot refuse a page fault); it is then charged again, and
    # the total may pass the limit by what admissions took on credit: overcommit, reported
    # as kvmd_guest_memory_discard_credit_bytes.
    #
    # max_memory_per_vm_bytes keeps counting slot sizes, credit or not: it bounds what one
    # guest can have (its balloon deflated), which a discard does not change.

    # Class defaults, so __init__ stays as it was: set by the methods below, under the lock.
    discarded_bytes_total = 0  # bytes DiscardGuestMemory released over the VM's life
    _file_ranges: dict[tuple[int, int], FileBackedRange] | None = None  # (slot, offset) ->

    def _files(self) -> dict[tuple[int, int], FileBackedRange]:
        if self._file_ranges is None:
            self._file_ranges = {}
        return self._file_ranges

    def _forget_files(self, slot: int) -> None:
        """Drop the records of a removed slot (its files were msync'ed and closed)."""
        for key in [k for k in self._files() if k[0] == slot]:
            del self._files()[key]

    def _images(self) -> ImagesDir:
        images = self.shared.images
        if images is None:
            raise InvalidState("this daemon has no images directory (--images-dir): "
                               "file-backed memory is off", resource=self.resource,
                               reason=Reason.FEATURE_DISABLED)
        return images

    def _slot(self, slot: int) -> MemoryRegionInfo:
        with kernel_errors(f"{self.resource}/slot/{slot}"):
            return self.vm.memory_region(slot)

    @staticmethod
    def _check_pages(what: str, start_field: str, offset: int, size: int,
                     allow_empty: bool = False) -> None:
        """A range of whole pages, by the binding's rules; `start_field` names the request
        field of `offset`. With `allow_empty`, size 0 means "to the end"."""
        if not (allow_empty and size == 0):
            argument_rule(lambda: check_positive_size(what, size), field="size",
                          reason=Reason.VALUE_OUT_OF_RANGE)
        argument_rule(lambda: check_page_aligned(what, start_field, offset),
                      field=start_field, reason=Reason.ADDRESS_UNALIGNED)
        argument_rule(lambda: check_page_aligned(what, "size", size), field="size",
                      reason=Reason.ADDRESS_UNALIGNED)

    @staticmethod
    def _check_file(file: MemoryFile) -> None:
        normalize_name(file.name)
        if file.offset % PAGE_SIZE:
            raise InvalidArgument(f"file offset {file.offset:#x} is not page aligned "
                                  f"({PAGE_SIZE} bytes)",
                                  reason=Reason.ADDRESS_UNALIGNED, field="file.offset")

    @staticmethod
    def _check_file_size(image: OpenedImage, file: MemoryFile, size: int) -> None:
        if image.identity.size < file.offset + size:
            raise InvalidArgument(
                f"memory file {image.name!r} has {image.identity.size} bytes; the mapping "
                f"needs {file.offset + size} (offset {file.offset:#x} + size {size:#x})",
                resource=f"images/{image.name}", reason=Reason.RANGE_OUTSIDE_MEMORY, field="size")

    def discard_memory(self, guest_addr: int, size: int) -> int:
        """Release the host pages behind guest [guest_addr, guest_addr+size): page aligned,
        inside guest memory (it may span adjacent slots) and backed by the slots' own
        memory, not by files (InvalidState). The range reads zeros afterwards; the guest
        touching it again gets fresh pages. Returns the bytes the kernel freed."""
        self._check_pages("discard", "guest_addr", guest_addr, size)
        with self.lock:
            end = guest_addr + size
            covered = sum(max(0, min(r.end, end) - max(r.guest_addr, guest_addr))
                          for r in self.vm.memory_regions())
            if covered != size:
                raise InvalidArgument(f"{guest_addr:#x}+{size:#x} is not entirely inside "
                                      "guest memory", resource=self.resource,
                                      reason=Reason.RANGE_OUTSIDE_MEMORY, field="guest_addr")
            for r in self._files().values():
                if r.guest_addr < end and guest_addr < r.guest_addr + r.size:
                    raise InvalidState(
                        f"{guest_addr:#x}+{size:#x} overlaps memory file {r.image!r} at "
                        f"{r.guest_addr:#x}+{r.size:#x}: only the daemon's own memory can be "
                        "discarded", resource=f"{self.resource}/slot/{r.slot}",
                        reason=Reason.SLOT_FILE_CONFLICT)
            touched = [r.slot for r in self.vm.memory_regions()
                       if r.guest_addr < end and guest_addr < r.end]
            before = {s: self.slot_allocated_bytes(s) for s in touched}
            with kernel_errors(self.resource):
                released = self.vm.discard(guest_addr, size)
            self.discarded_bytes_total += released
            # What each slot's memfd gave back is credited to the budget (MemoryBudget).
            for s in touched:
                charge = self._charges.get(s)
                if charge is not None:
                    self._budget.credit(charge, before[s] - self.slot_allocated_bytes(s),
                                        before[s])
            # The range now reads zeros: a change, like a host write, for diff snapshots and
            # migration (GetDirtyLog follows KVM: guest writes only).
            for region in self.vm.memory_regions():
                lo, hi = max(region.guest_addr, guest_addr), min(region.end, end)
                if lo < hi and region.log_dirty:
                    self.dirty.mark(region.slot, lo - region.guest_addr, hi - lo)
        log.debug("guest memory discarded", extra={"vm_id": self.id, "size": size,
                                                    "released": released})
        return released

    def slot_allocated_bytes(self, slot: int) -> int:
        """Host memory the slot's own memfd holds now; 0 for a file-backed slot, and for a
        slot removed meanwhile."""
        if (slot, 0) in self._files() and self._files()[(slot, 0)].whole_slot:
            return 0
        try:
            return self.vm.allocated_bytes(slot)
        except KvmError:
            return 0

    def discard_credits(self) -> dict[int, int]:
        """{slot: bytes} of the slots' discard credits standing now (what a hand-over
        carries to the next daemon, so its adoption is charged as this one is)."""
        with self.lock:
            charges = dict(self._charges)
        credits = {s: self._budget.current_credit(c) for s, c in charges.items()}
        return {s: c for s, c in credits.items() if c}

    def memory_allocated_bytes(self) -> int:
        """Host memory the VM's own guest memory holds now (the sum over its slots)."""
        return sum(self.slot_allocated_bytes(r.slot) for r in self.vm.memory_regions())

    def guest_pages(self, slot: int, offset: int = 0, size: int | None = None
                    ) -> list[tuple[int, int]]:
        """The (offset, length) ranges of a slot the guest has: pages its memfd holds
        (never touched and discarded pages are holes; files mapped over the slot are left
        out). What a sparse snapshot or a migration copies, less the pages of zeros
        (`data_pages_within`); everything else reads as zeros. A file-backed slot has none
        (see `file_backed_ranges`)."""
        with self.lock:
            if (slot, 0) in self._files() and self._files()[(slot, 0)].whole_slot:
                self._slot(slot)
                return []
            with kernel_errors(f"{self.resource}/slot/{slot}"):
                return self.vm.populated_ranges(slot, offset, size)

    def data_pages_within(self, slot: int, offset: int, size: int) -> list[tuple[int, int]]:
        """The runs of pages holding a non-zero byte in [offset, offset+size) of a slot, a
        range `guest_pages` returned (or part of one): scanned without asking the backing
        again, so a large range can be gone through a piece at a time (kvmd.state.snapshot).
        """
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            return self.vm.nonzero_page_runs(slot, offset, size, populated=True)

    def add_file_memory_region(self, guest_addr: int, size: int, read_only: bool,
                               log_dirty: bool, file: MemoryFile, *, slot: int | None = None
                               ) -> MemoryRegionInfo:
        """A slot backed by a file of the images directory (MAP_SHARED; guest writes reach
        the file). A read-only file makes a read-only slot (guest writes exit as MMIO). The
        slot is charged to the memory budget like any other. `slot`: an exact number
        (restores)."""
        if size <= 0:
            raise InvalidArgument("memory region size must be positive",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="size")
        if guest_addr % PAGE_SIZE:
            raise InvalidArgument(f"guest address {guest_addr:#x} is not page aligned "
                                  f"({PAGE_SIZE} bytes)",
                                  reason=Reason.ADDRESS_UNALIGNED, field="guest_addr")
        self._check_file(file)
        rounded = round_up_to_page(size)
        writable = not file.read_only
        with self._images().open(file.name, writable) as image:
            self._check_file_size(image, file, rounded)
            with self.lock:
                info = self.add_memory_region(
                    guest_addr, rounded, read_only or file.read_only, log_dirty,
                    backing=FileBacking(image.fd, file.offset, writable), slot=slot)
                self._files()[(info.slot, 0)] = FileBackedRange(
                    info.slot, info.guest_addr, 0, info.size, image.name, file.offset,
                    writable, True, image.identity)
        log.info("file-backed memory added", extra={
            "vm_id": self.id, "slot": info.slot, "image": image.name, "writable": writable})
        return info

    def map_file(self, slot: int, offset: int, size: int, file: MemoryFile
                 ) -> FileBackedRange:
        """Map a file of the images directory over [offset, offset+size) of a slot of the
        daemon's own memory. A read-only file needs a read-only slot (InvalidState): with a
        writable slot a guest write to it would fail KVM_RUN (EFAULT) instead of exiting."""
        self._check_pages("mapping", "offset", offset, size)
        self._check_file(file)
        writable = not file.read_only
        with self.lock:
            info = self._slot(slot)
            if offset + size > info.size:
                raise InvalidArgument(f"{offset:#x}+{size:#x} is outside slot {slot} "
                                      f"({info.size:#x} bytes)",
                                      reason=Reason.RANGE_OUTSIDE_MEMORY, field="offset",
                                      resource=f"{self.resource}/slot/{slot}")
            whole = self._files().get((slot, 0))
            if whole is not None and whole.whole_slot:
                raise InvalidState(f"slot {slot} is backed by memory file {whole.image!r} as "
                                   "a whole", resource=f"{self.resource}/slot/{slot}",
                                   reason=Reason.SLOT_FILE_CONFLICT)
            if file.read_only and not info.read_only:
                raise InvalidState(
                    f"a read-only file needs a read-only slot: slot {slot} is writable, and "
                    "a guest write there would fail instead of exiting as MMIO",
                    resource=f"{self.resource}/slot/{slot}", reason=Reason.SLOT_FILE_CONFLICT)
            for r in self._files().values():
                if r.slot == slot and r.offset < offset + size and offset < r.end:
                    raise AlreadyExists(f"{offset:#x}+{size:#x} overlaps memory file "
                                        f"{r.image!r} mapped at {r.offset:#x}+{r.size:#x} "
                                        f"of slot {slot}",
                                        resource=f"{self.resource}/slot/{slot}")
            with self._images().open(file.name, writable) as image:
                self._check_file_size(image, file, size)
                self.fds.take(FDS_PER_FILE_MAPPING, "a file mapping")
                try:
                    with kernel_errors(f"{self.resource}/slot/{slot}"):
                        self.vm.map_fd(slot, offset, size, image.fd, file.offset, writable)
                except BaseException:
                    self.fds.give(FDS_PER_FILE_MAPPING)
                    raise
                record = FileBackedRange(slot, info.guest_addr + offset, offset, size,
                                         image.name, file.offset, writable, False,
                                         image.identity)
                self._files()[(slot, offset)] = record
        log.info("memory file mapped", extra={"vm_id": self.id, "slot": slot,
                                              "image": record.image, "writable": writable})
        return record

    def unmap_file(self, slot: int, offset: int, size: int) -> FileBackedRange:
        """Undo `map_file` (offset and size exactly as mapped): msync a writable file and
        map the slot's own memory back; its earlier contents reappear."""
        with self.lock:
            self._slot(slot)
            record = self._files().get((slot, offset))
            if record is None or record.whole_slot or record.size != size:
                raise NotFound(f"no memory file is mapped at {offset:#x}+{size:#x} of slot "
                               f"{slot}", resource=f"{self.resource}/slot/{slot}")
            try:
                with kernel_errors(f"{self.resource}/slot/{slot}"):
                    self.vm.unmap_fd(slot, offset, size)
            finally:
                # The binding restores the slot's memory even when the msync fails.
                if not any(m.slot == slot and m.offset == offset
                           for m in self.vm.file_mappings()):
                    del self._files()[(slot, offset)]
                    self.fds.give(FDS_PER_FILE_MAPPING)
        log.info("memory file unmapped", extra={"vm_id": self.id, "slot": slot,
                                                "image": record.image})
        return record

    def sync_memory(self, slot: int, offset: int = 0, size: int = 0) -> int:
        """msync the writable files mapped in [offset, offset+size) of a slot (size 0: to
        the slot's end); returns the bytes synced. A range without any file mapped is
        InvalidState (there is nothing to write back)."""
        self._check_pages("sync", "offset", offset, size, allow_empty=True)
        with self.lock:
            info = self._slot(slot)
            end = info.size if size == 0 else offset + size
            if offset >= info.size or end > info.size:
                raise InvalidArgument(f"{offset:#x}+{end - offset:#x} is outside slot {slot} "
                                      f"({info.size:#x} bytes)",
                                      reason=Reason.RANGE_OUTSIDE_MEMORY, field="offset",
                                      resource=f"{self.resource}/slot/{slot}")
            ranges = [r for r in self._files().values()
                      if r.slot == slot and r.offset < end and offset < r.end]
            if not ranges:
                raise InvalidState(f"no memory file is mapped in {offset:#x}+"
                                   f"{end - offset:#x} of slot {slot}",
                                   resource=f"{self.resource}/slot/{slot}",
                                   reason=Reason.SLOT_FILE_CONFLICT)
            synced = 0
            for r in ranges:
                if not r.writable:
                    continue
                lo, hi = max(offset, r.offset), min(end, r.end)
                with kernel_errors(f"{self.resource}/slot/{slot}"):
                    self.vm.msync_memory_region(slot, lo, hi - lo)
                synced += hi - lo
        return synced

    def file_mapping_states(self, sync: bool) -> list[FileMappingState]:
        """The files mapped into the VM as a saved state carries them (by reference; the
        state layer adds each one's digest). `sync`: write back the writable ones first,
        so the files hold what the guest wrote (the VM is held paused)."""
        out = []
        for r in self.file_backed_ranges():
            if sync and r.writable:
                with kernel_errors(f"{self.resource}/slot/{r.slot}"):
                    self.vm.msync_memory_region(r.slot, r.offset, r.size)
            try:
                file_size = self._images().stat(r.image).st_size
            except DomainError:
                file_size = r.identity.size
            out.append(FileMappingState(r.slot, r.offset, r.size, r.image, r.file_offset,
                                        r.writable, r.whole_slot, file_size))
        return out

    def file_backed_ranges(self) -> list[FileBackedRange]:
        """Every file of the images directory mapped into the VM (whole slots and parts of
        slots), by guest address: what a snapshot, migration or take-over records by
        reference (image name, offsets, size, writable, and the file's identity)."""
        with self.lock:
            return sorted(self._files().values(), key=lambda r: r.guest_addr)

    def region_files(self, slot: int) -> list[FileBackedRange]:
        """The files mapped in one slot, by offset (the whole slot's first)."""
        with self.lock:
            return sorted((r for r in self._files().values() if r.slot == slot),
                          key=lambda r: (not r.whole_slot, r.offset))

    # -- interrupts -----------------------------------------------------------------------

    def set_irq_line(self, irq: int, active: bool) -> None:
        self._require_irqchip("SetIrqLine")
        with kernel_errors(self.resource):
            self.vm.set_irq_line(irq, active)

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        self._require_irqchip("SetGsiRouting")
        with self.lock, kernel_errors(self.resource):
            self.vm.set_gsi_routing(routes)
            self._gsi_routes = list(routes)

    def signal_msi(self, address: int, data: int, devid: int | None) -> bool:
        self._require_irqchip("SignalMsi")
        try:
            return self.vm.signal_msi(address, data, devid) > 0
        except KvmError as exc:
            # KVM returns -1 (seen as EPERM) when the message has no destination vCPU.
            if exc.errno == errno.EPERM:
                return False
            raise from_kvm_error(exc, self.resource) from exc

    def _require_irqchip(self, what: str) -> None:
        if not self.options.irqchip:
            raise InvalidState(f"{what} needs a VM created with the in-kernel irqchip",
                               resource=self.resource, reason=Reason.IRQCHIP_MODE)

    def register_irqfd(self, irqfd_id: str, gsi: int, resample: bool) -> IrqfdEntry:
        validate_id("irqfd id", irqfd_id)
        self._require_irqchip("RegisterIrqfd")
        with self.lock:
            irqfds = self._irqfds()
            if irqfd_id in irqfds:
                raise AlreadyExists(f"irqfd {irqfd_id!r} already exists in vm {self.id}",
                                    resource=f"{self.resource}/irqfd/{irqfd_id}")
            if len(irqfds) >= self._limits.max_irqfds_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {self._limits.max_irqfds_per_vm} irqfds, the limit",
                    reason=Reason.LIMIT_IRQFDS,
                    metadata=limit("max_irqfds_per_vm", self._limits.max_irqfds_per_vm))
            self.fds.take(irqfd_fds(resample), "an irqfd")
            event = resample_fd = None
            registered = False
            try:
                with kernel_errors(f"{self.resource}/irqfd/{irqfd_id}"):
                    event = EventFd()
                    resample_fd = EventFd() if resample else None
                    entry = IrqfdEntry(irqfd_id, gsi, event, resample_fd)
                    self.vm.register_irqfd(gsi, event, resample_fd, tag=entry)
                    registered = True
                    if resample_fd is not None:
                        self._watcher.add(resample_fd.fileno(),
                                          lambda: self._on_resample(entry))
            except BaseException:
                # Nothing half-made stays: not in KVM, no eventfd, nothing charged.
                if registered and event is not None:
                    self.vm.unregister_irqfd(gsi, event)
                for fd in (event, resample_fd):
                    if fd is not None:
                        fd.close()
                self.fds.give(irqfd_fds(resample))
                raise
            return entry

    def _on_resample(self, entry: IrqfdEntry) -> None:
        if entry.resample is None:
            return
        count = entry.resample.read()
        if count:
            entry.resamples += count
            self.irqfd_resampled.publish(Fired(entry.irqfd_id, count))

    def trigger_irqfd(self, irqfd_id: str) -> None:
        with self.lock:
            entry = self._irqfd(irqfd_id)
            entry.event.write(1)
            entry.triggers += 1

    def unregister_irqfd(self, irqfd_id: str) -> None:
        with self.lock:
            entry = self._irqfd(irqfd_id)
            with kernel_errors(f"{self.resource}/irqfd/{irqfd_id}"):
                self.vm.unregister_irqfd(entry.gsi, entry.event)
            self._release_irqfd(entry)
            self.fds.give(irqfd_fds(entry.resample is not None))

    def _release_irqfd(self, entry: IrqfdEntry) -> None:
        if entry.resample is not None:
            self._watcher.remove(entry.resample.fileno())
            entry.resample.close()
        entry.event.close()

    def _irqfds(self) -> dict[str, IrqfdEntry]:
        """The irqfds by id, as the kernel VM recorded them (it is their one record: KVM
        itself cannot be asked), in registration order."""
        return {r.tag.irqfd_id: r.tag for r in self.vm.irqfds()
                if isinstance(r.tag, IrqfdEntry)}

    def irqfds(self) -> list[IrqfdEntry]:
        with self.lock:
            return list(self._irqfds().values())

    def _irqfd(self, irqfd_id: str) -> IrqfdEntry:
        validate_id("irqfd id", irqfd_id)
        entry = self._irqfds().get(irqfd_id)
        if entry is None:
            raise NotFound(f"no irqfd {irqfd_id!r} in vm {self.id}",
                           resource=f"{self.resource}/irqfd/{irqfd_id}")
        return entry

    # -- ioevents -------------------------------------------------------------------------

    def register_ioevent(self, ioevent_id: str, space: IoSpace, address: int, length: int,
                         datamatch: int | None) -> IoeventEntry:
        validate_id("ioevent id", ioevent_id)
        # KVM's rule (kvmd.kvm), checked before any state: the length alone, then with the
        # value, so that the field at fault is known without reading the message.
        argument_rule(lambda: check_datamatch(Datamatch(length, None)), field="length",
                      reason=Reason.VALUE_OUT_OF_RANGE)
        argument_rule(lambda: check_datamatch(Datamatch(length, datamatch)), field="datamatch",
                      reason=Reason.VALUE_OUT_OF_RANGE)
        with self.lock:
            ioevents = self._ioevents()
            if ioevent_id in ioevents:
                raise AlreadyExists(f"ioevent {ioevent_id!r} already exists in vm {self.id}",
                                    resource=f"{self.resource}/ioevent/{ioevent_id}")
            if len(ioevents) >= self._limits.max_ioevents_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {self._limits.max_ioevents_per_vm} ioevents, the limit",
                    reason=Reason.LIMIT_IOEVENTS,
                    metadata=limit("max_ioevents_per_vm", self._limits.max_ioevents_per_vm))
            self.check_addresses_free(IOEVENT, [ioevent_range(space, address, length)])
            self.fds.take(FDS_PER_IOEVENT, "an ioevent")
            event = None
            registered = False
            try:
                with kernel_errors(f"{self.resource}/ioevent/{ioevent_id}"):
                    event = EventFd()
                    entry = IoeventEntry(ioevent_id, space, address, length, datamatch, event)
                    self.vm.register_ioevent(event, entry.kvm_address, entry.kvm_datamatch,
                                             tag=entry)
                    registered = True
                    self._watcher.add(event.fileno(), lambda: self._on_ioevent(entry))
            except BaseException:
                # Nothing half-made stays: not in KVM, no eventfd, nothing charged.
                if registered and event is not None:
                    self.vm.unregister_ioevent(event, entry.kvm_address, entry.kvm_datamatch)
                if event is not None:
                    event.close()
                self.fds.give(FDS_PER_IOEVENT)
                raise
            return entry

    def check_addresses_free(self, kind: str, ranges: list[ClaimRange]) -> None:
        """Under the lock: one owner per address among devices, claims and ioevents (see
        kvmd.core.owners); AlreadyExists otherwise."""
        check_free(kind, ranges, devices=self.bus, claims=self.claims, ioevents=(
            Owned(e.space, e.address, max(1, e.length), f"ioevent {e.ioevent_id!r}")
            for e in self._ioevents().values()), resource=self.resource)

    def _on_ioevent(self, entry: IoeventEntry) -> None:
        count = entry.event.read()
        if count:
            entry.fired += count
            self.ioevent_fired.publish(Fired(entry.ioevent_id, count))

    def unregister_ioevent(self, ioevent_id: str) -> None:
        validate_id("ioevent id", ioevent_id)
        with self.lock:
            entry = self._ioevents().get(ioevent_id)
            if entry is None:
                raise NotFound(f"no ioevent {ioevent_id!r} in vm {self.id}",
                               resource=f"{self.resource}/ioevent/{ioevent_id}")
            with kernel_errors(f"{self.resource}/ioevent/{ioevent_id}"):
                self.vm.unregister_ioevent(entry.event, entry.kvm_address, entry.kvm_datamatch)
            self._release_ioevent(entry)
            self.fds.give(FDS_PER_IOEVENT)

    def _release_ioevent(self, entry: IoeventEntry) -> None:
        self._watcher.remove(entry.event.fileno())
        entry.event.close()

    def _ioevents(self) -> dict[str, IoeventEntry]:
        """The ioevents by id, as the kernel VM recorded them, in registration order."""
        return {r.tag.ioevent_id: r.tag for r in self.vm.ioevents()
                if isinstance(r.tag, IoeventEntry)}

    def ioevents(self) -> list[IoeventEntry]:
        with self.lock:
            return list(self._ioevents().values())

    def watch_ioevents(self) -> Subscription[Fired]:
        return self.ioevent_fired.subscribe()

    def watch_resamples(self) -> Subscription[Fired]:
        return self.irqfd_resampled.subscribe()

    # -- vCPUs ----------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        with self.lock:
            if vcpu_id in self._vcpus:
                raise AlreadyExists(f"vcpu {vcpu_id} already exists in vm {self.id}",
                                    resource=f"{self.resource}/vcpu/{vcpu_id}")
            if len(self._vcpus) >= self._limits.max_vcpus_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {len(self._vcpus)} vcpus, the limit is "
                    f"{self._limits.max_vcpus_per_vm}",
                    reason=Reason.LIMIT_VCPUS,
                    metadata=limit("max_vcpus_per_vm", self._limits.max_vcpus_per_vm))
            self.fds.take(FDS_PER_VCPU, "a vcpu")
            try:
                with kernel_errors(f"{self.resource}/vcpu/{vcpu_id}"):
                    vcpu = self.vm.create_vcpu(vcpu_id)
            except BaseException:
                self.fds.give(FDS_PER_VCPU)
                raise
            managed = ManagedVcpu(self._vcpu_link, vcpu)
            self._vcpus[vcpu_id] = managed
            self._vcpu_list = tuple(self._vcpus[k] for k in sorted(self._vcpus))
            return managed

    def vcpu(self, vcpu_id: int) -> ManagedVcpu:
        managed = self._vcpus.get(vcpu_id)  # one dict lookup: no lock needed
        if managed is None:
            raise NotFound(f"no vcpu {vcpu_id} in vm {self.id}",
                           resource=f"{self.resource}/vcpu/{vcpu_id}")
        return managed

    def vcpus(self) -> list[ManagedVcpu]:
        """The vCPUs by id; takes no lock (see _vcpu_list)."""
        return list(self._vcpu_list)

    # -- run control ----------------------------------------------------------------------

    @property
    def state(self) -> VcpuRunState:
        """created, running, paused, stopped or crashed (VM_STATES), from the vCPU states."""
        states = {v.state for v in self.vcpus()}
        if not states:
            return CREATED
        if CRASHED in states:
            return CRASHED
        if states & {RUNNING, HALTED}:
            return RUNNING
        if PAUSED in states:
            return PAUSED
        if states == {CREATED}:
            return CREATED
        return STOPPED

    def check_not_busy(self) -> None:
        """Run control waits for no one: while a snapshot holds the VM paused, refuse."""
        if self.busy:
            raise InvalidState(f"vm {self.id} is held paused for a {self.busy}; try again "
                               "when it is done", resource=self.resource, reason=Reason.VM_BUSY)

    def start(self) -> None:
        """Start every vCPU. A stopped or crashed VM starts again from its registers as
        they are (an operator resets a crashed guest by setting them first)."""
        self.check_not_busy()
        vcpus = self.vcpus()
        if not vcpus:
            raise InvalidState(f"vm {self.id} has no vcpus to start", resource=self.resource,
                               reason=Reason.VM_NO_VCPUS)
        bad = [v for v in vcpus if v.state not in STARTABLE]
        if bad:
            raise InvalidState(f"vm {self.id} is {self.state} (vcpu {bad[0].id} is "
                               f"{bad[0].state}); stop it before starting it again",
                               resource=self.resource, reason=Reason.VM_RUNNING)
        # Every thread first, held at its gate: if one cannot be created (a tasks limit),
        # the others end unseen and every vCPU is as it was.
        launches = []
        try:
            for v in vcpus:
                launches.append(v.launch())
        except BaseException:
            for launch in launches:
                launch.cancel()
            raise
        self.reason, self.exit_code = "", None
        for i, launch in enumerate(launches):
            try:
                launch.commit()
            except BaseException:
                for rest in launches[i + 1:]:
                    rest.cancel()
                raise

    def pause(self) -> None:
        """Kick every running or halted vCPU at once, then wait for each to park."""
        for v, ticket in self.request_pause():
            v.wait_paused(ticket)

    def request_pause(self) -> list[tuple[ManagedVcpu, PauseTicket]]:
        """The first half of `pause`, which never blocks: kick every running or halted vCPU
        and return what to wait for (ManagedVcpu.wait_paused, or pause_done polled on each
        state change, see add_listener)."""
        self.check_not_busy()
        vcpus = [v for v in self.vcpus() if v.state in PAUSABLE]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is {self.state}; only a running vm can be "
                               "paused", resource=self.resource, reason=Reason.VM_NOT_RUNNING)
        tickets = []
        for v in vcpus:
            try:
                tickets.append((v, v.request_pause()))
            except InvalidState:
                pass  # it parked or ended by itself meanwhile: nothing to wait for
        return tickets

    def resume(self) -> None:
        """Resume every paused or halted vCPU, and cancel pauses still in flight."""
        self.check_not_busy()
        vcpus = [v for v in self.vcpus() if v.state in RESUMABLE or v.pause_pending]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is {self.state}; only a paused vm can be "
                               "resumed", resource=self.resource, reason=Reason.VM_NOT_PAUSED)
        for v in vcpus:
            try:
                v.resume()
            except InvalidState:
                pass  # it ended, or another resume got there first

    def stop(self) -> None:
        """Stop every vCPU thread; a crashed VM becomes stopped (its crash reason kept)."""
        self.check_not_busy()
        vcpus = [v for v in self.vcpus() if v.state != STOPPED]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is already {self.state}", resource=self.resource,
                               reason=Reason.VM_STOPPED)
        # Wait only for the threads asked to stop: a start racing in later wins.
        asked = [(v, v.request_stop("stopped by request")) for v in vcpus]
        for v, thread in asked:
            if thread is not None:
                v.join(thread=thread)
            if v.state in (CREATED, CRASHED):
                try:
                    v.stop()
                except InvalidState:
                    pass  # it stopped meanwhile
        if not self.reason:
            self.reason = "stopped by request"

    # Run control of one vCPU (the Vcpus service): refused like the VM-wide forms while a
    # snapshot holds the VM.

    def start_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        self.check_not_busy()
        vcpu = self.vcpu(vcpu_id)
        vcpu.start()
        return vcpu

    def pause_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        vcpu, ticket = self.request_pause_vcpu(vcpu_id)
        vcpu.wait_paused(ticket)
        return vcpu

    def request_pause_vcpu(self, vcpu_id: int) -> tuple[ManagedVcpu, PauseTicket]:
        """The first half of pause_vcpu, which never blocks (see request_pause)."""
        self.check_not_busy()
        vcpu = self.vcpu(vcpu_id)
        return vcpu, vcpu.request_pause()

    def resume_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        self.check_not_busy()
        vcpu = self.vcpu(vcpu_id)
        vcpu.resume()
        return vcpu

    def stop_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        self.check_not_busy()
        vcpu = self.vcpu(vcpu_id)
        vcpu.stop()
        return vcpu

    def on_vcpu_event(self, vcpu: ManagedVcpu, event: str, reason: str,
                      exit_code: int | None) -> None:
        """Called by a vCPU (under its lock) on every state change: publish it."""
        regs = vcpu.crash_regs if event == CRASHED else None
        self.events.publish(VmEvent(event, vcpu.id, self.state, reason, exit_code, regs,
                                    int(time.time() * 1000)))

    def record_outcome(self, outcome: Outcome) -> None:
        """Why the VM ends (the first reason; the exit code), recorded by the vCPU that ends
        it before its state changes: whoever sees that state (WatchVm, GetVm) sees these."""
        if not self.reason:
            self.reason = outcome.reason
        if outcome.exit_code is not None:
            self.exit_code = outcome.exit_code

    def on_vcpu_ended(self, vcpu: ManagedVcpu, outcome: Outcome) -> None:
        """A vCPU stopped or crashed by itself: the whole VM ends with it."""
        if outcome.action is Action.CRASH:
            self.shared.count_crash(outcome.reason)
        self.record_outcome(outcome)
        for other in self.vcpus():
            if other is not vcpu:
                other.request_stop(f"vcpu {vcpu.id} {outcome.reason}")

    def watch(self) -> Subscription[VmEvent]:
        return self.events.subscribe()

    def current_event(self) -> VmEvent:
        return VmEvent("state", -1, self.state, self.reason, self.exit_code, None,
                       int(time.time() * 1000))

    def exit_stats(self) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
        """Exit counters summed over the VM and per vCPU."""
        per_vcpu = {v.id: v.exit_counts() for v in self.vcpus()}
        total: dict[str, int] = {}
        for counts in per_vcpu.values():
            for name, n in counts.items():
                total[name] = total.get(name, 0) + n
        return total, per_vcpu

    def write_console(self, data: bytes) -> int:
        """Queue input for COM1, all or nothing (see Uart16550.feed). Input larger than the
        whole input buffer could never be taken: InvalidArgument, not a retryable limit."""
        if len(data) > CONSOLE_INPUT_LIMIT:
            raise InvalidArgument(f"console input of {len(data)} bytes is larger than the "
                                  f"COM1 input buffer ({CONSOLE_INPUT_LIMIT} bytes): send it "
                                  "in parts", resource=self.resource,
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="data")
        return self.uart.feed(data)

    def _on_console_ready(self) -> None:
        """The fd watcher (without a console pump): the UART's transmit ring got bytes; move
        them to the console and ask for the next signal."""
        self._console_ready.read()
        self.uart.drain()
        while self.uart.regs.arm():
            self.uart.drain()

    def _pulse_com1_irq(self) -> None:
        try:
            self.vm.set_irq_line(COM1_IRQ, True)
            self.vm.set_irq_line(COM1_IRQ, False)
        except KvmError as exc:
            log.warning("COM1 interrupt failed", extra={"vm_id": self.id, "error": str(exc)})

    # -- save and restore -----------------------------------------------------------------

    @contextmanager
    def held_paused(self, purpose: str, leave_paused: bool = False) -> Iterator[PausedHold]:
        """Hold the VM paused for `purpose` ("snapshot", "migration"): running and halted
        vCPUs are paused (in-flight IO completed), run control is refused meanwhile, and
        afterwards they run again unless the hold's `leave_paused` (set here, or by the
        holder as it learns the outcome). The hold's `run_states` are each vCPU's state
        from before, which is what a saved VcpuState records."""
        with self.lock:
            if self.closed:
                raise NotFound(f"vm {self.id} was deleted", resource=self.resource)
            self.check_not_busy()
            if purpose != "migration":  # its switch-over must find the VM free
                self.check_layout_fixed(purpose)
            self.busy = purpose
        try:
            hold = PausedHold({v.id: v.state for v in self.vcpus()}, leave_paused)
            tickets = []
            for v in self.vcpus():
                if v.state in PAUSABLE:
                    try:
                        tickets.append((v, v.request_pause()))
                    except InvalidState:
                        pass  # it parked or ended by itself
            try:
                try:
                    for v, ticket in tickets:
                        v.wait_paused(ticket)
                except BaseException:
                    # A vCPU did not park (in time): the hold fails, and the holder that
                    # never got it cannot resume what it paused, so that runs again now.
                    hold.leave_paused = False
                    raise
                yield hold
            finally:
                if not hold.leave_paused:
                    for v, _ticket in tickets:
                        try:
                            if hold.run_states.get(v.id) == HALTED:
                                v.resume_halted()
                            else:
                                v.resume()
                        except InvalidState:
                            pass  # it ended meanwhile (deleted, crashed)
        finally:
            self.busy = ""

    def save_state(self, run_states: dict[int, str] | None = None) -> VmState:
        """Everything about the VM but its memory contents. No vCPU may be in the guest
        (see held_paused); `run_states` records each vCPU's state from before the pause."""
        states = run_states or {}
        with self.lock:
            if self.closed:
                raise NotFound(f"vm {self.id} was deleted", resource=self.resource)
            # The eventfds do not travel: what they hold that the fd watcher has not taken
            # yet (guest writes to an ioevent, resamples) is counted now, not lost.
            with self._watcher.quiet():
                for ioevent in self._ioevents().values():
                    self._on_ioevent(ioevent)
                for irqfd in self._irqfds().values():
                    self._on_resample(irqfd)
            vcpus = [v.save_state(states.get(v.id)) for v in self.vcpus()]
            irqchip = pit = clock = None
            with kernel_errors(self.resource):
                if self.options.irqchip:
                    irqchip = IrqchipState(self.vm.get_irqchip(IrqChip.PIC_MASTER),
                                           self.vm.get_irqchip(IrqChip.PIC_SLAVE),
                                           self.vm.get_irqchip(IrqChip.IOAPIC))
                if self.options.pit:
                    pit = self.vm.get_pit2()
                    # A channel's load time is the host's monotonic clock: saved relative
                    # to now, rebased on the restoring host's clock (its count resumes).
                    now = time.monotonic_ns()
                    for channel in pit.channels:
                        if channel.count_load_time:
                            channel.count_load_time -= now
                if self.shared.capabilities.get("KVM_CAP_ADJUST_CLOCK"):
                    clock = self.vm.get_clock()
            return VmState(
                vm_id=self.id, labels=dict(self.labels), owner=self.owner,
                options=dataclasses.asdict(self.options), reason=self.reason,
                exit_code=self.exit_code,
                slots=self.memory_layout(), vcpus=vcpus, irqchip=irqchip, pit=pit, clock=clock,
                gsi_routes=list(self._gsi_routes) if self._gsi_routes is not None else None,
                irqfds=[IrqfdState(e.irqfd_id, e.gsi, e.resample is not None, e.triggers,
                                   e.resamples) for e in self._irqfds().values()],
                ioevents=[IoeventState(e.ioevent_id, e.space.value, e.address, e.length,
                                       e.datamatch, e.fired) for e in self._ioevents().values()],
                uart=self.uart.save_state(), console=self.console.save_state(),
                files=self.file_mapping_states(sync=True),
            )

    def memory_layout(self) -> list[SlotState]:
        """The slot table as a restore recreates it (as callers set it up)."""
        return [SlotState(r.slot, r.guest_addr, r.size, r.read_only, r.log_dirty)
                for r in self.memory_regions()]

    # -- live migration (the source's side) -----------------------------------------------
    #
    # While a VM migrates its memory layout is fixed (slots, files, logging flags: the
    # rounds sent so far describe it), it cannot be deleted, and every slot is dirty-logged
    # for the MIGRATION consumer: slots without logging get it for the migration's time,
    # hidden from callers (memory_regions) and turned off again at its end.

    migrating_to = ""  # the target's address while a migration runs (class default)
    _forced_logging: frozenset[int] = frozenset()  # slots logging only for the migration
    throttle_percent = 0

    def check_layout_fixed(self, what: str) -> None:
        """Under the lock: refuse to change the memory layout while the VM migrates."""
        if self.migrating_to:
            raise InvalidState(f"cannot {what} vm {self.id} while it migrates to "
                               f"{self.migrating_to}; cancel the migration first",
                               resource=self.resource, reason=Reason.VM_MIGRATING)

    def check_deletable(self) -> None:
        with self.lock:
            self.check_layout_fixed("delete")

    def begin_migration(self, target: str) -> None:
        """Mark the VM migrating to `target` and start tracking every slot's dirty pages
        for the MIGRATION consumer (pages the migration must send from now on)."""
        with self.lock:
            if self.closed:
                raise NotFound(f"vm {self.id} was deleted", resource=self.resource)
            if self.migrating_to:
                raise InvalidState(f"vm {self.id} is already migrating to "
                                   f"{self.migrating_to}", resource=self.resource,
                                   reason=Reason.VM_MIGRATING)
            self.check_not_busy()
            forced: set[int] = set()
            try:
                with kernel_errors(self.resource):
                    for info in self.vm.memory_regions():
                        if not info.log_dirty:
                            self.vm.set_dirty_logging(info.slot, True)
                            forced.add(info.slot)
            except BaseException:
                for slot in forced:
                    self.vm.set_dirty_logging(slot, False)
                raise
            self._forced_logging = frozenset(forced)
            self.dirty.add_consumer(MIGRATION)
            self.migrating_to = target

    def end_migration(self) -> None:
        """The migration ended (whatever its outcome): logging back as callers set it, no
        throttle, no MIGRATION consumer. Safe to call twice, and on a deleted VM."""
        self.set_throttle(0)
        with self.lock:
            forced, self._forced_logging = self._forced_logging, frozenset()
            if not self.closed:
                for slot in forced:
                    try:
                        self.vm.set_dirty_logging(slot, False)
                    except KvmError as exc:
                        log.warning("could not turn dirty logging off after a migration",
                                    extra={"vm_id": self.id, "slot": slot, "error": str(exc)})
            self.dirty.remove_consumer(MIGRATION)
            self.migrating_to = ""

    def set_throttle(self, percent: int) -> None:
        """Keep every vCPU out of the guest `percent`% of the time (0: off), as QEMU's
        auto-converge does: a guest that dirties memory faster than a migration can send it
        is slowed until the migration converges."""
        if not 0 <= percent <= 99:
            raise InvalidArgument(f"throttle {percent}% is not 0-99",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="percent")
        with self.lock:
            self.throttle_percent = percent
            throttler = self._throttler
            if percent and throttler is None and not self.closed:
                throttler = self._throttler = VcpuThrottler(self)
                throttler.start()
            elif not percent and throttler is not None:
                self._throttler = None
        if not percent and throttler is not None:
            throttler.stop()

    _throttler: VcpuThrottler | None = None

    def restore_memory_layout(self, slots: list[SlotState],
                              memfds: dict[int, int] | None = None,
                              files: list[FileMappingState] | None = None,
                              credits: dict[int, int] | None = None) -> None:
        """First step of a restore into this new VM: the slot table, each slot at its saved
        number, zeroed for the caller to fill, or (a take-over) adopting the memfd given
        for it in `memfds` {slot: fd}; then the files of the images directory the VM had
        mapped (`files`: whole slots, and over parts of slots), from this daemon's images
        directory. Within the VM's and the daemon's limits; `credits` {slot: bytes}: the
        discard credits of adopted memfds (see add_memory_region)."""
        files = files or []
        whole = {f.slot: f for f in files if f.whole_slot}
        with self.lock:
            if self._vcpus or self.vm.memory_regions():
                raise InvalidState(f"vm {self.id} is not new; restore only into a new vm",
                                   resource=self.resource, reason=Reason.VM_NOT_NEW)
            if len(slots) > self._limits.max_memory_slots_per_vm:
                raise ResourceExhausted(f"the saved vm has {len(slots)} memory slots, the "
                                        f"limit is {self._limits.max_memory_slots_per_vm}",
                                        reason=Reason.LIMIT_MEMORY_SLOTS,
                                        metadata=limit("max_memory_slots_per_vm",
                                                       self._limits.max_memory_slots_per_vm))
            for s in slots:
                f = whole.get(s.slot)
                if f is not None:
                    self.add_file_memory_region(
                        s.guest_addr, s.size, s.read_only, s.log_dirty,
                        MemoryFile(f.image, f.file_offset, not f.writable), slot=s.slot)
                    continue
                fd = (memfds or {}).get(s.slot)
                self.add_memory_region(s.guest_addr, s.size, s.read_only, s.log_dirty,
                                       slot=s.slot,
                                       backing=MemfdBacking(fd) if fd is not None else None,
                                       credit=(credits or {}).get(s.slot, 0))
            for f in files:
                if not f.whole_slot:
                    self.map_file(f.slot, f.offset, f.size,
                                  MemoryFile(f.image, f.file_offset, not f.writable))

    def restore_state(self, state: VmState) -> None:
        """Last step of a restore, once the memory is in: every vCPU in the binding's order,
        then the VM-level state KVM wants after the vCPUs (irqchip, PIT, clock), the GSI
        routes before the irqfds that may use them, ioevents, devices. vCPU threads are not
        started (see resume_run_states). On failure the caller closes the VM, which releases
        all of it."""
        with self.lock:
            if self._vcpus:
                raise InvalidState(f"vm {self.id} already has vcpus", resource=self.resource,
                                   reason=Reason.VM_NOT_NEW)
            if len(state.vcpus) > self._limits.max_vcpus_per_vm:
                raise ResourceExhausted(f"the saved vm has {len(state.vcpus)} vcpus, the "
                                        f"limit is {self._limits.max_vcpus_per_vm}",
                                        reason=Reason.LIMIT_VCPUS,
                                        metadata=limit("max_vcpus_per_vm",
                                                       self._limits.max_vcpus_per_vm))
            for vs in state.vcpus:
                self.create_vcpu(vs.vcpu_id).restore_state(vs)
            with kernel_errors(self.resource):
                if state.irqchip is not None:
                    self.vm.set_irqchip(IrqChip.PIC_MASTER, state.irqchip.pic_master)
                    self.vm.set_irqchip(IrqChip.PIC_SLAVE, state.irqchip.pic_slave)
                    self.vm.set_irqchip(IrqChip.IOAPIC, state.irqchip.ioapic)
                if state.pit is not None:
                    pit = copy.deepcopy(state.pit)
                    now = time.monotonic_ns()
                    for channel in pit.channels:
                        if channel.count_load_time:
                            channel.count_load_time += now
                    self.vm.set_pit2(pit)
                if state.clock is not None:
                    # The saved value, without KVM_CLOCK_REALTIME: guest time stands still
                    # while the VM was saved (as Firecracker); its NTP catches up.
                    self.vm.set_clock(state.clock.clock)
            if state.gsi_routes is not None:
                self.set_gsi_routing(state.gsi_routes)
            for irqfd in state.irqfds:
                entry = self.register_irqfd(irqfd.irqfd_id, irqfd.gsi, irqfd.resample)
                entry.triggers, entry.resamples = irqfd.triggers, irqfd.resamples
            for ioevent in state.ioevents:
                ev = self.register_ioevent(ioevent.ioevent_id, IoSpace(ioevent.space),
                                           ioevent.address, ioevent.length, ioevent.datamatch)
                ev.fired = ioevent.fired
            self.uart.restore_state(state.uart)
            self.console.restore_state(state.console)
            self.reason, self.exit_code = state.reason, state.exit_code

    def resume_run_states(self, state: VmState, start: bool, parked: bool = False) -> None:
        """After restore_state (and the memory): put each vCPU back in its saved run state.
        vCPUs that had been started get their thread, parked paused (`parked`: they already
        have it, from an earlier call); with `start`, every one of them then runs (and a VM
        saved before it ever started is started, as StartVm would). Created, stopped and
        crashed ones stay so otherwise."""
        started = []
        for vs in state.vcpus:
            vcpu = self.vcpu(vs.vcpu_id)
            if vs.run_state in (RUNNING, HALTED, PAUSED):
                if not parked:
                    vcpu.start_paused()
                started.append(vcpu)
            elif vs.run_state in (STOPPED, CRASHED) and not parked:
                vcpu.mark_ended(VcpuRunState(vs.run_state), vs.reason)
        if start and started:
            for vcpu in started:
                vcpu.resume()
        elif start and all(vs.run_state == CREATED for vs in state.vcpus) and state.vcpus:
            self.start()

    def resume_saved_run_states(self, state: VmState) -> bool:
        """After resume_run_states(start=False): each vCPU exactly as it was saved (a
        migration, a hand-over: the VM goes on as it was). Running ones run, halted ones
        wait for an interrupt, paused ones stay paused. True if any vCPU runs again."""
        ran = False
        for vs in state.vcpus:
            if vs.run_state == RUNNING:
                self.vcpu(vs.vcpu_id).resume()
                ran = True
            elif vs.run_state == HALTED:
                self.vcpu(vs.vcpu_id).resume_halted()
                ran = True
        return ran

    # -- exit dispatch (vCPU threads) -----------------------------------------------------

    def dispatch(self, vcpu: ManagedVcpu, exit_: VcpuExit) -> Outcome:
        """Decide what an exit means: device access, remote claim, HLT, crash."""
        if isinstance(exit_, IoExit):
            return self._port_io(vcpu, exit_)
        if isinstance(exit_, MmioExit):
            return self._mmio(vcpu, exit_)
        if isinstance(exit_, HltExit):
            return HALT
        if isinstance(exit_, ShutdownExit):
            return Outcome(Action.CRASH, "shutdown: triple fault")
        if isinstance(exit_, FailEntryExit):
            return Outcome(Action.CRASH, f"fail_entry: hardware entry failure reason "
                           f"{exit_.hardware_entry_failure_reason:#x} on cpu {exit_.cpu}")
        if isinstance(exit_, InternalErrorExit):
            return Outcome(Action.CRASH, f"internal_error: {exit_.suberror_name} "
                           f"{[hex(w) for w in exit_.data]}")
        if isinstance(exit_, SystemEventExit):
            if exit_.event == "crash":
                return Outcome(Action.CRASH, "system_event: crash")
            if exit_.event in ("shutdown", "reset"):
                return Outcome(Action.STOP, exit_.event)
            return CONTINUE
        if isinstance(exit_, KvmDebugExit):
            return Outcome(Action.PAUSE, "debug")
        if isinstance(exit_, (RdMsrExit, WrMsrExit)):
            return CONTINUE  # left failed by the binding: the guest gets #GP
        if exit_.name == "irq_window_open":
            return CONTINUE  # the vCPU thread injects its next queued interrupt
        if isinstance(exit_, DirtyRingFullExit):
            return self._ring_full(vcpu)
        return Outcome(Action.CRASH, f"unhandled exit {exit_.name}")

    def _ring_full(self, vcpu: ManagedVcpu) -> Outcome:
        """A vCPU's dirty ring filled: harvest every ring (into each consumer) and go on."""
        with kernel_errors(self.resource):
            harvested = self.dirty.harvest()
        vcpu.stuck_ring_exits = 0 if harvested else vcpu.stuck_ring_exits + 1
        if vcpu.stuck_ring_exits >= STUCK_RING_EXITS:
            return Outcome(Action.CRASH, f"dirty ring full with nothing to harvest "
                           f"{STUCK_RING_EXITS} times in a row (the kernel lost track)")
        return CONTINUE

    def _port_io(self, vcpu: ManagedVcpu, exit_: IoExit) -> Outcome:
        port, size, count = exit_.port, exit_.size, exit_.count
        device = self.bus.find(port)
        if device is self.debug_exit and exit_.is_write:
            return Outcome(Action.STOP, "debug_exit", DebugExit.code(exit_.data[:size]))
        if device is not None:
            if exit_.is_write:
                for i in range(count):
                    device.write(port, exit_.data[i * size : (i + 1) * size])
            else:
                vcpu.vcpu.complete_io_in(b"".join(device.read(port, size)
                                                  for _ in range(count)))
            return CONTINUE
        return self._claimed_or_unclaimed(vcpu, IoSpace.PIO, port, size, count, exit_.is_write,
                                          exit_.data, vcpu.vcpu.complete_io_in)

    def _mmio(self, vcpu: ManagedVcpu, exit_: MmioExit) -> Outcome:
        return self._claimed_or_unclaimed(vcpu, IoSpace.MMIO, exit_.address, exit_.length, 1,
                                          exit_.is_write, exit_.data,
                                          vcpu.vcpu.complete_mmio_read)

    def _claimed_or_unclaimed(self, vcpu: ManagedVcpu, space: IoSpace, address: int,
                              size: int, count: int, is_write: bool, data: bytes,
                              complete_read: Callable[[bytes], None]) -> Outcome:
        """An access no in-daemon device took: a remote handler's if claimed, else
        all-ones reads and dropped writes (counted), or a crash for strict-IO VMs."""
        reply = self._remote(vcpu, space, address, size, is_write, data, count)
        if reply is not None:
            if not is_write:
                complete_read(reply)
            return CONTINUE
        if self.options.strict_io:
            what = "port" if space == IoSpace.PIO else "MMIO"
            return Outcome(Action.CRASH, f"unclaimed {what} {'write' if is_write else 'read'} "
                           f"at {address:#x}")
        vcpu.vcpu.count_unclaimed(space)
        if not is_write:
            complete_read(b"\xff" * (size * count))
        return CONTINUE

    def _remote(self, vcpu: ManagedVcpu, space: IoSpace, address: int, size: int,
                is_write: bool, data: bytes, count: int = 1) -> bytes | None:
        handler = self.claims.find(space, address)
        if handler is None:
            return None
        exit_ = RemoteExit(vcpu.id, space, address, size, is_write, data, count)
        vcpu.waiting_remote = (handler, exit_)
        try:
            reply = handler.submit(exit_)
        finally:
            vcpu.waiting_remote = None
        if exit_.abandoned:
            # The vCPU is being stopped: complete the access quietly, never crash for it.
            return b"" if is_write else b"\xff" * (size * count)
        return reply

    # -- remote exit handlers -------------------------------------------------------------

    def add_handler(self, ranges: list[ClaimRange], deadline_ms: int) -> RemoteHandler:
        """Claim ranges for a remote handler: all or nothing."""
        if not ranges:
            raise InvalidArgument("a claim needs at least one range",
                                  reason=Reason.FIELD_REQUIRED, field="ranges")
        for r in ranges:
            limit = 1 << 16 if r.space == IoSpace.PIO else 1 << 52
            if r.length <= 0 or r.base + r.length > limit:
                raise InvalidArgument(f"{r.space.value} range {r.base:#x}+{r.length:#x} is "
                                      "empty or out of range",
                                      reason=Reason.VALUE_OUT_OF_RANGE, field="ranges")
        try:
            ClaimTable.check_disjoint(ranges)
        except ClaimConflict as exc:
            raise InvalidArgument(exc.reason, resource=self.resource,
                                  reason=Reason.ARGUMENTS_CONFLICT, field="ranges") from None
        handler = RemoteHandler(self.id, ranges, deadline_ms, self.shared.remote_wait.observe)
        handler.on_close = lambda: self._drop_claims(handler)
        with self.lock:
            if self.closed:
                raise NotFound(f"vm {self.id} was deleted", resource=self.resource)
            self.check_addresses_free(CLAIM, ranges)
            try:
                clash = self.claims.add(handler)
            except ClaimConflict as exc:
                raise ResourceExhausted(exc.reason, resource=self.resource,
                                        reason=Reason.LIMIT_CLAIMS) from None
            if clash is not None:
                raise AlreadyExists(f"{clash.space.value} range {clash.base:#x}+"
                                    f"{clash.length:#x} is already claimed",
                                    resource=self.resource)
            for r in ranges:
                if r.space == IoSpace.PIO:
                    self.pio_map.set_claimed(r.base, r.length, True)
        return handler

    def release_handler(self, handler: RemoteHandler, cause: HandlerClose) -> None:
        handler.close(cause)  # calls _drop_claims

    def _drop_claims(self, handler: RemoteHandler) -> None:
        with self.lock:
            for r in self.claims.remove(handler):
                if r.space == IoSpace.PIO:
                    self.pio_map.set_claimed(r.base, r.length, self.options.strict_io)

