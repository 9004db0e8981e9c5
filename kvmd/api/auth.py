"""Per-client authorization: who the caller is, and what their role lets them do.

Identities: "local" for the Unix socket (whose access is the socket's mode and group), the
client certificate's subject CN and SAN names for mTLS. Roles:

- admin: everything.
- operator: create VMs (optionally only ids with a prefix, and at most `max_vms` of them),
  and act on the VMs it created; sees only its own VMs. Another identity's VM answers
  exactly as a missing one (NOT_FOUND), and ids inside another identity's prefix are
  reserved for it.
- viewer: host information and the metadata of every VM: Get/List/Watch RPCs for states,
  counters, layouts and events, never guest data (guest memory, the console, and the
  guest's CPU state: registers, FPU/XMM, MSRs, LAPIC, pending exceptions; crash events
  come without their registers).

Without an authorization policy every caller is an admin (the daemon logs this at start).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmd.api.errors import status_code
from kvmd.core.errors import DomainError, NotFound, PermissionDenied, Reason, Unauthenticated
from kvmd.core.host import Host, missing_vm
from kvmd.core.vm import ManagedVm

log = logging.getLogger("kvmd.auth")

ADMIN, OPERATOR, VIEWER = "admin", "operator", "viewer"
ROLES = (ADMIN, OPERATOR, VIEWER)
LOCAL = "local"

# The identity of the caller of the RPC running in this thread, and its VM quota (0 = none),
# set by AuthInterceptor for the handler.
current_identity: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kvmd_identity", default=LOCAL)
current_quota: contextvars.ContextVar[int] = contextvars.ContextVar("kvmd_quota", default=0)

# RPCs that only read metadata: what a viewer may call. States, counters, layouts, ids,
# events (WatchVm strips a crash's registers for viewers: see may_read_guest_state) and the
# CPUID the host gave a vCPU; never guest data.
READ_ONLY_METHODS = frozenset({
    "Hypervisor/GetInfo", "Hypervisor/CheckExtension", "Hypervisor/GetSupportedCpuid",
    "Vms/GetVm", "Vms/ListVms", "Vms/WatchVm", "Vms/GetExitStats",
    "Memory/ListMemoryRegions", "Interrupts/ListIrqfds", "IoEvents/ListIoevents",
    "Vcpus/ListVcpus", "Vcpus/GetVcpuState", "Vcpus/GetCpuid", "Vcpus/GetMpState",
    "Migration/ListMigrations",
    "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch",
})
# Reads of guest data, for admins and the VM's owner only: the guest's CPU state (registers,
# FPU/XMM, MSRs such as the GS base, the LAPIC, pending exceptions with a page fault's
# address), its memory, its console and its dirty pages.
GUEST_DATA_READS = frozenset({
    "Vcpus/GetRegs", "Vcpus/GetSregs", "Vcpus/GetFpu", "Vcpus/GetMsrs", "Vcpus/GetLapic",
    "Vcpus/GetVcpuEvents", "Memory/ReadGuestMemory", "Memory/GetDirtyLog",
    "Memory/PollDirtyLog",
    "Vms/StreamConsole", "Snapshots/SnapshotVm",
})
# RPCs about the host, not a VM: any authenticated caller.
HOST_METHODS = frozenset({
    "Hypervisor/GetInfo", "Hypervisor/CheckExtension", "Hypervisor/GetSupportedCpuid",
    "Vms/ListVms",
})
# RPCs that create a VM: operators only under their prefix (and within their quota).
CREATING_METHODS = frozenset({"Vms/CreateVm", "Snapshots/RestoreVm",
                              "Migration/PrepareIncomingMigration"})
# RPCs over the state directory's files: operators see only files of their own VMs (the
# handler filters by owner).
OPERATOR_FILE_METHODS = frozenset({"Snapshots/ListSnapshots", "Snapshots/DeleteSnapshot"})
# Lists the handler filters by owner, as ListVms.
OPERATOR_LIST_METHODS = frozenset({"Migration/ListMigrations"})
# Authorized by what they carry, not by a role: the source daemon's migration stream holds
# the one-time token the target handed to the orchestrator (any authenticated peer).
TOKEN_METHODS = frozenset({"Migration/ReceiveMigration"})
# Admins only: stranded VMs are no VM an operator owns yet, and a hand-over's report is
# about the whole daemon.
ADMIN_METHODS = frozenset({"Handover/ListStrandedVms", "Handover/RetryStrandedVm",
                           "Handover/DeleteStrandedVm", "Handover/GetHandoverReport"})
# What an operator may call without naming a VM.
VM_LESS_METHODS = HOST_METHODS | OPERATOR_FILE_METHODS | OPERATOR_LIST_METHODS
# Always allowed, even without an identity: health and reflection.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class Grant:
    """What one identity may do."""

    identity: str
    role: str
    vm_prefix: str = ""
    max_vms: int = 0  # 0 = no quota


# The caller's grant (None: no role), set with current_identity.
current_grant: contextvars.ContextVar[Grant | None] = contextvars.ContextVar(
    "kvmd_grant", default=None)
# The VM the call was authorized for, as (vm id, object), set with current_identity: the
# handler acts on exactly this object (ServicerBase._vm), so a VM deleted and re-created
# under the same id by another tenant between the check and the handler is never touched.
authorized_vm: contextvars.ContextVar[tuple[str, ManagedVm] | None] = contextvars.ContextVar(
    "kvmd_authorized_vm", default=None)


class Hidden(NotFound):
    """A denial answered as NOT_FOUND, word for word what a missing VM answers: a VM the
    caller may not see. Logged and counted as a denial like PermissionDenied."""


def may_read_guest_state(grant: Grant | None) -> bool:
    """May a caller who passed authorization for a VM see its guest's CPU state where an
    RPC open to viewers would carry it (a crash's registers in WatchVm)? Admins and the
    VM's owner (an operator only reaches its own VMs) may; viewers may not."""
    return grant is not None and grant.role in (ADMIN, OPERATOR)


@dataclass
class Policy:
    """Identity -> grant. `enabled` is False when no policy was configured."""

    grants: dict[str, Grant] = field(default_factory=dict)
    enabled: bool = False

    @classmethod
    def from_config(cls, table: dict[str, Any] | None) -> Policy:
        """Parse `[authorization]`: `identities = [{name, role, vm_prefix?, max_vms?}]`."""
        if not table:
            return cls()
        unknown_keys = set(table) - {"identities"}
        if unknown_keys:
            raise ValueError(f"unknown keys {sorted(unknown_keys)} (only 'identities')")
        identities = table.get("identities", [])
        if not isinstance(identities, list):
            raise ValueError("identities must be a list of tables")
        grants: dict[str, Grant] = {}
        for entry in identities:
            if not isinstance(entry, dict):
                raise ValueError("authorization.identities entries must be tables")
            name, role = entry.get("name"), entry.get("role")
            if not isinstance(name, str) or not name:
                raise ValueError("every authorization identity needs a name")
            if role not in ROLES:
                raise ValueError(f"identity {name!r}: role must be one of {', '.join(ROLES)}")
            unknown = set(entry) - {"name", "role", "vm_prefix", "max_vms"}
            if unknown:
                raise ValueError(f"identity {name!r}: unknown keys {sorted(unknown)}")
            prefix, quota = entry.get("vm_prefix", ""), entry.get("max_vms", 0)
            if not isinstance(prefix, str):
                raise ValueError(f"identity {name!r}: vm_prefix must be a string")
            if isinstance(quota, bool) or not isinstance(quota, int) or quota < 0:
                raise ValueError(f"identity {name!r}: max_vms must be a non-negative integer")
            if name in grants:
                raise ValueError(f"identity {name!r} appears twice")
            if prefix:
                twin = next((g for g in grants.values() if g.vm_prefix == prefix), None)
                if twin is not None:
                    raise ValueError(f"identities {twin.identity!r} and {name!r} have the same "
                                     f"vm_prefix {prefix!r}: a prefix is one identity's")
            grants[name] = Grant(name, role, prefix, quota)
        return cls(grants, enabled=True)

    def grant_for(self, names: list[str]) -> Grant | None:
        for name in names:
            grant = self.grants.get(name)
            if grant is not None:
                return grant
        return None

    def prefix_owner(self, vm_id: str) -> Grant | None:
        """The identity whose vm_prefix reserves `vm_id`: the longest prefix it starts with
        (so a prefix nested in another's, "a-b-" in "a-", is its own identity's)."""
        best: Grant | None = None
        for grant in self.grants.values():
            if grant.vm_prefix and vm_id.startswith(grant.vm_prefix) and (
                    best is None or len(grant.vm_prefix) > len(best.vm_prefix)):
                best = grant
        return best


class PeerContext(Protocol):
    """What identification needs of a call's context (sync or aio)."""

    def peer(self) -> str: ...

    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def peer_names(context: PeerContext) -> list[str]:
    """Names the caller is known by: "local" on a Unix socket, the certificate's CN and
    SANs with mTLS; empty when it presented no identity."""
    peer = context.peer() or ""
    if peer.startswith("unix:"):
        return [LOCAL]
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, []):
            text = value.decode() if isinstance(value, bytes) else str(value)
            # "local" names the Unix socket only: a certificate cannot claim it.
            if text and text != LOCAL and text not in names:
                names.append(text)
    return names


def peer_host(context: PeerContext) -> str:
    """The caller's address without its port ("ipv4:10.0.0.1:5000" -> "10.0.0.1")."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0] or rest
    return peer


def _request_vm_id(request: Any) -> str:
    for path in (("vm_id",), ("vcpu", "vm_id"), ("claim", "vm_id"), ("options", "vm_id")):
        obj = request
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, str) and obj:
            return obj
    return ""


class Authorizer:
    """Checks one call against the policy; raises the domain error of a denial."""

    def __init__(self, policy: Policy, host: Host,
                 on_denied: Callable[[str, str], None] | None = None,
                 denial_log: DenialLog | None = None) -> None:
        self.policy = policy
        self.host = host
        self.on_denied = on_denied
        self.denial_log = denial_log or DenialLog()

    def identify(self, context: PeerContext) -> tuple[str, Grant | None]:
        names = peer_names(context)
        if not self.policy.enabled:
            return (names[0] if names else "anonymous"), Grant("*", ADMIN)
        if not names:
            raise Unauthenticated("no client identity: use the Unix socket or present a "
                                  "client certificate")
        grant = self.policy.grant_for(names)
        return (grant.identity if grant else names[0]), grant

    def identify_softly(self, context: PeerContext) -> tuple[str, Grant | None]:
        """Like identify, for open methods: a caller without identity is named by its peer
        address instead of being refused."""
        try:
            return self.identify(context)
        except Unauthenticated:
            return f"peer:{peer_host(context)}", None

    def check(self, method: str, grant: Grant | None, identity: str, request: Any
              ) -> ManagedVm | None:
        """Raise the domain error of a denial (PermissionDenied; Hidden for a VM the caller
        may not see), or return the VM the request names, as found now (None if it names
        none, or none exists and the caller may learn that): the handler acts on exactly
        this object."""
        short = method.lstrip("/").removeprefix("kvmd.v1.")
        if short in TOKEN_METHODS:
            return None  # the handler checks the token
        if grant is None:
            raise PermissionDenied(f"identity {identity!r} has no role on this daemon",
                                   reason=Reason.PERMISSION_DENIED_ROLE)
        if short in ADMIN_METHODS and grant.role != ADMIN:
            raise PermissionDenied(f"{identity!r} is not an admin: stranded VMs and "
                                   "hand-overs are for admins",
                                   reason=Reason.PERMISSION_DENIED_ROLE)
        vm_id = _request_vm_id(request)
        if grant.role == VIEWER:
            if short in GUEST_DATA_READS:
                raise PermissionDenied(f"{identity!r} is a viewer: {short} reads guest data, "
                                       "which only admins and the VM's owner may",
                                       reason=Reason.PERMISSION_DENIED_ROLE)
            if short not in READ_ONLY_METHODS:
                raise PermissionDenied(f"{identity!r} is a viewer and may not call {short}",
                                       reason=Reason.PERMISSION_DENIED_ROLE)
        if short in CREATING_METHODS:
            if grant.role == OPERATOR:
                self._check_new_id(grant, identity, vm_id)
            return None  # the quota (max_vms) is enforced atomically by the registry
        if grant.role == OPERATOR and not vm_id and short not in VM_LESS_METHODS:
            raise PermissionDenied(f"{identity!r} may not call {short}",
                                   reason=Reason.PERMISSION_DENIED_ROLE)
        if not vm_id:
            return None
        try:
            vm: ManagedVm | None = self.host.get_vm(vm_id)  # a bad id: InvalidArgument
        except NotFound:
            vm = None
        # A VM's owner, or who reserved the id for a VM being made (an incoming migration).
        owner = vm.owner if vm is not None else self.host.owner_of(vm_id)
        if grant.role == OPERATOR:
            if owner is None:
                raise missing_vm(vm_id)  # nothing reaches the handler; not a denial
            if owner != identity:
                hidden = missing_vm(vm_id)  # word for word what a missing VM answers
                raise Hidden(hidden.message, resource=hidden.resource)
        return vm

    def _check_new_id(self, grant: Grant, identity: str, vm_id: str) -> None:
        """An operator's new VM id: under its own prefix if it has one, and never inside a
        prefix the policy reserves for another identity."""
        if grant.vm_prefix and not vm_id.startswith(grant.vm_prefix):
            raise PermissionDenied(f"{identity!r} may only create VMs whose id starts "
                                   f"with {grant.vm_prefix!r}",
                                   reason=Reason.VM_ID_RESERVED, field="vm_id")
        owner = self.policy.prefix_owner(vm_id)
        if owner is not None and owner.identity != grant.identity:
            raise PermissionDenied(f"ids starting with {owner.vm_prefix!r} are reserved for "
                                   "another identity", reason=Reason.VM_ID_RESERVED, field="vm_id")

    def privileged(self, owner: str) -> bool:
        """Is `owner` an admin (every caller is, without a policy)? Admins are exempt from
        per-identity shares of host resources (kvmd.core.fds) and may use their reserve."""
        if not self.policy.enabled:
            return True
        grant = self.policy.grants.get(owner)
        return grant is not None and grant.role == ADMIN

    def visible(self, identity: str, owner: str) -> bool:
        """May this identity see a VM in ListVms?"""
        if not self.policy.enabled:
            return True
        grant = self.policy.grants.get(identity)
        return grant is not None and (grant.role != OPERATOR or owner == identity)


@dataclass
class _Window:
    started: float
    count: int = 0


class DenialLog:
    """Logs denials without letting a caller flood the log: per (identity, method), the
    first `per_key` denials of each `interval` seconds are logged, the others only counted,
    and summed up in one line ("rpc denials not logged", with `suppressed`) once their
    interval is over, at the next denial of anyone or when the daemon stops. At most
    `max_keys` pairs are tracked at once; beyond that, denials share one ("*", "*") pair.
    (Every denial is still counted in kvmd_authorization_denials_total.)"""

    def __init__(self, per_key: int = 5, interval: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key = per_key
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def denied(self, identity: str, method: str, fields: dict[str, Any]) -> None:
        now = self._clock()
        with self._lock:
            ended = self._take_ended(now)
            key = (identity, method)
            window = self._windows.get(key)
            if window is None:
                if len(self._windows) >= self.max_keys:
                    key = ("*", "*")
                    window = self._windows.get(key)
                if window is None:
                    window = self._windows[key] = _Window(now)
            window.count += 1
            logged = window.count <= self.per_key
        self._summarize(ended)
        if logged:
            log.warning("rpc denied", extra={"identity": identity, "method": method, **fields})

    def flush(self) -> None:
        """Sum up every window now (the daemon is stopping)."""
        with self._lock:
            ended = self._take_ended(None)
        self._summarize(ended)

    def _take_ended(self, now: float | None) -> list[tuple[tuple[str, str], _Window]]:
        ended = [(k, w) for k, w in self._windows.items()
                 if now is None or now - w.started >= self.interval]
        for key, _w in ended:
            del self._windows[key]
        return ended

    def _summarize(self, ended: list[tuple[tuple[str, str], _Window]]) -> None:
        for (identity, method), window in ended:
            if window.count > self.per_key:
                log.warning("rpc denials not logged", extra={
                    "identity": identity, "method": method,
                    "suppressed": window.count - self.per_key,
                    "seconds": round(self._clock() - window.started, 1)})


def _is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


class AuthInterceptor:
    """Authenticates and authorizes every call before its handler runs (a stage of the
    server's CallChain); denials become PERMISSION_DENIED or UNAUTHENTICATED statuses, are
    logged and counted. Health and reflection are open to all, but their callers are still
    identified (for budgets). Calls with a request stream are admitted on their first
    message, which names the VM."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def admit(self, method: str, request: Any, context: PeerContext) -> None:
        authz = self.authorizer
        identity = f"peer:{peer_host(context)}"  # until the caller is identified
        try:
            if _is_open(method):
                identity, grant = authz.identify_softly(context)
            else:
                identity, grant = authz.identify(context)
            current_identity.set(identity)
            current_grant.set(grant)
            current_quota.set(grant.max_vms if grant is not None else 0)
            authorized_vm.set(None)
            if not _is_open(method):
                vm = authz.check(method, grant, identity, request)
                if vm is not None:
                    authorized_vm.set((vm.id, vm))
        except DomainError as exc:
            if not isinstance(exc, PermissionDenied | Unauthenticated | Hidden):
                raise  # a missing VM or a malformed id: an answer, not a denial
            authz.denial_log.denied(identity, method, {"peer": context.peer(),
                                                       "reason": exc.message})
            if authz.on_denied is not None:
                # The metric's label is the status code (a small, fixed set), not the
                # specific AIP-193 reason the caller gets.
                authz.on_denied(method, status_code(exc).name)
            raise

    # -- the CallChain stage ----------------------------------------------------------------

    def applies(self, method: str, kind: str) -> bool:
        return True

    def enter(self, method: str, kind: str, request: Any, context: PeerContext) -> None:
        self.admit(method, request, context)

    def leave(self, token: None) -> None:
        pass
