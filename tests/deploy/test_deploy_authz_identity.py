"""Who a caller is (kvmd.api.auth): the names a certificate gives (the subject CN before the
SANs, so a certificate matching two grants gets one, predictably), the peer address that
names a caller without identity, and the open methods (health, reflection) that such a
caller may still call, identified by that address (its budgets are keyed on it)."""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Mapping

import pytest

from kvmd.api.auth import (
    AuthInterceptor,
    Authorizer,
    Policy,
    current_grant,
    current_identity,
    peer_host,
    peer_names,
)
from kvmd.core.errors import Unauthenticated


class Peer:
    """A call's context as the authorizer sees it."""

    def __init__(self, peer: str, cn: Iterable[str] = (), san: Iterable[str] = ()) -> None:
        self._peer = peer
        self._auth = {"x509_common_name": [n.encode() for n in cn],
                      "x509_subject_alternative_name": [n.encode() for n in san]}

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth


POLICY = Policy.from_config({"identities": [
    {"name": "op", "role": "operator"},
    {"name": "op.clients.test", "role": "admin"},
    {"name": "local", "role": "viewer"},
]})


def authorizer() -> Authorizer:
    return Authorizer(POLICY, host=None)  # type: ignore[arg-type]  # identification only


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.1:5000", "10.0.0.1"),
    ("ipv6:%5B::1%5D:41000", "%5B::1%5D"),  # as gRPC writes an IPv6 peer
    ("ipv6:[::1]:41000", "[::1]"),
    ("unix:/run/kvmd/kvmd.sock", "unix:/run/kvmd/kvmd.sock"),
])
def test_peer_host_drops_only_the_port(peer: str, host: str) -> None:
    """Every connection from one host is one unidentified caller, whatever its port."""
    assert peer_host(Peer(peer)) == host


def test_the_subject_cn_comes_before_the_sans() -> None:
    """A certificate whose CN and SAN both have grants gets its CN's, whatever the order of
    the policy's entries; one without a grant is named by its CN."""
    ctx = Peer("ipv4:10.0.0.1:5000", cn=["op"], san=["op.clients.test", "op"])
    assert peer_names(ctx) == ["op", "op.clients.test"]
    identity, grant = authorizer().identify(ctx)
    assert (identity, grant and grant.role) == ("op", "operator")
    stranger = Peer("ipv4:10.0.0.1:5000", cn=["someone"], san=["someone.clients.test"])
    assert authorizer().identify(stranger) == ("someone", None)
    # The SAN alone grants its own role.
    san_only = Peer("ipv4:10.0.0.1:5000", cn=["nobody"], san=["op.clients.test"])
    identity, grant = authorizer().identify(san_only)
    assert (identity, grant and grant.role) == ("op.clients.test", "admin")


def admitted_as(method: str, ctx: Peer) -> tuple[str, object]:
    """(current_identity, current_grant) that AuthInterceptor.admit leaves to the handler."""
    def admit() -> tuple[str, object]:
        AuthInterceptor(authorizer()).admit(method, None, ctx)
        return current_identity.get(), current_grant.get()
    return contextvars.copy_context().run(admit)


def test_a_caller_without_identity_reaches_health_named_by_its_host() -> None:
    """TLS without a client certificate, under a policy: health and reflection answer, and
    the caller is "peer:<host>" (no grant), the same for every port of that host; any other
    call is UNAUTHENTICATED."""
    for port in (40000, 40001):
        ctx = Peer(f"ipv4:10.0.0.7:{port}")
        for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                       "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
            assert admitted_as(method, ctx) == ("peer:10.0.0.7", None), method
    with pytest.raises(Unauthenticated):
        admitted_as("/kvmd.v1.Hypervisor/GetInfo", Peer("ipv4:10.0.0.7:40000"))
    # An identified caller of an open method keeps its identity.
    assert admitted_as("/grpc.health.v1.Health/Check", Peer("unix:"))[0] == "local"
