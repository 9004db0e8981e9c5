"""What every VM of a host shares (HostShared) and the daemon-wide guest-memory budget.

Its own module, below both `host` (which makes one) and `vm` (which is handed one), so
neither imports the other to name it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvmd.core.devices import ConsolePump
from kvmd.core.errors import Reason, ResourceExhausted, limit
from kvmd.core.events import FdWatcher
from kvmd.core.fds import UNLIMITED, FdBudget
from kvmd.core.histogram import Histogram
from kvmd.core.images import ImagesDir
from kvmd.core.limits import Limits
from kvmd.core.stats import MigrationStats, OperationStats


class MemoryBudget:
    """Guest memory reserved across all VMs, against the daemon-wide limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.in_use + size > self.limit:
                raise ResourceExhausted(
                    f"the daemon would hold {self.in_use + size} bytes of guest memory, the "
                    f"limit is {self.limit}",
                    reason=Reason.LIMIT_GUEST_MEMORY,
                    metadata=limit("max_memory_total_bytes", self.limit))
            self.in_use += size

    def release(self, size: int) -> None:
        with self._lock:
            self.in_use -= size


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
    vcpu_policy: str = "other"  # see kvmd.core.vcpu.POLICIES
    # Moves UART output into consoles (None: the fd watcher drains at every signal).
    console_pump: ConsolePump | None = None

    def count_crash(self, reason: str) -> None:
        # A small label set: the reason's kind ("shutdown", "internal_error", ...).
        kind = reason.split(":", 1)[0].split(" ", 1)[0] or "unknown"
        with self._lock:
            self.crashes[kind] = self.crashes.get(kind, 0) + 1
