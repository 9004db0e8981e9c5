"""The kvmd Python client library and the kvmctl CLI.

``KvmdClient`` wraps every kvmd.v1 RPC with a typed method; failures raise the
``kvmd_client.errors.KvmdError`` subclass of their status code.
"""

from kvmd_client.errors import (
    STATUS_TO_ERROR,
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KvmdError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownOutcomeError,
    from_rpc_error,
)
from kvmd_client.kvmd_client import (
    DEFAULT_ADDRESS,
    DirtyLog,
    ExitHandlerSession,
    KvmdClient,
    Watch,
    address_range,
    irqchip_route,
    msi_route,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "STATUS_TO_ERROR",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "DirtyLog",
    "ExitHandlerSession",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "KvmdClient",
    "KvmdError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownOutcomeError",
    "Watch",
    "address_range",
    "from_rpc_error",
    "irqchip_route",
    "msi_route",
]
