"""The one table from domain errors to gRPC status codes, and rich error details."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
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
    Reason,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unsupported,
    error_metadata,
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
#: The same table read the other way, for errors another daemon answers with (a migration's
#: target): the class each code stands for; INTERNAL stands for none (the caller decides).
DOMAIN_ERRORS: dict[grpc.StatusCode, type[DomainError]] = {
    code: cls for cls, code in STATUS_CODES.items() if code != grpc.StatusCode.INTERNAL}


def status_code(exc: DomainError | type[DomainError]) -> grpc.StatusCode:
    """The status code of a domain error (or error class): its nearest class in the table."""
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def reason_code(reason: Reason) -> grpc.StatusCode:
    """The one status code a reason is sent with (the code of its class)."""
    return status_code(reason.error)


def to_status(exc: BaseException) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status (AIP-193): an ErrorInfo with the error's
    specific reason, the daemon's domain and metadata naming the object (vm_id, vcpu_id,
    slot, limit, errno, ioctl, resource); for INVALID_ARGUMENT with a known field, a
    BadRequest with its field violation too."""
    if isinstance(exc, DomainError):
        code, message, reason = status_code(exc), exc.message, exc.reason
        metadata = error_metadata(exc)
    else:
        code, reason = grpc.StatusCode.INTERNAL, Reason.INTERNAL_ERROR
        message = f"internal error: {type(exc).__name__}: {exc}"
        metadata = {}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if isinstance(exc, InvalidArgument) and exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field,
                                                                description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details))
    retry = getattr(exc, "retry", "")
    if retry:
        # A refusal that did nothing (a hand-over's gate): `kvmd-retry` tells clients any
        # call may be retried, idempotent or not.
        status = _Status(status.code, status.details,
                         (*status.trailing_metadata, (RETRY_KEY, retry)))
    return status


RETRY_KEY = "kvmd-retry"


def _pack(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
