"""Per-client authorization: who the caller is, and what their role lets them do.

Identities: "local" for the Unix socket (whose access is the socket's mode and group), the
client certificate's subject CN and SAN names for mTLS. Roles:

- admin: everything.
- operator: create VMs (optionally only ids with a prefix, and at most `max_vms` of them),
  and act on the VMs it created; sees only its own VMs.
- viewer: Get/List/Watch RPCs and host information only.

Without an authorization policy every caller is an admin (the daemon logs this at start).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvmd.core.errors import DomainError, NotFound, PermissionDenied, Unauthenticated
from kvmd.core.host import Host

log = logging.getLogger("kvmd.auth")

ADMIN, OPERATOR, VIEWER = "admin", "operator", "viewer"
ROLES = (ADMIN, OPERATOR, VIEWER)
LOCAL = "local"

# The identity of the caller of the RPC running in this thread, and its VM quota (0 = none),
# set by AuthInterceptor for the handler.
current_identity: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kvmd_identity", default=LOCAL)
current_quota: contextvars.ContextVar[int] = contextvars.ContextVar("kvmd_quota", default=0)

# RPCs that only read: what a viewer may call.
READ_ONLY_METHODS = frozenset({
    "Hypervisor/GetInfo", "Hypervisor/CheckExtension", "Hypervisor/GetSupportedCpuid",
    "Vms/GetVm", "Vms/ListVms", "Vms/WatchVm", "Vms/GetExitStats",
    "Memory/ListMemoryRegions", "Interrupts/ListIrqfds", "IoEvents/ListIoevents",
    "Vcpus/ListVcpus", "Vcpus/GetVcpuState", "Vcpus/GetRegs", "Vcpus/GetSregs",
    "Vcpus/GetFpu", "Vcpus/GetCpuid", "Vcpus/GetMsrs", "Vcpus/GetMpState", "Vcpus/GetLapic",
    "Vcpus/GetVcpuEvents",
    "grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch",
})
# RPCs about the host, not a VM: any authenticated caller.
HOST_METHODS = frozenset({
    "Hypervisor/GetInfo", "Hypervisor/CheckExtension", "Hypervisor/GetSupportedCpuid",
    "Vms/ListVms",
})
# RPCs that create a VM: operators only under their prefix (and within their quota).
CREATING_METHODS = frozenset({"Vms/CreateVm", "Snapshots/RestoreVm"})
# RPCs over the state directory's files: operators see only files of their own VMs (the
# handler filters by owner).
OPERATOR_FILE_METHODS = frozenset({"Snapshots/ListSnapshots", "Snapshots/DeleteSnapshot"})
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
            grants[name] = Grant(name, role, prefix, quota)
        return cls(grants, enabled=True)

    def grant_for(self, names: list[str]) -> Grant | None:
        for name in names:
            grant = self.grants.get(name)
            if grant is not None:
                return grant
        return None


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
                 on_denied: Callable[[str, str], None] | None = None) -> None:
        self.policy = policy
        self.host = host
        self.on_denied = on_denied

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

    def check(self, method: str, grant: Grant | None, identity: str, request: Any) -> None:
        short = method.lstrip("/").removeprefix("kvmd.v1.")
        if grant is None:
            raise PermissionDenied(f"identity {identity!r} has no role on this daemon")
        if grant.role == ADMIN:
            return
        if grant.role == VIEWER:
            if short not in READ_ONLY_METHODS:
                raise PermissionDenied(f"{identity!r} is a viewer and may not call {short}")
            return
        # operator
        if short in HOST_METHODS or short in OPERATOR_FILE_METHODS:
            return
        vm_id = _request_vm_id(request)
        if short in CREATING_METHODS:
            if grant.vm_prefix and not vm_id.startswith(grant.vm_prefix):
                raise PermissionDenied(f"{identity!r} may only create VMs whose id starts "
                                       f"with {grant.vm_prefix!r}")
            return  # the quota (max_vms) is enforced atomically by the registry
        if not vm_id:
            raise PermissionDenied(f"{identity!r} may not call {short}")
        try:
            owner = self.host.get_vm(vm_id).owner
        except NotFound:
            return  # let the handler report NOT_FOUND
        if owner != identity:
            raise PermissionDenied(f"vm {vm_id!r} belongs to another identity")

    def visible(self, identity: str, owner: str) -> bool:
        """May this identity see a VM in ListVms?"""
        if not self.policy.enabled:
            return True
        grant = self.policy.grants.get(identity)
        return grant is not None and (grant.role != OPERATOR or owner == identity)


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
        try:
            if _is_open(method):
                identity, grant = authz.identify_softly(context)
            else:
                identity, grant = authz.identify(context)
            current_identity.set(identity)
            current_grant.set(grant)
            current_quota.set(grant.max_vms if grant is not None else 0)
            if not _is_open(method):
                authz.check(method, grant, identity, request)
        except DomainError as exc:
            log.warning("rpc denied", extra={"method": method, "peer": context.peer(),
                                             "reason": exc.message})
            if authz.on_denied is not None:
                authz.on_denied(method, exc.reason)
            raise

    # -- the CallChain stage ----------------------------------------------------------------

    def applies(self, method: str, kind: str) -> bool:
        return True

    def enter(self, method: str, kind: str, request: Any, context: PeerContext) -> None:
        self.admit(method, request, context)

    def leave(self, token: None) -> None:
        pass
