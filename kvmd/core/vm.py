"""ManagedVm: a KVM VM with its rules and limits, its devices and remote claims, the
eventfds it hands out by id, and the dispatch of its vCPUs' exits."""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmd.core.devices import (
    COM1_IRQ,
    DEFAULT_CONSOLE_BUFFER,
    DEFAULT_DEBUG_EXIT_PORT,
    Console,
    DebugExit,
    DeviceBus,
    Uart16550,
)
from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    NotFound,
    ResourceExhausted,
    from_kvm_error,
    kernel_errors,
)
from kvmd.core.events import Broadcaster, Subscription
from kvmd.core.remote import ClaimConflict, ClaimRange, ClaimTable, RemoteExit, RemoteHandler
from kvmd.core.vcpu import (
    CONTINUE,
    CRASHED,
    CREATED,
    HALT,
    PAUSABLE,
    PAUSED,
    RESUMABLE,
    STARTABLE,
    STOPPED,
    ManagedVcpu,
    Outcome,
)
from kvmd.kvm import (
    Datamatch,
    EventFd,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IoEventAddress,
    IoExit,
    IoSpace,
    IrqRoute,
    KvmError,
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
)
from kvmd.kvm import (
    DebugExit as KvmDebugExit,
)
from kvmd.kvm.memory import PAGE_SIZE, round_up_to_page

if TYPE_CHECKING:
    from kvmd.core.host import HostShared

log = logging.getLogger(__name__)
COM1_BASE_RANGE = (0x3F8, 0x400)
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
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
            "starting with a letter or digit)")
    return value


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_LEN or len(value) > MAX_LABEL_LEN:
            raise InvalidArgument(
                f"label keys must be 1-{MAX_LABEL_LEN} characters and values at most "
                f"{MAX_LABEL_LEN}")
    return dict(labels)


@dataclass(frozen=True)
class VmOptions:
    """How a VM is built: in-kernel irqchip and PIT, TSS and identity-map addresses, the
    debug-exit port, strict IO, and the console backlog size."""

    irqchip: bool = False
    pit: bool = False
    tss_address: int = 0
    identity_map_address: int = 0
    debug_exit_port: int = 0
    strict_io: bool = False
    console_buffer_bytes: int = 0


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


class ManagedVm:
    """A VM owned by the daemon: its kernel VM (and through it every guest memory mapping
    and vCPU fd), the eventfds it hands out by id, and watchers of those eventfds.

    All state lives here, not in the API layer, so it can later be snapshotted or handed
    over. `close()` releases everything, on every path.
    """

    def __init__(self, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
                 shared: HostShared, owner: str) -> None:
        self.id = vm_id
        self.labels = labels
        self.options = options
        self.owner = owner
        self.created_unix_ms = int(time.time() * 1000)
        self.vm = vm
        self.shared = shared
        self._limits = shared.limits
        self._budget = shared.budget
        self._watcher = shared.watcher
        self.dirty_pages_total = 0
        self.lock = threading.RLock()
        self._vcpus: dict[int, ManagedVcpu] = {}
        self._irqfds: dict[str, IrqfdEntry] = {}
        self._ioevents: dict[str, IoeventEntry] = {}
        self.ioevent_fired: Broadcaster[Fired] = Broadcaster()
        self.irqfd_resampled: Broadcaster[Fired] = Broadcaster()
        self.events: Broadcaster[VmEvent] = Broadcaster()
        self.closed = False
        self.reason = ""
        self.exit_code: int | None = None
        # Devices and claims: what the vCPU threads dispatch exits to.
        self.console = Console(options.console_buffer_bytes or DEFAULT_CONSOLE_BUFFER)
        self.uart = Uart16550(self.console, raise_irq=self._pulse_com1_irq
                              if options.irqchip else None)
        self.debug_exit = DebugExit(options.debug_exit_port or DEFAULT_DEBUG_EXIT_PORT)
        self.bus = DeviceBus()
        self.bus.add(self.uart)
        self.bus.add(self.debug_exit)
        self.claims = ClaimTable()
        # Ports completed in C without Python: all but devices and claims (none if strict).
        self.pio_map = PioMap(unclaimed=not options.strict_io)
        for device in self.bus:
            self.pio_map.set_claimed(device.base, device.length, True)

    @classmethod
    def build(cls, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
              shared: HostShared, owner: str) -> ManagedVm:
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
                        raise InvalidArgument("the in-kernel PIT needs the in-kernel irqchip")
                    vm.create_pit2()
            if options.debug_exit_port and not 0 < options.debug_exit_port < 1 << 16:
                raise InvalidArgument(f"debug_exit_port {options.debug_exit_port:#x} is not "
                                      "a port")
            if options.debug_exit_port and COM1_BASE_RANGE[0] <= options.debug_exit_port < \
                    COM1_BASE_RANGE[1]:
                raise InvalidArgument("debug_exit_port collides with the COM1 UART")
            return cls(vm_id, labels, options, vm, shared, owner)
        except BaseException:
            vm.close()
            raise

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
        for handler in self.claims.handlers():
            self.release_handler(handler, "vm deleted")
        for mvcpu in vcpus:
            mvcpu.request_stop("vm deleted")
        for mvcpu in vcpus:
            try:
                mvcpu.join()
            except Exception:  # closing the fd below kicks it again and waits
                pass
        with self.lock:
            for irqfd in self._irqfds.values():
                self._release_irqfd(irqfd)
            for ioevent in self._ioevents.values():
                self._release_ioevent(ioevent)
            self._irqfds.clear()
            self._ioevents.clear()
            self.ioevent_fired.end()
            self.irqfd_resampled.end()
            self.events.end()
            self.console.end()
            memory = self.vm.memory_size
            self.vm.close()
            self._vcpus.clear()
            self._budget.release(memory)

    # -- memory ---------------------------------------------------------------------------

    def add_memory_region(self, guest_addr: int, size: int, read_only: bool,
                          log_dirty: bool) -> MemoryRegionInfo:
        if size <= 0:
            raise InvalidArgument("memory region size must be positive")
        if guest_addr % PAGE_SIZE:
            raise InvalidArgument(f"guest address {guest_addr:#x} is not page aligned "
                                  f"({PAGE_SIZE} bytes)")
        rounded = round_up_to_page(size)
        with self.lock:
            regions = self.vm.memory_regions()
            if len(regions) >= self._limits.max_memory_slots_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {len(regions)} memory slots, the limit is "
                    f"{self._limits.max_memory_slots_per_vm}")
            in_use = sum(r.size for r in regions)
            if in_use + rounded > self._limits.max_memory_per_vm_bytes:
                raise ResourceExhausted(
                    f"vm {self.id} would have {in_use + rounded} bytes of guest memory, the "
                    f"limit is {self._limits.max_memory_per_vm_bytes}")
            self._budget.reserve(rounded)
            try:
                with kernel_errors(self.resource):
                    slot = self.vm.add_memory_region(guest_addr, rounded, read_only, log_dirty)
                    return self.vm.memory_region(slot)
            except BaseException:
                self._budget.release(rounded)
                raise

    def remove_memory_region(self, slot: int) -> MemoryRegionInfo:
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            info = self.vm.remove_memory_region(slot)
        self._budget.release(info.size)
        return info

    def memory_regions(self) -> list[MemoryRegionInfo]:
        return self.vm.memory_regions()

    def write_memory(self, guest_addr: int, data: bytes | memoryview) -> None:
        with kernel_errors(self.resource):
            self.vm.write(guest_addr, data)

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
                        f"{guest_addr:#x}+{length:#x} is not entirely backed by guest memory")

    def get_dirty_log(self, slot: int) -> tuple[MemoryRegionInfo, bytes]:
        with self.lock, kernel_errors(f"{self.resource}/slot/{slot}"):
            info = self.vm.memory_region(slot)
            bitmap = self.vm.get_dirty_log(slot)
            self.dirty_pages_total += int.from_bytes(bitmap, "little").bit_count()
            return info, bitmap

    # -- interrupts -----------------------------------------------------------------------

    def set_irq_line(self, irq: int, active: bool) -> None:
        self._require_irqchip("SetIrqLine")
        with kernel_errors(self.resource):
            self.vm.set_irq_line(irq, active)

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        self._require_irqchip("SetGsiRouting")
        with kernel_errors(self.resource):
            self.vm.set_gsi_routing(routes)

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
                               resource=self.resource)

    def register_irqfd(self, irqfd_id: str, gsi: int, resample: bool) -> IrqfdEntry:
        validate_id("irqfd id", irqfd_id)
        self._require_irqchip("RegisterIrqfd")
        with self.lock:
            if irqfd_id in self._irqfds:
                raise AlreadyExists(f"irqfd {irqfd_id!r} already exists in vm {self.id}")
            if len(self._irqfds) >= self._limits.max_irqfds_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {self._limits.max_irqfds_per_vm} irqfds, the limit")
            if resample and any(e.gsi == gsi and e.resample for e in self._irqfds.values()):
                raise AlreadyExists(f"gsi {gsi} already has a resample irqfd")
            event = EventFd()
            resample_fd = EventFd() if resample else None
            entry = IrqfdEntry(irqfd_id, gsi, event, resample_fd)
            try:
                with kernel_errors(f"{self.resource}/irqfd/{irqfd_id}"):
                    self.vm.register_irqfd(gsi, event, resample_fd)
            except BaseException:
                event.close()
                if resample_fd is not None:
                    resample_fd.close()
                raise
            if resample_fd is not None:
                self._watcher.add(resample_fd.fileno(), lambda: self._on_resample(entry))
            self._irqfds[irqfd_id] = entry
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
            del self._irqfds[irqfd_id]
            self._release_irqfd(entry)

    def _release_irqfd(self, entry: IrqfdEntry) -> None:
        if entry.resample is not None:
            self._watcher.remove(entry.resample.fileno())
            entry.resample.close()
        entry.event.close()

    def irqfds(self) -> list[IrqfdEntry]:
        with self.lock:
            return list(self._irqfds.values())

    def _irqfd(self, irqfd_id: str) -> IrqfdEntry:
        validate_id("irqfd id", irqfd_id)
        entry = self._irqfds.get(irqfd_id)
        if entry is None:
            raise NotFound(f"no irqfd {irqfd_id!r} in vm {self.id}")
        return entry

    # -- ioevents -------------------------------------------------------------------------

    def register_ioevent(self, ioevent_id: str, space: IoSpace, address: int, length: int,
                         datamatch: int | None) -> IoeventEntry:
        validate_id("ioevent id", ioevent_id)
        if length not in (0, 1, 2, 4, 8):
            raise InvalidArgument(f"ioevent length {length} is not 0 (any), 1, 2, 4 or 8")
        if datamatch is not None and length == 0:
            raise InvalidArgument("a datamatch needs a length of 1, 2, 4 or 8")
        if datamatch is not None and datamatch >= 1 << (8 * length):
            raise InvalidArgument(f"datamatch {datamatch:#x} does not fit {length} bytes")
        with self.lock:
            if ioevent_id in self._ioevents:
                raise AlreadyExists(f"ioevent {ioevent_id!r} already exists in vm {self.id}")
            if len(self._ioevents) >= self._limits.max_ioevents_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {self._limits.max_ioevents_per_vm} ioevents, the limit")
            event = EventFd()
            entry = IoeventEntry(ioevent_id, space, address, length, datamatch, event)
            try:
                with kernel_errors(f"{self.resource}/ioevent/{ioevent_id}"):
                    self.vm.register_ioevent(event, entry.kvm_address, entry.kvm_datamatch)
            except BaseException:
                event.close()
                raise
            self._watcher.add(event.fileno(), lambda: self._on_ioevent(entry))
            self._ioevents[ioevent_id] = entry
            return entry

    def _on_ioevent(self, entry: IoeventEntry) -> None:
        count = entry.event.read()
        if count:
            entry.fired += count
            self.ioevent_fired.publish(Fired(entry.ioevent_id, count))

    def unregister_ioevent(self, ioevent_id: str) -> None:
        validate_id("ioevent id", ioevent_id)
        with self.lock:
            entry = self._ioevents.get(ioevent_id)
            if entry is None:
                raise NotFound(f"no ioevent {ioevent_id!r} in vm {self.id}")
            with kernel_errors(f"{self.resource}/ioevent/{ioevent_id}"):
                self.vm.unregister_ioevent(entry.event, entry.kvm_address, entry.kvm_datamatch)
            del self._ioevents[ioevent_id]
            self._release_ioevent(entry)

    def _release_ioevent(self, entry: IoeventEntry) -> None:
        self._watcher.remove(entry.event.fileno())
        entry.event.close()

    def ioevents(self) -> list[IoeventEntry]:
        with self.lock:
            return list(self._ioevents.values())

    def watch_ioevents(self) -> Subscription[Fired]:
        return self.ioevent_fired.subscribe()

    def watch_resamples(self) -> Subscription[Fired]:
        return self.irqfd_resampled.subscribe()

    # -- vCPUs ----------------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> ManagedVcpu:
        with self.lock:
            if vcpu_id in self._vcpus:
                raise AlreadyExists(f"vcpu {vcpu_id} already exists in vm {self.id}")
            if len(self._vcpus) >= self._limits.max_vcpus_per_vm:
                raise ResourceExhausted(
                    f"vm {self.id} has {len(self._vcpus)} vcpus, the limit is "
                    f"{self._limits.max_vcpus_per_vm}")
            with kernel_errors(f"{self.resource}/vcpu/{vcpu_id}"):
                vcpu = self.vm.create_vcpu(vcpu_id)
            managed = ManagedVcpu(self, vcpu)
            self._vcpus[vcpu_id] = managed
            return managed

    def vcpu(self, vcpu_id: int) -> ManagedVcpu:
        with self.lock:
            managed = self._vcpus.get(vcpu_id)
            if managed is None:
                raise NotFound(f"no vcpu {vcpu_id} in vm {self.id}")
            return managed

    def vcpus(self) -> list[ManagedVcpu]:
        with self.lock:
            return [self._vcpus[k] for k in sorted(self._vcpus)]

    # -- run control ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """created, running, paused, stopped or crashed, from the vCPU states."""
        states = {v.state for v in self.vcpus()}
        if not states:
            return CREATED
        if CRASHED in states:
            return CRASHED
        if states & {"running", "halted"}:
            return "running"
        if PAUSED in states:
            return PAUSED
        if states == {CREATED}:
            return CREATED
        return STOPPED

    def start(self) -> None:
        """Start every vCPU. A stopped or crashed VM starts again from its registers as
        they are (an operator resets a crashed guest by setting them first)."""
        vcpus = self.vcpus()
        if not vcpus:
            raise InvalidState(f"vm {self.id} has no vcpus to start", resource=self.resource)
        bad = [v for v in vcpus if v.state not in STARTABLE]
        if bad:
            raise InvalidState(f"vm {self.id} is {self.state} (vcpu {bad[0].id} is "
                               f"{bad[0].state}); stop it before starting it again",
                               resource=self.resource)
        self.reason, self.exit_code = "", None
        for v in vcpus:
            v.start()

    def pause(self) -> None:
        """Kick every running or halted vCPU at once, then wait for each to park."""
        vcpus = [v for v in self.vcpus() if v.state in PAUSABLE]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is {self.state}; only a running vm can be "
                               "paused", resource=self.resource)
        tickets = []
        for v in vcpus:
            try:
                tickets.append((v, v.request_pause()))
            except InvalidState:
                pass  # it parked or ended by itself meanwhile: nothing to wait for
        for v, ticket in tickets:
            v.wait_paused(ticket)

    def resume(self) -> None:
        """Resume every paused or halted vCPU, and cancel pauses still in flight."""
        vcpus = [v for v in self.vcpus() if v.state in RESUMABLE or v.pause_pending]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is {self.state}; only a paused vm can be "
                               "resumed", resource=self.resource)
        for v in vcpus:
            try:
                v.resume()
            except InvalidState:
                pass  # it ended, or another resume got there first

    def stop(self) -> None:
        """Stop every vCPU thread; a crashed VM becomes stopped (its crash reason kept)."""
        vcpus = [v for v in self.vcpus() if v.state != STOPPED]
        if not vcpus:
            raise InvalidState(f"vm {self.id} is already {self.state}", resource=self.resource)
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

    def on_vcpu_event(self, vcpu: ManagedVcpu, event: str, reason: str,
                      exit_code: int | None) -> None:
        """Called by a vCPU (under its lock) on every state change: publish it."""
        regs = vcpu.crash_regs if event == "crashed" else None
        self.events.publish(VmEvent(event, vcpu.id, self.state, reason, exit_code, regs,
                                    int(time.time() * 1000)))

    def on_vcpu_ended(self, vcpu: ManagedVcpu, outcome: Outcome) -> None:
        """A vCPU stopped or crashed by itself: the whole VM ends with it."""
        if outcome.action == "crash":
            self.shared.count_crash(outcome.reason)
        if not self.reason:
            self.reason = outcome.reason
        if outcome.exit_code is not None:
            self.exit_code = outcome.exit_code
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
        return self.uart.feed(data)

    def _pulse_com1_irq(self) -> None:
        try:
            self.vm.set_irq_line(COM1_IRQ, True)
            self.vm.set_irq_line(COM1_IRQ, False)
        except KvmError as exc:
            log.warning("COM1 interrupt failed", extra={"vm_id": self.id, "error": str(exc)})

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
            return Outcome("crash", "shutdown: triple fault")
        if isinstance(exit_, FailEntryExit):
            return Outcome("crash", f"fail_entry: hardware entry failure reason "
                           f"{exit_.hardware_entry_failure_reason:#x} on cpu {exit_.cpu}")
        if isinstance(exit_, InternalErrorExit):
            return Outcome("crash", f"internal_error: {exit_.suberror_name} "
                           f"{[hex(w) for w in exit_.data]}")
        if isinstance(exit_, SystemEventExit):
            if exit_.event == "crash":
                return Outcome("crash", "system_event: crash")
            if exit_.event in ("shutdown", "reset"):
                return Outcome("stop", exit_.event)
            return CONTINUE
        if isinstance(exit_, KvmDebugExit):
            return Outcome("pause", "debug")
        if isinstance(exit_, (RdMsrExit, WrMsrExit)):
            return CONTINUE  # left failed by the binding: the guest gets #GP
        if exit_.name == "irq_window_open":
            return CONTINUE  # the vCPU thread injects its next queued interrupt
        return Outcome("crash", f"unhandled exit {exit_.name}")

    def _port_io(self, vcpu: ManagedVcpu, exit_: IoExit) -> Outcome:
        port, size, count = exit_.port, exit_.size, exit_.count
        device = self.bus.find(port)
        if device is self.debug_exit and exit_.is_write:
            return Outcome("stop", "debug_exit", DebugExit.code(exit_.data[:size]))
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
            return Outcome("crash", f"unclaimed {what} {'write' if is_write else 'read'} "
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
            raise InvalidArgument("a claim needs at least one range")
        for r in ranges:
            limit = 1 << 16 if r.space == IoSpace.PIO else 1 << 52
            if r.length <= 0 or r.base + r.length > limit:
                raise InvalidArgument(f"{r.space.value} range {r.base:#x}+{r.length:#x} is "
                                      "empty or out of range")
            if r.space == IoSpace.PIO:
                device = self.bus.overlapping(r.base, r.length)
                if device is not None:
                    raise AlreadyExists(f"ports {r.base:#x}+{r.length:#x} overlap the "
                                        f"in-daemon {device.name}", resource=self.resource)
        try:
            ClaimTable.check_disjoint(ranges)
        except ClaimConflict as exc:
            raise InvalidArgument(exc.reason, resource=self.resource) from None
        handler = RemoteHandler(self.id, ranges, deadline_ms, self.shared.remote_wait.observe)
        handler.on_close = lambda: self._drop_claims(handler)
        with self.lock:
            if self.closed:
                raise NotFound(f"vm {self.id} was deleted", resource=self.resource)
            try:
                clash = self.claims.add(handler)
            except ClaimConflict as exc:
                raise ResourceExhausted(exc.reason, resource=self.resource) from None
            if clash is not None:
                raise AlreadyExists(f"{clash.space.value} range {clash.base:#x}+"
                                    f"{clash.length:#x} is already claimed",
                                    resource=self.resource)
            for r in ranges:
                if r.space == IoSpace.PIO:
                    self.pio_map.set_claimed(r.base, r.length, True)
        return handler

    def release_handler(self, handler: RemoteHandler, reason: str) -> None:
        handler.close(reason)  # calls _drop_claims

    def _drop_claims(self, handler: RemoteHandler) -> None:
        with self.lock:
            for r in self.claims.remove(handler):
                if r.space == IoSpace.PIO:
                    self.pio_map.set_claimed(r.base, r.length, self.options.strict_io)

