"""Exceptions raised by the kvmd client library.

Every failed RPC surfaces as a :class:`KvmdError` subclass chosen by its gRPC status code, from
one table (:data:`STATUS_TO_ERROR`): the inverse of the daemon's table from domain errors to
status codes, as googleapis ``python-api-core`` ``exceptions.py`` does it. The daemon's rich
error details (``google.rpc.ErrorInfo`` inside a ``google.rpc.Status``) are decoded into
:attr:`KvmdError.details`, :attr:`KvmdError.reason`, :attr:`KvmdError.errno` and
:attr:`KvmdError.ioctl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

__all__ = [
    "STATUS_TO_ERROR",
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "KvmdError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_for_code",
    "from_rpc_error",
]


class KvmdError(Exception):
    """A failed kvmd RPC.

    Attributes:
        code: the gRPC status code.
        message: the status message the daemon sent.
        details: ``google.rpc.ErrorInfo`` metadata (``errno``, ``ioctl``, ``resource``, ...), as
            strings; empty when the daemon sent no rich details.
        reason: the ``ErrorInfo`` reason (for example ``"NOT_FOUND"``, ``"KERNEL_ERROR"``), or
            None.
        domain: the ``ErrorInfo`` domain (``"kvmd"``), or None.
        errno: the kernel errno of a failed ioctl, when the daemon reported one.
        ioctl: the name of the failed ioctl, when the daemon reported one.
    """

    #: The status code this class stands for (the base class covers every other code).
    grpc_status_code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: Mapping[str, str] | None = None,
        reason: str | None = None,
        domain: str | None = None,
    ) -> None:
        super().__init__(message)
        resolved = code if code is not None else self.grpc_status_code
        self.code: grpc.StatusCode = resolved if resolved is not None else grpc.StatusCode.UNKNOWN
        self.message: str = message
        self.details: dict[str, str] = dict(details or {})
        self.reason: str | None = reason
        self.domain: str | None = domain
        self.errno: int | None = _int_or_none(self.details.get("errno"))
        self.ioctl: str | None = self.details.get("ioctl") or None

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"NOT_FOUND"``."""
        return str(self.code.name)

    def __str__(self) -> str:
        text = f"{self.code_name}: {self.message}"
        extra = []
        if self.ioctl:
            extra.append(f"ioctl={self.ioctl}")
        if self.errno is not None:
            extra.append(f"errno={self.errno}")
        return f"{text} ({', '.join(extra)})" if extra else text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code_name}, message={self.message!r}, "
            f"reason={self.reason!r}, details={self.details!r})"
        )


class InvalidArgumentError(KvmdError):
    """A bad argument, whatever the state (INVALID_ARGUMENT)."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KvmdError):
    """The VM, slot, vCPU, irqfd or ioevent does not exist (NOT_FOUND)."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KvmdError):
    """A resource with that caller-chosen id already exists (ALREADY_EXISTS)."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(KvmdError):
    """The resource is in the wrong state for the request (FAILED_PRECONDITION)."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(KvmdError):
    """A daemon limit was reached, or a message was too large (RESOURCE_EXHAUSTED)."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(KvmdError):
    """The caller is not allowed to do this (PERMISSION_DENIED)."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(KvmdError):
    """The caller could not be authenticated (UNAUTHENTICATED)."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class UnimplementedError(KvmdError):
    """The kernel lacks a capability, or the daemon lacks the RPC (UNIMPLEMENTED)."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(KvmdError):
    """An unexpected failure, usually a kernel error with errno and ioctl (INTERNAL)."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class UnavailableError(KvmdError):
    """The daemon cannot be reached (UNAVAILABLE)."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(KvmdError):
    """The call did not complete before its deadline (DEADLINE_EXCEEDED)."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(KvmdError):
    """The call was cancelled (CANCELLED)."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class AbortedError(KvmdError):
    """A concurrent call superseded this one (a resume cancelled a pause); retry (ABORTED)."""

    grpc_status_code = grpc.StatusCode.ABORTED


class UnknownOutcomeError(KvmdError):
    """The call may or may not have taken effect (UNKNOWN): e.g. a migration whose commit
    was sent but not confirmed; check before acting again."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class OutOfRangeError(KvmdError):
    """An offset or length past the end of a valid range (OUT_OF_RANGE)."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


#: The one table: gRPC status code -> exception class. Codes not listed map to KvmdError.
STATUS_TO_ERROR: dict[grpc.StatusCode, type[KvmdError]] = {
    cls.grpc_status_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        PermissionDeniedError,
        UnauthenticatedError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        AbortedError,
        UnknownOutcomeError,
        OutOfRangeError,
    )
    if cls.grpc_status_code is not None
}


def error_for_code(
    code: grpc.StatusCode,
    message: str,
    *,
    details: Mapping[str, str] | None = None,
    reason: str | None = None,
    domain: str | None = None,
) -> KvmdError:
    """Build the exception that stands for ``code`` (KvmdError for unlisted codes)."""
    cls = STATUS_TO_ERROR.get(code, KvmdError)
    return cls(message, code=code, details=details, reason=reason, domain=domain)


def from_rpc_error(error: grpc.RpcError) -> KvmdError:
    """Convert a ``grpc.RpcError`` into the matching :class:`KvmdError` subclass.

    The status code and message come from the call; ``google.rpc.ErrorInfo`` rich details, when
    the daemon attached them, fill in ``reason``, ``domain`` and ``details`` (and through them
    ``errno`` and ``ioctl``).
    """
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_fn() if callable(details_fn) else None
    if not isinstance(message, str):
        message = str(error) or code.name
    reason, domain, metadata = _error_info(error)
    return error_for_code(code, message, details=metadata, reason=reason, domain=domain)


def _error_info(error: grpc.RpcError) -> tuple[str | None, str | None, dict[str, str]]:
    """Decode the first ``google.rpc.ErrorInfo`` in the call's rich status, if any."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status: Any = rpc_status.from_call(error)  # type: ignore[arg-type]
    except Exception:  # not a call, or a malformed/mismatched status: no rich details
        return None, None, {}
    if status is None:
        return None, None, {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason or None, info.domain or None, dict(info.metadata)
    return None, None, {}


def _int_or_none(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    for base in (10, 0):
        try:
            return int(value, base)
        except ValueError:
            continue
    return None
