"""ManagedVm and ManagedVcpu: a KVM VM with its rules, limits and daemon-owned eventfds."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    from_kvm_error,
)
from kvmd.core.events import Broadcaster, FdWatcher, Subscription
from kvmd.core.limits import Limits
from kvmd.kvm import (
    CpuidEntry,
    Datamatch,
    EventFd,
    Fpu,
    IoEventAddress,
    IoSpace,
    IrqRoute,
    KvmError,
    MemoryRegionInfo,
    MpState,
    Regs,
    Sregs,
    Vcpu,
    VcpuEvents,
    Vm,
)
from kvmd.kvm.memory import PAGE_SIZE, round_up_to_page

if TYPE_CHECKING:
    from kvmd.core.host import MemoryBudget

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


@contextmanager
def kernel_errors(resource: str) -> Iterator[None]:
    """Turn binding errors into domain errors naming `resource`."""
    try:
        yield
    except KvmError as exc:
        raise from_kvm_error(exc, resource) from exc


@dataclass(frozen=True)
class VmOptions:
    """How a VM is built: in-kernel irqchip and PIT, TSS and identity-map addresses."""

    irqchip: bool = False
    pit: bool = False
    tss_address: int = 0
    identity_map_address: int = 0


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


class ManagedVcpu:
    """A vCPU as the daemon sees it: the binding's Vcpu plus its lifecycle state."""

    def __init__(self, vm_id: str, vcpu: Vcpu) -> None:
        self.vm_id = vm_id
        self.vcpu = vcpu
        self.id = vcpu.id
        self.state = "created"
        self.lock = threading.RLock()

    @property
    def resource(self) -> str:
        return f"vm/{self.vm_id}/vcpu/{self.id}"

    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        with self.lock, kernel_errors(self.resource):
            return fn(*args)

    def get_regs(self) -> Regs:
        return self._call(self.vcpu.get_regs)  # type: ignore[no-any-return]

    def set_regs(self, regs: Regs) -> None:
        self._call(self.vcpu.set_regs, regs)

    def get_sregs(self) -> Sregs:
        return self._call(self.vcpu.get_sregs)  # type: ignore[no-any-return]

    def set_sregs(self, sregs: Sregs) -> None:
        self._call(self.vcpu.set_sregs, sregs)

    def get_fpu(self) -> Fpu:
        return self._call(self.vcpu.get_fpu)  # type: ignore[no-any-return]

    def set_fpu(self, fpu: Fpu) -> None:
        self._call(self.vcpu.set_fpu, fpu)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        if not entries:
            raise InvalidArgument("no CPUID entries given")
        self._call(self.vcpu.set_cpuid, entries)

    def get_cpuid(self) -> list[CpuidEntry]:
        return self._call(self.vcpu.get_cpuid)  # type: ignore[no-any-return]

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        if not indices:
            raise InvalidArgument("no MSR indices given")
        return self._call(self.vcpu.get_msrs, indices)  # type: ignore[no-any-return]

    def set_msrs(self, values: dict[int, int]) -> None:
        if not values:
            raise InvalidArgument("no MSRs given")
        self._call(self.vcpu.set_msrs, values)

    def get_mp_state(self) -> MpState:
        return self._call(self.vcpu.get_mp_state)  # type: ignore[no-any-return]

    def set_mp_state(self, state: int) -> None:
        if state not in set(MpState):
            raise InvalidArgument(f"unknown mp_state {state}")
        self._call(self.vcpu.set_mp_state, MpState(state))

    def get_lapic(self) -> bytes:
        return self._call(self.vcpu.get_lapic)  # type: ignore[no-any-return]

    def set_lapic(self, regs: bytes) -> None:
        if len(regs) != 1024:
            raise InvalidArgument(f"LAPIC state must be 1024 bytes, got {len(regs)}")
        self._call(self.vcpu.set_lapic, regs)

    def get_vcpu_events(self) -> VcpuEvents:
        return self._call(self.vcpu.get_vcpu_events)  # type: ignore[no-any-return]

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        self._call(self.vcpu.set_vcpu_events, events)


class ManagedVm:
    """A VM owned by the daemon: its kernel VM (and through it every guest memory mapping
    and vCPU fd), the eventfds it hands out by id, and watchers of those eventfds.

    All state lives here, not in the API layer, so it can later be snapshotted or handed
    over. `close()` releases everything, on every path.
    """

    def __init__(self, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
                 limits: Limits, budget: MemoryBudget, watcher: FdWatcher, owner: str) -> None:
        self.id = vm_id
        self.labels = labels
        self.options = options
        self.owner = owner
        self.created_unix_ms = int(time.time() * 1000)
        self.state = "created"
        self.vm = vm
        self._limits = limits
        self._budget = budget
        self._watcher = watcher
        self.lock = threading.RLock()
        self._vcpus: dict[int, ManagedVcpu] = {}
        self._irqfds: dict[str, IrqfdEntry] = {}
        self._ioevents: dict[str, IoeventEntry] = {}
        self.ioevent_fired: Broadcaster[Fired] = Broadcaster()
        self.irqfd_resampled: Broadcaster[Fired] = Broadcaster()
        self.closed = False

    @classmethod
    def build(cls, vm_id: str, labels: dict[str, str], options: VmOptions, vm: Vm,
              limits: Limits, budget: MemoryBudget, watcher: FdWatcher,
              owner: str) -> ManagedVm:
        """Configure the kernel VM per `options`; closes `vm` if that fails."""
        try:
            with kernel_errors(f"vm/{vm_id}"):
                if vm.check_extension("KVM_CAP_SET_TSS_ADDR"):
                    vm.set_tss_address(options.tss_address or DEFAULT_TSS_ADDRESS)
                if vm.check_extension("KVM_CAP_SET_IDENTITY_MAP_ADDR"):
                    vm.set_identity_map_address(
                        options.identity_map_address or DEFAULT_IDENTITY_MAP_ADDRESS)
                if options.irqchip:
                    vm.create_irq_chip()
                if options.pit:
                    if not options.irqchip:
                        raise InvalidArgument("the in-kernel PIT needs the in-kernel irqchip")
                    vm.create_pit2()
            return cls(vm_id, labels, options, vm, limits, budget, watcher, owner)
        except BaseException:
            vm.close()
            raise

    @property
    def resource(self) -> str:
        return f"vm/{self.id}"

    def close(self) -> None:
        """Stop watchers, release eventfds, the VM, its vCPUs and its memory."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for irqfd in self._irqfds.values():
                self._release_irqfd(irqfd)
            for ioevent in self._ioevents.values():
                self._release_ioevent(ioevent)
            self._irqfds.clear()
            self._ioevents.clear()
            self.ioevent_fired.end()
            self.irqfd_resampled.end()
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
            return info, self.vm.get_dirty_log(slot)

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
        with kernel_errors(self.resource):
            return self.vm.signal_msi(address, data, devid) > 0

    def _require_irqchip(self, what: str) -> None:
        if not self.options.irqchip:
            from kvmd.core.errors import InvalidState

            raise InvalidState(f"{what} needs a VM created with the in-kernel irqchip")

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
            managed = ManagedVcpu(self.id, vcpu)
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

