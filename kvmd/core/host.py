"""Host: the daemon's VM registry over one /dev/kvm, with its limits."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from kvmd import __version__
from kvmd.core.cpuid import with_apic_id
from kvmd.core.devices import ConsolePump
from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    kernel_errors,
    limit,
)
from kvmd.core.events import FdWatcher
from kvmd.core.fds import (
    FDS_PER_VM,
    FdBudget,
    derived_max_fds,
    fds_per_vm,
    nofile_limit,
    open_fds,
)
from kvmd.core.histogram import Histogram
from kvmd.core.images import ImagesDir
from kvmd.core.limits import Limits
from kvmd.core.sched import api_cpus, daemon_cpus
from kvmd.core.shared import HostShared, MemoryBudget
from kvmd.core.vm import ManagedVm, VmOptions, validate_id, validate_labels
from kvmd.kvm import CpuidEntry, DirtyLogModes, Kvm, capability_number
from kvmd.kvm.memory import PAGE_SIZE

log = logging.getLogger(__name__)

# Bytes of an answer about one VM besides its labels (id, state, options, counters, ...)
# and per vCPU (its state in Vm.vcpu_states): what check_labels_fit keeps free.
VM_ANSWER_OVERHEAD = 2048
VCPU_STATE_BYTES = 16


def missing_vm(vm_id: str) -> NotFound:
    """What asking for a VM that does not exist answers (and, word for word, a VM the caller
    may not see: the API's authorization uses this too)."""
    return NotFound(f"no vm {vm_id!r}", resource=f"vm/{vm_id}")


class Host:
    """Owns /dev/kvm and every VM created through the daemon."""

    def __init__(self, limits: Limits | None = None, kvm_path: str = "/dev/kvm",
                 images_dir: str | None = None, vcpu_nice: int = 0,
                 vcpu_policy: str = "other",
                 vcpu_cpus: frozenset[int] | None = None) -> None:
        self.limits = limits or Limits()
        with kernel_errors("host"):
            self.kvm = Kvm(kvm_path)
        self.version = __version__
        self.budget = MemoryBudget(self.limits.max_memory_total_bytes)
        self.watcher = FdWatcher()
        self._vms: dict[str, ManagedVm] = {}
        self._creating: dict[str, str] = {}  # vm id -> owner, while being created
        self._lock = threading.Lock()
        # What the kernel offers does not change while the daemon runs: asked once.
        self._capabilities: dict[str, int] | None = None
        self._dirty_log_modes: DirtyLogModes | None = None
        # Time vCPUs waited for remote exit handlers, across VMs (exported as a histogram).
        self.remote_wait = Histogram()
        with kernel_errors("host"):
            msr_index_list = self.kvm.get_msr_index_list()
        self.fds = self._fd_budget()
        if vcpu_cpus is None and api_cpus() != daemon_cpus():
            # The API's threads were confined (api_cpus) and vCPU threads, which inherit
            # that, take back every CPU the daemon may use.
            vcpu_cpus = daemon_cpus()
        self.shared = HostShared(self.limits, self.budget, self.watcher, self.remote_wait,
                                 self.capabilities(), msr_index_list,
                                 images=ImagesDir(images_dir) if images_dir else None,
                                 fds=self.fds, vcpu_nice=vcpu_nice,
                                 vcpu_policy=vcpu_policy, vcpu_cpus=vcpu_cpus,
                                 console_pump=ConsolePump())
        self.crashes = self.shared.crashes

    def vcpu_cpus(self) -> frozenset[int]:
        """The CPUs vCPU threads run on: vcpu_cpus, else every CPU the daemon may use."""
        return self.shared.vcpu_cpus or daemon_cpus()

    @staticmethod
    def api_cpus() -> frozenset[int]:
        """The CPUs the daemon's other threads run on: api_cpus, else every CPU it may
        use."""
        return api_cpus()

    def _fd_budget(self) -> FdBudget:
        """The descriptor budget of VM objects: max_fds, never more than RLIMIT_NOFILE
        leaves now (less what is open and the daemon's reserve), so the daemon refuses
        before the kernel would (self.limits then shows what applies)."""
        nofile, already = nofile_limit(), open_fds()
        capacity = derived_max_fds(nofile, already)
        lim = self.limits
        if lim.max_fds > capacity:
            log.warning("max_fds is more than RLIMIT_NOFILE allows: using what it allows",
                        extra={"max_fds": lim.max_fds, "allowed": capacity, "nofile": nofile,
                               "open": already})
        total = min(lim.max_fds, capacity)
        self.limits = lim = replace(lim, max_fds=total,
                                    max_fds_per_identity=min(lim.max_fds_per_identity, total))
        per_vm = fds_per_vm(lim)
        if lim.max_vms * per_vm > total:
            log.info("at the per-VM limits not every VM fits the descriptor budget: objects "
                     "beyond it are refused (RESOURCE_EXHAUSTED)", extra={
                         "max_fds": total, "fds_per_vm_at_limits": per_vm,
                         "vms_at_limits": total // per_vm, "max_vms": lim.max_vms})
        return FdBudget(total, lim.max_fds_per_identity)

    # -- hypervisor -----------------------------------------------------------------------

    def capabilities(self) -> dict[str, int]:
        if self._capabilities is None:
            with kernel_errors("host"):
                self._capabilities = self.kvm.capabilities()
        return self._capabilities

    def check_extension(self, cap: int | str, vm: str | ManagedVm = "") -> tuple[int, int]:
        """(value, capability number), asked on /dev/kvm or on the VM's fd (a VM or its
        id)."""
        with kernel_errors("host"):
            number = capability_number(cap)
            if vm:
                managed = self.get_vm(vm) if isinstance(vm, str) else vm
                return managed.vm.check_extension(number), number
            return self.kvm.check_extension(number), number

    def dirty_log_modes(self) -> DirtyLogModes:
        if self._dirty_log_modes is None:
            with kernel_errors("host"):
                self._dirty_log_modes = self.kvm.dirty_log_modes()
        return self._dirty_log_modes

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID as a template: APIC ID 0, whichever host CPU asked
        (kvmd.core.cpuid)."""
        with kernel_errors("host"):
            return with_apic_id(self.kvm.get_supported_cpuid(), 0)

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    # -- VMs ------------------------------------------------------------------------------

    def create_vm(self, vm_id: str, labels: dict[str, str], options: VmOptions,
                  owner: str = "local", owner_quota: int = 0) -> ManagedVm:
        """Create and register a VM. `owner_quota` (0 = none) caps how many VMs `owner` may
        hold, counted atomically with creations in flight."""
        labels = validate_labels(labels)
        if options.pit and not options.irqchip:
            raise InvalidArgument("the in-kernel PIT needs the in-kernel irqchip",
                                  reason=Reason.ARGUMENTS_CONFLICT, field="options.pit")
        self.reserve_id(vm_id, owner, owner_quota)
        try:
            managed = self.build_vm(vm_id, labels, options, owner)
            self.register(managed)
        finally:
            self.release_id(vm_id)
        return managed

    def check_labels_fit(self, labels: dict[str, str]) -> None:
        """Every answer about one VM (its labels, state, options, vCPU states) must fit in
        one message of max_message_bytes, or the VM could be made but never described:
        refuse labels that leave too little room (INVALID_ARGUMENT)."""
        size = sum(len(k.encode()) + len(v.encode()) + 8 for k, v in labels.items())
        room = self.limits.max_message_bytes - VM_ANSWER_OVERHEAD \
            - VCPU_STATE_BYTES * self.limits.max_vcpus_per_vm
        if size > room:
            raise InvalidArgument(f"the labels take {size} bytes; with max_message_bytes "
                                  f"{self.limits.max_message_bytes} at most {max(room, 0)} "
                                  "fit in an answer about the VM",
                                  reason=Reason.VALUE_OUT_OF_RANGE, field="labels")

    def reserve_id(self, vm_id: str, owner: str, owner_quota: int = 0) -> None:
        """Hold `vm_id` (and a place in `owner`'s quota) for a VM being made: creation or a
        restore that streams in. Pair with release_id, whatever happens."""
        validate_id("vm id", vm_id)
        with self._lock:
            if vm_id in self._vms or vm_id in self._creating:
                raise AlreadyExists(f"vm {vm_id!r} already exists", resource=f"vm/{vm_id}")
            if len(self._vms) + len(self._creating) >= self.limits.max_vms:
                raise ResourceExhausted(f"the daemon already has {self.limits.max_vms} VMs, "
                                        "the limit",
                                        reason=Reason.LIMIT_VMS,
                                        metadata=limit("max_vms", self.limits.max_vms))
            if owner_quota:
                owned = sum(1 for v in self._vms.values() if v.owner == owner) + sum(
                    1 for o in self._creating.values() if o == owner)
                if owned >= owner_quota:
                    raise ResourceExhausted(f"{owner!r} already holds {owned} VMs, its quota",
                                            reason=Reason.LIMIT_VMS,
                                            metadata=limit("vm_quota", owner_quota))
            self._creating[vm_id] = owner

    def release_id(self, vm_id: str) -> None:
        with self._lock:
            self._creating.pop(vm_id, None)

    def build_vm(self, vm_id: str, labels: dict[str, str], options: VmOptions,
                 owner: str) -> ManagedVm:
        """A configured VM, not yet visible (the caller registers or closes it). Kernel work
        happens outside the registry lock: other VMs stay responsive."""
        self.check_labels_fit(labels)
        account = self.fds.account(owner)
        account.take(FDS_PER_VM, "a vm")  # before the kernel is asked
        try:
            with kernel_errors(f"vm/{vm_id}"):
                vm = self.kvm.create_vm()
            return ManagedVm.build(vm_id, labels, options, vm, self.shared, owner, account)
        except BaseException:
            account.close()
            raise

    def register(self, vm: ManagedVm) -> None:
        """Make a built VM visible under its (reserved) id."""
        with self._lock:
            self._vms[vm.id] = vm
        log.info("vm created", extra={"vm_id": vm.id})

    def get_vm(self, vm_id: str) -> ManagedVm:
        validate_id("vm id", vm_id)
        with self._lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            raise missing_vm(vm_id)
        return vm

    def owner_of(self, vm_id: str) -> str | None:
        """Who owns `vm_id`: a VM's owner, or who reserved the id for a VM being made (a
        creation, a restore, an incoming migration); None when nobody has it."""
        with self._lock:
            vm = self._vms.get(vm_id)
            return vm.owner if vm is not None else self._creating.get(vm_id)

    def list_vms(self, selector: dict[str, str] | None = None) -> list[ManagedVm]:
        with self._lock:
            vms = sorted(self._vms.values(), key=lambda v: v.id)
        if selector:
            vms = [v for v in vms if all(v.labels.get(k) == val for k, val in selector.items())]
        return vms

    def delete_vm(self, vm_id: str, expected: ManagedVm | None = None) -> None:
        """Delete a VM (not one that is migrating: cancel that first); with `expected`,
        only if that is still this very object (NotFound otherwise: it was deleted, and
        maybe re-created, meanwhile)."""
        validate_id("vm id", vm_id)
        with self._lock:
            vm = self._vms.get(vm_id)
            if vm is None or (expected is not None and vm is not expected):
                raise missing_vm(vm_id)
            vm.check_deletable()
            del self._vms[vm_id]
        vm.close()
        log.info("vm deleted", extra={"vm_id": vm_id})

    def forget_migrated(self, vm: ManagedVm) -> None:
        """A VM that now runs on another daemon: gone from this one's registry (its id is
        free, no call finds it). Its memory and descriptors go with `release_migrated`."""
        with self._lock:
            if self._vms.get(vm.id) is vm:
                del self._vms[vm.id]
        log.info("vm migrated away", extra={"vm_id": vm.id})

    def release_migrated(self, vm: ManagedVm) -> None:
        """Free what a VM forgotten by `forget_migrated` still holds."""
        vm.close()

    def vm_count(self) -> int:
        with self._lock:
            return len(self._vms)

    def close(self) -> None:
        """Delete every VM, stop the fd watcher, close /dev/kvm."""
        with self._lock:
            vms, self._vms = list(self._vms.values()), {}
        for vm in vms:
            vm.close()
        if self.shared.console_pump is not None:
            self.shared.console_pump.close()
        self.watcher.close()
        self.kvm.close()
