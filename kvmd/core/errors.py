"""Domain errors of the VMM core. The API layer maps each class to one gRPC status code."""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum, auto
from typing import Any

from kvmd.kvm import KvmError


class DomainError(Exception):
    """Base of every error the core reports to callers.

    `reason` is the stable, specific AIP-193 reason (a `Reason`): given at the raise site, or
    derived from the class and the kind of `resource` ("vm/a/vcpu/0" -> VCPU_NOT_FOUND for a
    NotFound). `field` names the request field at fault (INVALID_ARGUMENT's field
    violation). `errno`/`ioctl` are set when the error came from the kernel; `metadata`
    adds what else identifies the object (a limit's name and value)."""

    #: The reason when neither the raise site nor the resource gives one.
    default_reason: Reason

    def __init__(self, message: str, *, reason: Reason | None = None,
                 field: str | None = None, errno: int | None = None, ioctl: str | None = None,
                 resource: str | None = None, metadata: Mapping[str, object] | None = None
                 ) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.ioctl = ioctl
        self.resource = resource
        self.field = field
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}
        self.reason: Reason = reason if reason is not None else self._derive_reason()

    def _derive_reason(self) -> Reason:
        kind = resource_kind(self.resource)
        for cls in type(self).__mro__:
            found = _KIND_REASONS.get((cls, kind)) if kind else None
            if found is not None:
                return found
        return type(self).default_reason


class InvalidArgument(DomainError):
    """The request is wrong whatever the state: bad id, unaligned address, bad length."""


class NotFound(DomainError):
    """The named VM, vCPU, slot, irqfd or ioevent does not exist."""


class AlreadyExists(DomainError):
    """A resource with that id (or an overlapping one) already exists."""


class InvalidState(DomainError):
    """The resource is in the wrong state for the request (e.g. set regs while running)."""


class Aborted(DomainError):
    """A concurrent request superseded this one (a resume cancelled a pause in flight);
    retrying is safe."""


class ResourceExhausted(DomainError):
    """A limit of this daemon or of KVM has been reached."""


class PermissionDenied(DomainError):
    """The caller may not do this."""


class Unauthenticated(DomainError):
    """The caller presented no identity."""


class Unsupported(DomainError):
    """The kernel lacks a capability the request needs."""


class DeadlineExceeded(DomainError):
    """Something the request waited on did not happen in time (a remote handler's reply)."""


class Unavailable(DomainError):
    """Another daemon this request needs (a migration's target) cannot be reached, or was
    lost; nothing was changed here, retrying may work."""


class OutcomeUnknown(DomainError):
    """The request may or may not have taken effect elsewhere (a migration's commit sent,
    its answer lost): the caller must check before acting again."""


class KernelError(DomainError):
    """An unexpected failure of a KVM ioctl (errno and ioctl name attached)."""


class Reason(StrEnum):
    """Every `google.rpc.ErrorInfo.reason` the daemon sends (AIP-193): UPPER_SNAKE, specific,
    stable. Each belongs to one DomainError class, so to one status code; the README's
    "Errors" table lists them all (a test checks it). Members are (auto(): the value is the
    name, class, meaning)."""

    error: type[DomainError]
    doc: str

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]
                              ) -> str:
        return name  # each value is its member's name

    def __new__(cls, value: str, error: type[DomainError], doc: str) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.error = error
        member.doc = doc
        return member

    # -- INVALID_ARGUMENT: wrong whatever the state; a BadRequest names the field -----------
    FIELD_REQUIRED = (auto(), InvalidArgument,
                      "a required field is empty (the field violation names it)")
    ID_INVALID = (auto(), InvalidArgument,
                  "an id is not 1-64 characters of A-Z a-z 0-9 . _ -, starting with a "
                  "letter or digit")
    VALUE_OUT_OF_RANGE = (auto(), InvalidArgument,
                          "a number, count or length is outside what the field allows")
    VALUE_UNKNOWN = (auto(), InvalidArgument,
                     "an enum value or mode name this daemon does not know")
    ARGUMENTS_CONFLICT = (auto(), InvalidArgument,
                          "fields that cannot go together (a PIT without an irqchip, "
                          "entries and use_supported, a duplicate MSR, overlapping ranges)")
    ADDRESS_UNALIGNED = (auto(), InvalidArgument,
                         "an address, offset or size is not a multiple of the page size")
    RANGE_OUTSIDE_MEMORY = (auto(), InvalidArgument,
                            "a guest range is not entirely inside guest memory, a slot or "
                            "a memory file")
    SLOT_NOT_LOGGED = (auto(), InvalidArgument,
                       "the slot was added without dirty logging")
    PAGE_TOKEN_INVALID = (auto(), InvalidArgument,
                          "page_token is not one this daemon gave")
    FILE_NAME_INVALID = (auto(), InvalidArgument,
                         "a memory or snapshot file name is empty, absolute, leaves its "
                         "directory, or names something other than a regular file")
    STREAM_INVALID = (auto(), InvalidArgument,
                      "a stream's messages come in the wrong order or do not belong "
                      "together")
    SNAPSHOT_CORRUPT = (auto(), InvalidArgument,
                        "snapshot or hand-over bytes are not a well-formed, intact kvmd "
                        "snapshot")
    STATE_INVALID = (auto(), InvalidArgument,
                     "a saved CPU or device state field is malformed (wrong count, out of "
                     "range)")
    TARGET_INVALID = (auto(), InvalidArgument,
                      "a migration target is not host:port")
    MIGRATION_TOKEN_REFUSED = (auto(), InvalidArgument,
                               "the migration target refused the token")
    KERNEL_REJECTED = (auto(), InvalidArgument,
                       "KVM refused the arguments (EINVAL, EFAULT, ...; errno and ioctl in "
                       "metadata)")
    # -- NOT_FOUND ------------------------------------------------------------------------
    VM_NOT_FOUND = (auto(), NotFound,
                    "no VM with that id (or one the caller may not see)")
    VCPU_NOT_FOUND = (auto(), NotFound, "the VM has no vCPU with that index")
    SLOT_NOT_FOUND = (auto(), NotFound,
                      "no memory slot with that number, or no memory file mapped there")
    IRQFD_NOT_FOUND = (auto(), NotFound, "the VM has no irqfd with that id")
    IOEVENT_NOT_FOUND = (auto(), NotFound, "the VM has no ioevent with that id")
    SNAPSHOT_NOT_FOUND = (auto(), NotFound,
                          "no snapshot file with that name in the state directory")
    MIGRATION_NOT_FOUND = (auto(), NotFound,
                           "the VM has no migration in progress")
    STRANDED_VM_NOT_FOUND = (auto(), NotFound,
                             "no stranded VM (left by a hand-over) with that id")
    FILE_NOT_FOUND = (auto(), NotFound, "no such file in the images directory")
    KERNEL_NOT_FOUND = (auto(), NotFound,
                        "KVM answered ENOENT (errno and ioctl in metadata)")
    # -- ALREADY_EXISTS -------------------------------------------------------------------
    VM_ALREADY_EXISTS = (auto(), AlreadyExists, "a VM with that id exists")
    VCPU_ALREADY_EXISTS = (auto(), AlreadyExists,
                           "the VM has a vCPU with that index")
    IRQFD_ALREADY_EXISTS = (auto(), AlreadyExists,
                            "the VM has an irqfd with that id")
    IOEVENT_ALREADY_EXISTS = (auto(), AlreadyExists,
                              "the VM has an ioevent with that id")
    SNAPSHOT_ALREADY_EXISTS = (auto(), AlreadyExists,
                               "a snapshot file with that name exists")
    SLOT_OVERLAP = (auto(), AlreadyExists,
                    "the memory region or file mapping overlaps one that exists")
    ADDRESS_IN_USE = (auto(), AlreadyExists,
                      "a PIO/MMIO range is owned already (a device, a claim, an ioevent)")
    KERNEL_CONFLICT = (auto(), AlreadyExists,
                       "KVM answered EEXIST or EBUSY (errno and ioctl in metadata)")
    # -- FAILED_PRECONDITION: the state is wrong for the request --------------------------
    VM_RUNNING = (auto(), InvalidState,
                  "the VM (or the vCPU in metadata) runs: pause or stop it first")
    VM_NOT_RUNNING = (auto(), InvalidState,
                      "only a running VM or vCPU can be paused")
    VM_NOT_PAUSED = (auto(), InvalidState,
                     "only a paused (or halted) VM or vCPU can be resumed")
    VM_STOPPED = (auto(), InvalidState,
                  "the VM or vCPU is stopped or crashed already")
    VM_NO_VCPUS = (auto(), InvalidState, "the VM has no vCPUs to start")
    VM_BUSY = (auto(), InvalidState,
               "the VM is held for a snapshot or migration, or a vCPU is being started: "
               "retry when it is done")
    VM_MIGRATING = (auto(), InvalidState,
                    "the VM migrates (or its migration is past switch-over): cancel first")
    VM_NOT_NEW = (auto(), InvalidState,
                  "state restores only into a new VM or vCPU that has not run")
    IRQCHIP_MODE = (auto(), InvalidState,
                    "the VM's in-kernel irqchip setting does not allow this")
    DIRTY_MODE = (auto(), InvalidState,
                  "the VM's dirty tracking mode or slots do not allow this")
    SLOT_FILE_CONFLICT = (auto(), InvalidState,
                          "a memory file mapping is in the way, missing, or needs a "
                          "read-only slot")
    FILE_NOT_WRITABLE = (auto(), InvalidState,
                         "the memory file cannot be opened read-write")
    FEATURE_DISABLED = (auto(), InvalidState,
                        "the daemon runs without what this needs (--images-dir, "
                        "--state-dir, migration TLS)")
    SNAPSHOT_INCOMPATIBLE = (auto(), InvalidState,
                             "the snapshot does not fit this host, daemon or base (format "
                             "version, page size, XSAVE size, diff base, memory files)")
    HANDOVER_STATE_UNUSABLE = (auto(), InvalidState,
                               "a stranded VM's memory was not passed or does not match")
    RESTORE_NOT_READY = (auto(), InvalidState,
                         "the restore has ended, or is not ready to commit")
    DAEMON_STOPPING = (auto(), InvalidState,
                       "the daemon is stopping and starts nothing new")
    MIGRATION_FAILED = (auto(), InvalidState,
                        "the migration did not converge, or the target answered out of "
                        "turn; the VM runs on here")
    KERNEL_WRONG_STATE = (auto(), InvalidState,
                          "KVM answered EBADF or EACCES (errno and ioctl in metadata)")
    # -- ABORTED -------------------------------------------------------------------------
    CONCURRENT_CHANGE = (auto(), Aborted,
                         "another call superseded this one (a resume during a pause): retry")
    MIGRATION_CANCELLED = (auto(), Aborted,
                           "the migration was cancelled or its stream ended early")
    # -- RESOURCE_EXHAUSTED: metadata `limit` (the option) and `limit_value` -------------
    LIMIT_VMS = (auto(), ResourceExhausted, "max_vms, or the caller's VM quota")
    LIMIT_VCPUS = (auto(), ResourceExhausted, "max_vcpus_per_vm")
    LIMIT_MEMORY_SLOTS = (auto(), ResourceExhausted, "max_memory_slots_per_vm")
    LIMIT_VM_MEMORY = (auto(), ResourceExhausted, "max_memory_per_vm_bytes")
    LIMIT_GUEST_MEMORY = (auto(), ResourceExhausted,
                          "max_memory_total_bytes, all VMs together")
    LIMIT_IRQFDS = (auto(), ResourceExhausted, "max_irqfds_per_vm")
    LIMIT_IOEVENTS = (auto(), ResourceExhausted, "max_ioevents_per_vm")
    LIMIT_FDS = (auto(), ResourceExhausted,
                 "max_fds or max_fds_per_identity (file descriptors VM objects hold)")
    LIMIT_STREAMS = (auto(), ResourceExhausted,
                     "max_streams or max_streams_per_identity")
    LIMIT_CALLS = (auto(), ResourceExhausted,
                   "max_calls_per_identity, or the calls kept for admins")
    LIMIT_CLAIMS = (auto(), ResourceExhausted, "remote exit handlers per VM")
    LIMIT_MIGRATIONS = (auto(), ResourceExhausted,
                        "migrations running, or incoming migrations prepared")
    LIMIT_MESSAGE = (auto(), ResourceExhausted,
                     "max_message_bytes: the answer could not fit one message (PollDirtyLog "
                     "of a slot too large for it; GetDirtyLog streams any size)")
    CONSOLE_FULL = (auto(), ResourceExhausted,
                    "the console input buffer has no room for the data")
    HOST_EXHAUSTED = (auto(), ResourceExhausted,
                      "the host ran out (memory, threads, file descriptors, disk space)")
    # -- PERMISSION_DENIED / UNAUTHENTICATED ---------------------------------------------
    PERMISSION_DENIED_ROLE = (auto(), PermissionDenied,
                              "the caller's role (none, viewer, operator) does not allow "
                              "the method")
    VM_ID_RESERVED = (auto(), PermissionDenied,
                      "the caller may not create a VM with that id (another identity's "
                      "prefix, or outside its own)")
    FILE_ACCESS_DENIED = (auto(), PermissionDenied,
                          "the memory file leads outside the images directory or may not "
                          "be opened")
    MIGRATION_TOKEN_INVALID = (auto(), PermissionDenied,
                               "the migration token is unknown, used or expired")
    IDENTITY_MISSING = (auto(), Unauthenticated,
                        "no client identity (use the Unix socket or a client certificate)")
    # -- UNIMPLEMENTED / DEADLINE_EXCEEDED / UNAVAILABLE / UNKNOWN / INTERNAL ------------
    CAPABILITY_MISSING = (auto(), Unsupported,
                          "the kernel lacks a KVM capability the request needs")
    HANDLER_DEADLINE_MISSED = (auto(), DeadlineExceeded,
                               "a remote exit handler did not reply in time")
    PEER_TIMEOUT = (auto(), DeadlineExceeded,
                    "the other daemon of a migration went silent")
    PEER_UNAVAILABLE = (auto(), Unavailable,
                        "the migration target cannot be reached or stopped answering")
    HANDOVER_IN_PROGRESS = (auto(), Unavailable,
                            "the daemon hands over to a new process: retry (any call)")
    MIGRATION_OUTCOME_UNKNOWN = (auto(), OutcomeUnknown,
                                 "the commit was sent, its answer lost: the VM may run on "
                                 "the target")
    KERNEL_ERROR = (auto(), KernelError,
                    "an unexpected failure of a system call (errno and ioctl in metadata)")
    VCPU_UNRESPONSIVE = (auto(), KernelError,
                         "a vCPU thread did not pause or stop in time")
    INTERNAL_ERROR = (auto(), KernelError,
                      "a daemon bug: an exception that is no domain error")


# The reason of a class when the raise site gives none and the resource kind says nothing.
# Kernel-derived errors (from_os_error) land here; every raise site in kvmd names a reason
# or a resource whose kind decides (tests/api/test_api_reasons.py walks them).
InvalidArgument.default_reason = Reason.KERNEL_REJECTED
NotFound.default_reason = Reason.KERNEL_NOT_FOUND
AlreadyExists.default_reason = Reason.KERNEL_CONFLICT
InvalidState.default_reason = Reason.KERNEL_WRONG_STATE
Aborted.default_reason = Reason.CONCURRENT_CHANGE
ResourceExhausted.default_reason = Reason.HOST_EXHAUSTED
PermissionDenied.default_reason = Reason.PERMISSION_DENIED_ROLE
Unauthenticated.default_reason = Reason.IDENTITY_MISSING
Unsupported.default_reason = Reason.CAPABILITY_MISSING
DeadlineExceeded.default_reason = Reason.PEER_TIMEOUT
Unavailable.default_reason = Reason.PEER_UNAVAILABLE
OutcomeUnknown.default_reason = Reason.MIGRATION_OUTCOME_UNKNOWN
KernelError.default_reason = Reason.KERNEL_ERROR
DomainError.default_reason = Reason.INTERNAL_ERROR

# (class, resource kind) -> reason, for errors raised with a resource and no reason.
_KIND_REASONS: dict[tuple[type[DomainError], str], Reason] = {
    (NotFound, "vm"): Reason.VM_NOT_FOUND,
    (NotFound, "vcpu"): Reason.VCPU_NOT_FOUND,
    (NotFound, "slot"): Reason.SLOT_NOT_FOUND,
    (NotFound, "irqfd"): Reason.IRQFD_NOT_FOUND,
    (NotFound, "ioevent"): Reason.IOEVENT_NOT_FOUND,
    (NotFound, "snapshot"): Reason.SNAPSHOT_NOT_FOUND,
    (NotFound, "migration"): Reason.MIGRATION_NOT_FOUND,
    (NotFound, "stranded"): Reason.STRANDED_VM_NOT_FOUND,
    (NotFound, "images"): Reason.FILE_NOT_FOUND,
    (AlreadyExists, "vm"): Reason.VM_ALREADY_EXISTS,
    (AlreadyExists, "vcpu"): Reason.VCPU_ALREADY_EXISTS,
    (AlreadyExists, "slot"): Reason.SLOT_OVERLAP,
    (AlreadyExists, "irqfd"): Reason.IRQFD_ALREADY_EXISTS,
    (AlreadyExists, "ioevent"): Reason.IOEVENT_ALREADY_EXISTS,
    (AlreadyExists, "snapshot"): Reason.SNAPSHOT_ALREADY_EXISTS,
}

# Resource paths are "vm/<id>[/<kind>/<name>]", "stranded/<id>", "images/<path>", "fds":
# the kinds whose name runs to the end of the path (a file path may hold slashes).
_TAIL_KINDS = frozenset({"images", "stranded", "snapshot"})
# kind -> the ErrorInfo metadata key its name goes under.
_KIND_KEYS = {"vm": "vm_id", "vcpu": "vcpu_id", "slot": "slot", "irqfd": "irqfd_id",
              "ioevent": "ioevent_id", "stranded": "vm_id", "images": "file",
              "snapshot": "snapshot"}


def resource_parts(resource: str | None) -> list[tuple[str, str]]:
    """("vm", "a"), ("vcpu", "0") for "vm/a/vcpu/0": the kinds and names of a resource
    path, outermost first; a kind without a name ("fds") gets ""."""
    if not resource:
        return []
    parts, out = resource.split("/"), []
    i = 0
    while i < len(parts):
        kind = parts[i]
        if kind in _TAIL_KINDS:
            out.append((kind, "/".join(parts[i + 1:])))
            break
        out.append((kind, parts[i + 1] if i + 1 < len(parts) else ""))
        i += 2
    return out


def resource_kind(resource: str | None) -> str:
    """The innermost kind of a resource path ("vcpu" for "vm/a/vcpu/0"), or ""."""
    parts = resource_parts(resource)
    return parts[-1][0] if parts else ""


def error_metadata(exc: DomainError) -> dict[str, str]:
    """The ErrorInfo metadata of `exc`: what identifies the object (vm_id, vcpu_id, slot,
    irqfd_id, ioevent_id, file, snapshot), `resource`, `errno` and `ioctl` when the kernel
    failed, and what the raise site added (`limit`, `limit_value`). All strings."""
    metadata: dict[str, str] = {}
    for kind, name in resource_parts(exc.resource):
        key = _KIND_KEYS.get(kind)
        if key and name:
            metadata[key] = name
    if exc.errno is not None:
        metadata["errno"] = str(exc.errno)
    if exc.ioctl:
        metadata["ioctl"] = exc.ioctl
    if exc.resource:
        metadata["resource"] = exc.resource
    metadata.update(exc.metadata)
    return metadata


def limit(name: str, value: object) -> dict[str, object]:
    """ErrorInfo metadata naming a daemon limit (its config key) and its value."""
    return {"limit": name, "limit_value": value}


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


# (errno, ioctl) -> reason, where the kernel's (or the binding's) answer means one thing.
_KERNEL_REASONS: dict[tuple[int, str], Reason] = {
    (_errno.EEXIST, "KVM_SET_USER_MEMORY_REGION"): Reason.SLOT_OVERLAP,
    (_errno.EEXIST, "map_fd"): Reason.SLOT_OVERLAP,
    (_errno.EEXIST, "KVM_IOEVENTFD"): Reason.ADDRESS_IN_USE,
    # The binding's own guest-memory accesses answer EFAULT for a range no slot backs.
    **{(_errno.EFAULT, op): Reason.RANGE_OUTSIDE_MEMORY
       for op in ("read", "write", "msync", "discard", "guest memory")},
}


def _kernel_reason(cls: type[DomainError], errno: int | None, ioctl: str | None,
                   resource: str | None) -> Reason:
    """The reason of an errno turned into `cls`: what (errno, ioctl) means, else the kind of
    an object inside a VM (ENOENT on "vm/a/slot/3" is SLOT_NOT_FOUND), else the class's
    kernel reason. Never the VM's own kind: EEXIST from an ioctl on a VM does not mean
    "a VM with that id exists"."""
    found = _KERNEL_REASONS.get((errno or 0, ioctl or ""))
    if found is not None and issubclass(cls, found.error):
        return found
    kind = resource_kind(resource)
    if kind not in ("", "vm"):
        found = _KIND_REASONS.get((cls, kind))
        if found is not None:
            return found
    return cls.default_reason


def argument_rule(check: Callable[[], object], *, field: str, reason: Reason) -> None:
    """Apply one of the KVM binding's argument rules (kvmd.kvm: alignment, sizes, lengths)
    to a request field before anything else is looked at: the binding owns the rule, this
    layer knows which field of the request it was, and says so (BadRequest)."""
    try:
        check()
    except KvmError as exc:
        raise InvalidArgument(str(exc), reason=reason, field=field, errno=exc.errno,
                              ioctl=exc.ioctl) from None


def from_kvm_error(exc: KvmError, resource: str | None = None) -> DomainError:
    """Translate a binding error into the domain error a caller should see."""
    cls = _ERRNO_CLASSES.get(exc.errno or 0, KernelError)
    return cls(str(exc), reason=_kernel_reason(cls, exc.errno, exc.ioctl, resource),
               errno=exc.errno, ioctl=exc.ioctl, resource=resource)


def from_os_error(exc: OSError, resource: str | None = None) -> DomainError:
    """A failed system call outside the KVM binding (memfd_create, eventfd, epoll, dup,
    open): the same errno table, named after the call where Python knows it."""
    if isinstance(exc, KvmError):
        return from_kvm_error(exc, resource)
    cls = _ERRNO_CLASSES.get(exc.errno or 0, KernelError)
    what = exc.strerror or str(exc)
    return cls(f"{what}" + (f" ({exc.filename})" if exc.filename else ""),
               reason=_kernel_reason(cls, exc.errno, None, resource), errno=exc.errno,
               resource=resource)


@contextmanager
def kernel_errors(resource: str) -> Iterator[None]:
    """Turn binding errors, and any failed system call (OSError), raised inside the block
    into domain errors naming `resource`."""
    try:
        yield
    except OSError as exc:
        raise from_os_error(exc, resource) from exc
