"""What every VM of a host shares (HostShared) and the daemon-wide guest-memory budget.

Its own module, below both `host` (which makes one) and `vm` (which is handed one), so
neither imports the other to name it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmd.core.devices import ConsolePump
from kvmd.core.errors import Reason, ResourceExhausted, limit
from kvmd.core.events import FdWatcher
from kvmd.core.fds import UNLIMITED, FdBudget
from kvmd.core.histogram import Histogram
from kvmd.core.images import ImagesDir
from kvmd.core.limits import Limits
from kvmd.core.stats import MigrationStats, OperationStats


class Charge:
    """One memory slot's claim on the budget: its whole `size`, less a `credit` for memory a
    discard gave back that the slot's memfd still does not hold.

    `allocated` reads what the slot's own memfd holds now (st_blocks: one fstat, no lock);
    None until the slot exists, and for memory that cannot be discarded (file-backed
    slots). Changed only under the budget's lock.
    """

    __slots__ = ("allocated", "credit", "size")

    def __init__(self, size: int, credit: int = 0,
                 allocated: Callable[[], int] | None = None) -> None:
        self.size = size
        self.credit = credit
        self.allocated = allocated

    def recompute(self) -> None:
        """Shrink the credit to what the kernel says is still not allocated: a guest that
        touched discarded pages again (deflate) is charged for them again, and a credit
        never grows back by itself (only a discard adds to it)."""
        if self.credit and self.allocated is not None:
            self.credit = max(0, min(self.credit, self.size - self.allocated()))

    @property
    def charged(self) -> int:
        return self.size - self.credit


class MemoryBudget:
    """Guest memory charged across all VMs, against the daemon-wide limit.

    Each slot holds a Charge of its whole size from AddMemoryRegion (or a restore, an
    incoming migration, a take-over) until it is removed or its VM deleted, less the bytes a
    DiscardGuestMemory released from its memfd, for as long as the memfd still does not
    hold them (the credit, see Charge.recompute). So the charge never falls below what the
    host pays now (a slot's allocated bytes), and a balloon inflated in one guest makes room
    for other slots: the overcommit orchestrators reclaim idle guests' memory for.

    The daemon cannot refuse a page fault: a guest touching its discarded range again is
    charged again at the next recompute, and the total can then exceed the limit (by at
    most `credited`, the overcommit admissions relied on). The host reserve below the limit
    and the unit's MemoryMax=/OOMScoreAdjust= are the safety net (README, "Budget policy").
    Credits are recomputed under the lock at every admission and every report (GetInfo,
    metrics): one fstat per slot holding a credit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._charges: set[Charge] = set()
        self._reserved = 0  # the sizes of every charge
        self._lock = threading.Lock()

    def _credited(self) -> int:
        """Recompute every credit (under the lock); their sum."""
        total = 0
        for charge in self._charges:
            if charge.credit:
                charge.recompute()
                total += charge.credit
        return total

    @property
    def in_use(self) -> int:
        """Guest memory charged now: every slot's size less the credits still standing."""
        with self._lock:
            return self._reserved - self._credited()

    @property
    def credited(self) -> int:
        """Bytes of discarded memory not charged now: how far a guest re-touching its
        discarded memory could take the total past what it is now."""
        with self._lock:
            return self._credited()

    def reserve(self, size: int, credit: int = 0,
                allocated: Callable[[], int] | None = None) -> Charge:
        """Admit a slot of `size` bytes (ResourceExhausted over the limit). `credit` and
        `allocated`: a slot adopted with memory discarded before (a take-over), credited up
        to what `allocated` says its memfd does not hold."""
        charge = Charge(size, credit, allocated if credit else None)
        charge.recompute()
        with self._lock:
            in_use = self._reserved - self._credited()
            if in_use + charge.charged > self.limit:
                raise ResourceExhausted(
                    f"the daemon would hold {in_use + charge.charged} bytes of guest memory, "
                    f"the limit is {self.limit}",
                    reason=Reason.LIMIT_GUEST_MEMORY,
                    metadata=limit("max_memory_total_bytes", self.limit))
            self._charges.add(charge)
            self._reserved += size
        return charge

    def track(self, charge: Charge, allocated: Callable[[], int]) -> None:
        """The slot of `charge` exists: read its memfd with `allocated` from now on."""
        with self._lock:
            charge.allocated = allocated
            charge.recompute()

    def credit(self, charge: Charge, released: int, allocated_before: int) -> None:
        """A discard released `released` bytes from the slot's memfd, which held
        `allocated_before` bytes just before: credit them, never beyond what the memfd
        does not hold now. The credit is first shrunk to what it was worth before the
        discard, so pages the guest touched again earlier are not credited twice."""
        if charge.allocated is None or released <= 0:
            return
        with self._lock:
            if charge not in self._charges:  # the slot went meanwhile
                return
            charge.credit = max(0, min(charge.credit, charge.size - allocated_before))
            charge.credit += released
            charge.recompute()

    def current_credit(self, charge: Charge) -> int:
        """The credit of one charge, recomputed now."""
        with self._lock:
            charge.recompute()
            return charge.credit

    def release(self, charge: Charge) -> None:
        """The slot is gone: its charge and its credit with it."""
        with self._lock:
            if charge in self._charges:
                self._charges.remove(charge)
                self._reserved -= charge.size


@dataclass
class HostShared:
    """What every VM of a host shares: limits, the memory budget, the eventfd watcher,
    the remote-wait histogram and the crash counters (which outlive deleted VMs)."""

    limits: Limits
    budget: MemoryBudget
    watcher: FdWatcher
    remote_wait: Histogram
    capabilities: dict[str, int]  # of /dev/kvm, read once
    msr_index_list: list[int]  # KVM_GET_MSR_INDEX_LIST, read once: the MSRs to save
    operations: OperationStats = field(default_factory=OperationStats)
    migration: MigrationStats = field(default_factory=MigrationStats)
    crashes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Where file-backed guest memory comes from (None: file-backed memory is off).
    images: ImagesDir | None = None
    # The file descriptors VM objects hold, against RLIMIT_NOFILE (kvmd.core.fds).
    fds: FdBudget = field(default_factory=lambda: FdBudget(UNLIMITED, UNLIMITED))
    # The nice value vCPU threads give themselves (0: none), see ManagedVcpu.
    vcpu_nice: int = 0
    vcpu_policy: str = "other"  # see kvmd.core.sched.POLICIES
    vcpu_cpus: frozenset[int] | None = None  # where vCPU threads run (None: anywhere)
    # Moves UART output into consoles (None: the fd watcher drains at every signal).
    console_pump: ConsolePump | None = None

    def count_crash(self, reason: str) -> None:
        # A small label set: the reason's kind ("shutdown", "internal_error", ...).
        kind = reason.split(":", 1)[0].split(" ", 1)[0] or "unknown"
        with self._lock:
            self.crashes[kind] = self.crashes.get(kind, 0) + 1
