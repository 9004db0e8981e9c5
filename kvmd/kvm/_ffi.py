"""Access to the compiled cffi module and a checked ioctl wrapper."""

from __future__ import annotations

from typing import Any

from kvmd.kvm.errors import KvmError

try:
    from kvmd.kvm._kvm_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "kvmd's KVM binding is not compiled; install the package (make install)"
    ) from exc

__all__ = ["ffi", "ioctl", "lib"]


def ioctl(fd: int, name: str, arg: Any = 0) -> int:
    """Issue the ioctl `name` (a KVM_* macro of the header) on fd; raise KvmError on failure.

    cffi releases the GIL around the call, so a blocking ioctl never stalls other threads.
    """
    request = getattr(lib, name)
    if isinstance(arg, int):
        ret = lib.ioctl(fd, request, ffi.cast("unsigned long", arg))
    else:
        ret = lib.ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(ffi.errno, name)
    return int(ret)
