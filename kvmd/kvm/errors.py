"""The binding's one exception type."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """A failed KVM operation: the errno and the name of the ioctl (or operation) that failed.

    Validation failures detected in userspace (overlapping slots, unaligned addresses, an
    unknown irqfd) use the errno the kernel would have given, so callers handle both alike.
    """

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        message = f"{ioctl}: {os.strerror(err)}"
        if detail:
            message += f" ({detail})"
        super().__init__(err, message)
        self.ioctl = ioctl
        self.detail = detail

    def __reduce__(self) -> tuple[type[KvmError], tuple[int, str, str]]:
        return (type(self), (self.errno or 0, self.ioctl, self.detail))


def check(ret: int, ioctl: str, detail: str = "") -> int:
    """Raise KvmError for a negative return from a C helper (which returns -errno)."""
    if ret < 0:
        raise KvmError(-ret, ioctl, detail)
    return ret


def invalid(op: str, detail: str, err: int = _errno.EINVAL) -> KvmError:
    """A KvmError for an argument refused before reaching the kernel."""
    return KvmError(err, op, detail)
