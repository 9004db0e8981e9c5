"""File descriptors: what each VM object holds, and the budget that keeps them inside the
process's RLIMIT_NOFILE (systemd's LimitNOFILE=), host-wide and per identity.

Every descriptor of a VM is the daemon's: the VM fd, its binary-stats fd and its console's
eventfd (the UART's transmit ring got bytes), a vCPU fd and a stats fd per vCPU (a dirty ring
is a mapping of the vCPU fd, no descriptor of its own), a memfd per memory slot (or the dup
of its file), the dup of each file mapped over part of a slot, an eventfd per irqfd (two
with resample) and per ioevent. At the default per-VM limits
that is 3 + 2*64 + 256 + 2*256 + 256 = 1155 per VM: 64 such VMs need 73920.

The kernel refuses a descriptor past RLIMIT_NOFILE with EMFILE, and then refuses it to
everyone, the daemon's own sockets included. So the daemon charges each object's descriptors
against a budget *before* it asks the kernel, and answers ResourceExhausted itself:

- host-wide, `max_fds` (default: the soft RLIMIT_NOFILE at start, less what is already open
  and a reserve for the daemon itself: client connections, streams' files, the metrics
  endpoint, grpc core; the larger of 256 and an eighth);
- per identity (the VM's owner), `max_fds_per_identity` (default: a quarter of max_fds),
  and all identities but the privileged ones (admins) together leave an eighth of max_fds
  to them, as the call and stream budgets do: one tenant cannot starve another, nor the
  admins.
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable
from typing import Protocol

from kvmd.core.errors import Reason, ResourceExhausted, limit

FDS_PER_VM = 3  # the VM fd, its binary-stats fd, the eventfd of its console's transmit ring
FDS_PER_VCPU = 2  # the vCPU fd and its stats fd (a dirty ring maps the vCPU fd)
FDS_PER_SLOT = 1  # the slot's memfd, or the dup of its file
FDS_PER_FILE_MAPPING = 1  # MapGuestMemory: the dup of the file mapped over the slot
FDS_PER_IRQFD = 1  # its eventfd; a resample irqfd has a second one
FDS_PER_IOEVENT = 1  # its eventfd
RESERVE_MIN = 256  # descriptors the daemon keeps for itself, at least
RESERVE_FRACTION = 8  # ... or an eighth of RLIMIT_NOFILE, if more
IDENTITY_SHARE = 4  # one identity may hold a quarter of the budget by default
UNLIMITED = 1 << 30  # RLIM_INFINITY, as a number


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE of this process."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        return 0


def reserve(nofile: int) -> int:
    """Descriptors left to the daemon itself (connections, files, grpc core, metrics)."""
    return max(RESERVE_MIN, nofile // RESERVE_FRACTION)


def derived_max_fds(nofile: int | None = None, already_open: int = 0) -> int:
    """The descriptors VMs may hold under RLIMIT_NOFILE `nofile` (default: this process's)
    with `already_open` open besides them."""
    nofile = nofile_limit() if nofile is None else nofile
    return max(0, nofile - already_open - reserve(nofile))


def derived_max_fds_per_identity(nofile: int | None = None) -> int:
    return derived_max_fds(nofile) // IDENTITY_SHARE


class PerVmLimits(Protocol):
    """The per-VM limits fds_per_vm reads (kvmd.core.limits.Limits has them; that module
    imports this one for its defaults)."""

    @property
    def max_vcpus_per_vm(self) -> int: ...
    @property
    def max_memory_slots_per_vm(self) -> int: ...
    @property
    def max_irqfds_per_vm(self) -> int: ...
    @property
    def max_ioevents_per_vm(self) -> int: ...


def fds_per_vm(limits: PerVmLimits) -> int:
    """What one VM holds at the per-VM limits (resample irqfds, no file mappings)."""
    return (FDS_PER_VM + FDS_PER_VCPU * limits.max_vcpus_per_vm
            + FDS_PER_SLOT * limits.max_memory_slots_per_vm
            + (FDS_PER_IRQFD + 1) * limits.max_irqfds_per_vm
            + FDS_PER_IOEVENT * limits.max_ioevents_per_vm)


def irqfd_fds(resample: bool) -> int:
    return FDS_PER_IRQFD + (1 if resample else 0)


def admin_reserve(limit: int) -> int:
    """What unprivileged owners leave to privileged ones: an eighth, at least 1."""
    return 0 if limit < 2 else max(1, limit // 8)


class FdBudget:
    """Descriptors held by VM objects, by owner, against `limit` and `per_identity`.
    `privileged(owner)` (set by the API from its policy: admins) exempts an owner from the
    per-identity share and lets it use the last eighth."""

    def __init__(self, limit: int, per_identity: int,
                 privileged: Callable[[str], bool] = lambda owner: False) -> None:
        self.limit = limit
        self.per_identity = min(per_identity, limit)
        self.privileged = privileged
        self.in_use = 0
        self._unprivileged = 0
        self._by_owner: dict[str, int] = {}
        self._lock = threading.Lock()

    def account(self, owner: str, n: int = 0) -> FdAccount:
        """An account for one VM's descriptors, owned by `owner`, charged `n` at once."""
        account = FdAccount(self, owner)
        account.take(n)
        return account

    def held_by(self, owner: str) -> int:
        with self._lock:
            return self._by_owner.get(owner, 0)

    def _take(self, owner: str, n: int, what: str) -> None:
        privileged = self.privileged(owner)
        with self._lock:
            if self.in_use + n > self.limit:
                raise ResourceExhausted(
                    f"{what} needs {n} file descriptors; the daemon's VMs hold {self.in_use} "
                    f"of {self.limit} (max_fds, under RLIMIT_NOFILE)", resource="fds",
                    reason=Reason.LIMIT_FDS, metadata=limit("max_fds", self.limit))
            held = self._by_owner.get(owner, 0)
            if not privileged:
                if held + n > self.per_identity:
                    raise ResourceExhausted(
                        f"{what} needs {n} file descriptors; {owner!r} holds {held} of its "
                        f"{self.per_identity} (max_fds_per_identity)", resource="fds",
                        reason=Reason.LIMIT_FDS,
                        metadata=limit("max_fds_per_identity", self.per_identity))
                if self._unprivileged + n > self.limit - admin_reserve(self.limit):
                    raise ResourceExhausted(
                        f"{what} needs {n} file descriptors; what the daemon keeps for "
                        "non-admin callers is in use: try again later", resource="fds",
                        reason=Reason.LIMIT_FDS, metadata=limit("max_fds", self.limit))
                self._unprivileged += n
            self.in_use += n
            self._by_owner[owner] = held + n

    def _give(self, owner: str, n: int) -> None:
        privileged = self.privileged(owner)
        with self._lock:
            self.in_use -= n
            if not privileged:
                self._unprivileged -= n
            left = self._by_owner.get(owner, 0) - n
            if left > 0:
                self._by_owner[owner] = left
            else:
                self._by_owner.pop(owner, None)


class FdAccount:
    """The descriptors one VM holds: charged before each object is made, given back when it
    goes, and all at once when the VM is closed."""

    def __init__(self, budget: FdBudget, owner: str) -> None:
        self.budget = budget
        self.owner = owner
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int, what: str = "this") -> None:
        """Charge `n` descriptors, or raise ResourceExhausted (nothing charged)."""
        if n <= 0:
            return
        self.budget._take(self.owner, n, what)
        with self._lock:
            self.held += n

    def give(self, n: int) -> None:
        with self._lock:
            n = min(n, self.held)
            self.held -= n
        if n > 0:
            self.budget._give(self.owner, n)

    def close(self) -> None:
        """Give back everything (the VM and all it held are gone)."""
        self.give(self.held)
