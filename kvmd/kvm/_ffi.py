"""Access to the compiled cffi module and a checked ioctl wrapper."""

from __future__ import annotations

import errno
from typing import Any

from kvmd.kvm.errors import KvmError

try:
    from kvmd.kvm._kvm_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "kvmd's KVM binding is not compiled; install the package (make install)"
    ) from exc

__all__ = ["ffi", "ioctl", "lib", "new_uncleared"]

#: `ffi.new` without the clearing: for buffers C fills before anything reads them. Clearing
#: a large one writes (and here faults in) every page of it, for bytes never read.
new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def ioctl(fd: int, name: str, arg: Any = 0) -> int:
    """Issue the ioctl `name` (a KVM_* macro of the header) on fd; raise KvmError on failure.

    cffi releases the GIL around the call, so a blocking ioctl never stalls other threads.
    A call a signal interrupted (EINTR: a SIGHUP or a profiler landing on this thread while
    KVM_CREATE_VM waits) is made again, as Python's own system calls are (PEP 475); KVM_RUN,
    where EINTR is the kick, never goes through here.
    """
    request = getattr(lib, name)
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    while True:
        ret = lib.ioctl(fd, request, arg)
        if ret >= 0:
            return int(ret)
        err = ffi.errno
        if err != errno.EINTR or name == "KVM_RUN":
            raise KvmError(err, name)
