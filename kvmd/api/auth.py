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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvmd.api.interceptors import rewrap
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
# Always allowed, even without an identity: health and reflection.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class Grant:
    """What one identity may do."""

    identity: str
    role: str
    vm_prefix: str = ""
    max_vms: int = 0  # 0 = no quota


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


def peer_names(context: grpc.ServicerContext) -> list[str]:
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


def _request_vm_id(request: Any) -> str:
    for path in (("vm_id",), ("vcpu", "vm_id"), ("claim", "vm_id")):
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

    def identify(self, context: grpc.ServicerContext) -> tuple[str, Grant | None]:
        names = peer_names(context)
        if not self.policy.enabled:
            return (names[0] if names else "anonymous"), Grant("*", ADMIN)
        if not names:
            raise Unauthenticated("no client identity: use the Unix socket or present a "
                                  "client certificate")
        grant = self.policy.grant_for(names)
        return (grant.identity if grant else names[0]), grant

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
        if short in HOST_METHODS:
            return
        vm_id = _request_vm_id(request)
        if short == "Vms/CreateVm":
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


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and authorizes every call before its handler runs; denials become
    PERMISSION_DENIED or UNAUTHENTICATED statuses, are logged and counted."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        authz = self.authorizer

        def admit(request: Any, context: grpc.ServicerContext) -> None:
            try:
                identity, grant = authz.identify(context)
                current_identity.set(identity)
                current_quota.set(grant.max_vms if grant is not None else 0)
                authz.check(method, grant, identity, request)
            except DomainError as exc:
                log.warning("rpc denied", extra={"method": method, "peer": context.peer(),
                                                 "reason": exc.message})
                if authz.on_denied is not None:
                    authz.on_denied(method, exc.reason)
                raise

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
                admit(request, context)
                return behavior(request, context)
            return wrapper

        def unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                admit(request, context)
                yield from behavior(request, context)
            return wrapper

        def first_then_rest(requests: Iterator[Any], context: grpc.ServicerContext
                            ) -> Iterator[Any]:
            first = next(requests, None)
            admit(first, context)
            if first is not None:
                yield first
            yield from requests

        def stream_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return behavior(first_then_rest(requests, context), context)
            return wrapper

        def stream_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(requests: Iterator[Any], context: grpc.ServicerContext
                        ) -> Iterator[Any]:
                yield from behavior(first_then_rest(requests, context), context)
            return wrapper

        wrappers = {"unary_unary": unary, "unary_stream": unary_stream,
                    "stream_unary": stream_unary, "stream_stream": stream_stream}
        return rewrap(handler, lambda kind, behavior: wrappers[kind](behavior))
