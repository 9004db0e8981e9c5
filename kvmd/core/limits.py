"""Limits enforced by the core (each a daemon flag)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvmd.core.fds import derived_max_fds, derived_max_fds_per_identity

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one daemon allows. Exceeding any gives ResourceExhausted."""

    max_vms: int = 64
    max_vcpus_per_vm: int = 64
    max_memory_per_vm_bytes: int = 64 * GiB
    max_memory_total_bytes: int = 256 * GiB
    max_memory_slots_per_vm: int = 256
    max_irqfds_per_vm: int = 256
    max_ioevents_per_vm: int = 256
    max_message_bytes: int = 16 * MiB
    # Threads serving unary calls; streams wait on the event loop and cost none.
    max_concurrent_rpcs: int = 64
    # Unary calls one identity may have in flight.
    max_calls_per_identity: int = 16
    # Open streams (watch, console, exit handlers, memory transfers) in all, and per identity.
    max_streams: int = 4096
    max_streams_per_identity: int = 256
    # File descriptors VM objects may hold, in all and per owner (kvmd.core.fds): by
    # default what this process's RLIMIT_NOFILE leaves after the daemon's own reserve, and
    # a quarter of that. The daemon also never goes past what the limit allows when it
    # starts (less what is open then).
    max_fds: int = field(default_factory=derived_max_fds)
    max_fds_per_identity: int = field(default_factory=derived_max_fds_per_identity)


# Guest memory is overcommitted lazily (memfd pages are allocated when first touched), but
# the daemon never maps more than the host can back: the default total leaves the larger of
# 1 GiB or 10% of the host (or of the service's cgroup memory.max) to the daemon and host.
HOST_RESERVE_MIN = GiB
HOST_RESERVE_FRACTION = 10
# What KVM itself allocates per slot before the guest touches it (reverse maps, dirty and
# large-page bookkeeping): about 0.3% of the slot (a 64 GiB slot measured ~160 MiB). The
# budget counts guest bytes (what GetInfo and the slots show); the default total leaves
# room for this overhead on top of them (host_limits).
KERNEL_BYTES_PER_GUEST_PAGE = 12


def kernel_overhead(size: int) -> int:
    """Kernel memory a slot of `size` bytes costs up front (see KERNEL_BYTES_PER_GUEST_PAGE)."""
    return (size // 4096) * KERNEL_BYTES_PER_GUEST_PAGE


def host_memory_bytes(meminfo: str = "/proc/meminfo",
                      cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Memory this daemon can use: MemTotal, or its cgroup's memory.max if lower."""
    total = 0
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/self/cgroup") as fh:
            path = next((ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::")), "")
        with open(f"{cgroup_root}{path}/memory.max") as fh:
            raw = fh.read().strip()
        if raw != "max":
            total = min(total, int(raw)) if total else int(raw)
    except (OSError, ValueError, StopIteration):
        pass
    return total


def host_limits(memory: int | None = None) -> Limits:
    """The defaults for this host: guest memory in all is the host's memory minus a reserve
    and minus KVM's own per-slot memory for that much guest memory (never above what it
    has), and no single VM may take more than that."""
    total = host_memory_bytes() if memory is None else memory
    base = Limits()
    if total <= 0:
        return base
    reserve = max(HOST_RESERVE_MIN, total // HOST_RESERVE_FRACTION)
    usable = total - reserve
    # Guest memory plus what KVM allocates for it up front must fit in what is usable.
    guest_total = max(256 * MiB, usable - kernel_overhead(usable))
    return replace(base, max_memory_total_bytes=guest_total,
                   max_memory_per_vm_bytes=min(base.max_memory_per_vm_bytes, guest_total))
