"""Domain errors of the VMM core. The API layer maps each class to one gRPC status code."""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterator
from contextlib import contextmanager

from kvmd.kvm import KvmError


class DomainError(Exception):
    """Base of every error the core reports to callers. `errno`/`ioctl` are set when the
    error came from the kernel."""

    reason = "ERROR"

    def __init__(self, message: str, *, errno: int | None = None, ioctl: str | None = None,
                 resource: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.ioctl = ioctl
        self.resource = resource


class InvalidArgument(DomainError):
    """The request is wrong whatever the state: bad id, unaligned address, bad length."""

    reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    """The named VM, vCPU, slot, irqfd or ioevent does not exist."""

    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    """A resource with that id (or an overlapping one) already exists."""

    reason = "ALREADY_EXISTS"


class InvalidState(DomainError):
    """The resource is in the wrong state for the request (e.g. set regs while running)."""

    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    """A concurrent request superseded this one (a resume cancelled a pause in flight);
    retrying is safe."""

    reason = "ABORTED"


class ResourceExhausted(DomainError):
    """A limit of this daemon or of KVM has been reached."""

    reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(DomainError):
    """The caller may not do this."""

    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    """The caller presented no identity."""

    reason = "UNAUTHENTICATED"


class Unsupported(DomainError):
    """The kernel lacks a capability the request needs."""

    reason = "UNIMPLEMENTED"


class DeadlineExceeded(DomainError):
    """Something the request waited on did not happen in time (a remote handler's reply)."""

    reason = "DEADLINE_EXCEEDED"


class Unavailable(DomainError):
    """Another daemon this request needs (a migration's target) cannot be reached, or was
    lost; nothing was changed here, retrying may work."""

    reason = "UNAVAILABLE"


class OutcomeUnknown(DomainError):
    """The request may or may not have taken effect elsewhere (a migration's commit sent,
    its answer lost): the caller must check before acting again."""

    reason = "UNKNOWN"


class KernelError(DomainError):
    """An unexpected failure of a KVM ioctl (errno and ioctl name attached)."""

    reason = "KERNEL_ERROR"


# errno of a KvmError -> domain error class. The binding reports userspace validation with
# the errno the kernel would use, so one table serves both.
_ERRNO_CLASSES: dict[int, type[DomainError]] = {
    _errno.EINVAL: InvalidArgument,
    _errno.EFAULT: InvalidArgument,
    _errno.EOVERFLOW: InvalidArgument,
    _errno.E2BIG: InvalidArgument,
    _errno.ERANGE: InvalidArgument,
    _errno.ENOENT: NotFound,
    _errno.EEXIST: AlreadyExists,
    _errno.EBUSY: AlreadyExists,
    _errno.ENOSPC: ResourceExhausted,
    _errno.ENOMEM: ResourceExhausted,
    _errno.EMFILE: ResourceExhausted,
    _errno.ENFILE: ResourceExhausted,
    _errno.ENXIO: Unsupported,
    _errno.ENODEV: Unsupported,
    _errno.ENOTTY: Unsupported,
    _errno.EBADF: InvalidState,
    _errno.EACCES: InvalidState,  # a host write where a file is mapped read-only
}


# What the host running out looks like, from any system call: a limit, never a daemon bug.
EXHAUSTION_ERRNOS = frozenset({_errno.ENOMEM, _errno.ENOSPC, _errno.EMFILE, _errno.ENFILE})


def from_kvm_error(exc: KvmError, resource: str | None = None) -> DomainError:
    """Translate a binding error into the domain error a caller should see."""
    cls = _ERRNO_CLASSES.get(exc.errno or 0, KernelError)
    return cls(str(exc), errno=exc.errno, ioctl=exc.ioctl, resource=resource)


def from_os_error(exc: OSError, resource: str | None = None) -> DomainError:
    """A failed system call outside the KVM binding (memfd_create, eventfd, epoll, dup,
    open): the same errno table, named after the call where Python knows it."""
    if isinstance(exc, KvmError):
        return from_kvm_error(exc, resource)
    cls = _ERRNO_CLASSES.get(exc.errno or 0, KernelError)
    what = exc.strerror or str(exc)
    return cls(f"{what}" + (f" ({exc.filename})" if exc.filename else ""), errno=exc.errno,
               resource=resource)


@contextmanager
def kernel_errors(resource: str) -> Iterator[None]:
    """Turn binding errors, and any failed system call (OSError), raised inside the block
    into domain errors naming `resource`."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, resource) from exc
