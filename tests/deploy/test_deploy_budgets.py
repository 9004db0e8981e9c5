"""No identity can lock others out with streams, over TLS with real client certificates: a
viewer holding its share of WatchVm streams, or an identity with no role holding health
watches, leaves the admin, the other tenants and the health check served (issue 13 #2)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, Stubs, TlsDaemon
from grpc_health.v1 import health_pb2

from kvmd_proto import vmm_pb2 as pb

PER_IDENTITY = 4
POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-b", "role": "operator"},
    {"name": "viewer-1", "role": "viewer"},
]


def open_watch(s: Stubs, vm_id: str) -> Any:
    """A WatchVm stream, established (its first event read)."""
    call = s.vms.WatchVm(pb.WatchVmRequest(vm_id=vm_id, include_current=True))
    next(call)
    return call


def open_health_watch(s: Stubs) -> Any:
    call = s.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    return call


def opening_code(opener: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call = opener()
    except grpc.RpcError as exc:
        return exc.code()
    call.cancel()
    return grpc.StatusCode.OK


@pytest.fixture
def d(tls_daemon: Callable[..., TlsDaemon]) -> Iterator[TlsDaemon]:
    yield tls_daemon(policy=POLICY, max_streams_per_identity=PER_IDENTITY, max_streams=64)


def test_a_viewer_and_a_stranger_at_their_stream_limit_lock_nobody_out(d: TlsDaemon) -> None:
    admin, viewer = d.tls("admin-1"), d.tls("viewer-1")
    stranger, operator = d.tls("stranger"), d.tls("operator-b")
    admin.create_vm("w")
    held = [open_watch(viewer, "w") for _ in range(PER_IDENTITY)]
    held += [open_health_watch(stranger) for _ in range(PER_IDENTITY)]
    try:
        # Each is at its own limit: one more stream is refused, retryably.
        assert opening_code(lambda: open_watch(viewer, "w")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert opening_code(lambda: open_health_watch(stranger)) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        # Everyone else is served: the admin's calls and streams, another tenant's, and
        # the health check, for the two holding their streams too.
        assert admin.get_vm("w").vm_id == "w"
        assert opening_code(lambda: open_watch(admin, "w")) == grpc.StatusCode.OK
        operator.create_vm("mine")
        assert opening_code(lambda: open_watch(operator, "mine")) == grpc.StatusCode.OK
        operator.delete_vm("mine")
        for s in (viewer, stranger, admin):
            assert s.health.Check(health_pb2.HealthCheckRequest(service=""),
                                  timeout=RPC_TIMEOUT).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert viewer.get_vm("w").vm_id == "w"  # its unary calls, too
    finally:
        for call in held:
            call.cancel()
    # Given back: the viewer may watch again.
    assert opening_code(lambda: open_watch(viewer, "w")) == grpc.StatusCode.OK
    admin.delete_vm("w")
