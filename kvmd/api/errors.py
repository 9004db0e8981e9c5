"""The one table from domain errors to gRPC status codes, and rich error details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from kvmd.core.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    InvalidArgument,
    InvalidState,
    KernelError,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

log = logging.getLogger(__name__)

DOMAIN = "kvmd"

STATUS_CODES: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    InvalidState: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    OutcomeUnknown: grpc.StatusCode.UNKNOWN,
    KernelError: grpc.StatusCode.INTERNAL,
}


def status_code(exc: DomainError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status with an ErrorInfo (errno, ioctl, resource)."""
    if isinstance(exc, DomainError):
        code, message, reason = status_code(exc), exc.message, exc.reason
        metadata = {}
        if exc.errno is not None:
            metadata["errno"] = str(exc.errno)
        if exc.ioctl:
            metadata["ioctl"] = exc.ioctl
        if exc.resource:
            metadata["resource"] = exc.resource
    else:
        code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
        message = f"internal error: {type(exc).__name__}: {exc}"
        metadata = {}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    retry = getattr(exc, "retry", "")
    if retry:
        # A refusal that did nothing (a hand-over's gate): `kvmd-retry` tells clients any
        # call may be retried, idempotent or not.
        status = _Status(status.code, status.details,
                         (*status.trailing_metadata, (RETRY_KEY, retry)))
    return status


RETRY_KEY = "kvmd-retry"


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
