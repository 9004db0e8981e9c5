"""What the source makes of its target (kvmd.migration.transport), without a daemon: the
target addresses it accepts, and what each failure of a call to the target means here."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from migration_support import fake_target

from kvmd.core.errors import (
    Aborted,
    InvalidArgument,
    InvalidState,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from kvmd.migration.precopy import MigrationOptions
from kvmd.migration.transport import GrpcTransport, split_target, target_error
from kvmd_proto import vmm_pb2 as pb

TARGET = "10.0.0.2:7000"


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc raises it: a code, details, and the target's ErrorInfo in the
    status details (as kvmd sends them) when `reason` is given."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details
        self._trailers: tuple[tuple[str, bytes], ...] = ()
        if reason:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="kvmd"))
            status = status_pb2.Status(code=code.value[0], message=details, details=[detail])
            self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers


@pytest.mark.parametrize("target", ["host:1", "host:65535", "[::1]:7000", "10.0.0.2:7000"])
def test_host_and_port_targets_are_accepted(target: str) -> None:
    host, port = split_target(target)
    assert host and 0 < port < 65536


@pytest.mark.parametrize("target", ["host", "host:0", "host:65536", ":7000", "host:x",
                                    "unix:///run/kvmd.sock", "host:-1"])
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        split_target(target)
    assert err.value.reason == Reason.TARGET_INVALID and err.value.field == "target"


@pytest.mark.parametrize(("code", "cls", "reason"), [
    (grpc.StatusCode.UNAVAILABLE, Unavailable, Reason.PEER_UNAVAILABLE),
    (grpc.StatusCode.DEADLINE_EXCEEDED, Unavailable, Reason.PEER_UNAVAILABLE),
    (grpc.StatusCode.PERMISSION_DENIED, InvalidArgument, Reason.MIGRATION_TOKEN_REFUSED),
    (grpc.StatusCode.UNAUTHENTICATED, InvalidState, Reason.FEATURE_DISABLED),
    (grpc.StatusCode.CANCELLED, Aborted, Reason.MIGRATION_CANCELLED),
    (grpc.StatusCode.INTERNAL, InvalidState, Reason.MIGRATION_FAILED),
], ids=lambda v: getattr(v, "name", None) or getattr(v, "__name__", None) or str(v))
def test_what_a_failed_call_to_the_target_means_here(
        code: grpc.StatusCode, cls: type, reason: Reason) -> None:
    error = target_error(TARGET, FakeRpcError(code, "it failed"))
    assert type(error) is cls and error.reason == reason
    assert TARGET in error.message


def test_the_targets_own_reason_comes_through_when_it_fits_the_code() -> None:
    error = target_error(TARGET, FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              "no room", Reason.LIMIT_VMS))
    assert isinstance(error, ResourceExhausted) and error.reason == Reason.LIMIT_VMS


def test_a_target_reason_of_another_code_is_not_taken() -> None:
    """A reason must belong to the status it came with (LIMIT_VMS is RESOURCE_EXHAUSTED's):
    with FAILED_PRECONDITION it says the migration failed, not LIMIT_VMS."""
    error = target_error(TARGET, FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION,
                                              "odd", Reason.LIMIT_VMS))
    assert isinstance(error, InvalidState) and error.reason == Reason.MIGRATION_FAILED
    unknown = target_error(TARGET, FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION,
                                                "newer", "A_REASON_FROM_A_NEWER_KVMD"))
    assert unknown.reason == Reason.MIGRATION_FAILED


def test_a_target_that_ends_the_stream_without_an_answer_fails_the_wait_at_once() -> None:
    """The stream's end is an answer too: the source does not wait out timeout_ms."""
    def hang_up(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        pb.MigrationMessage.FromString(next(requests))  # the start, then nothing
        yield from ()

    server, address = fake_target(hang_up)
    transport = GrpcTransport(address, "token", None,
                              MigrationOptions(timeout_ms=20_000))
    try:
        with pytest.raises(Unavailable, match=r"ended the migration \(accept\)"):
            transport.start("v")
    finally:
        transport.close()
        server.stop(None)
