"""Guest memory owned by the binding: memfd-backed shared mappings, one per slot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvmd.kvm._ffi import ffi, lib
from kvmd.kvm.errors import KvmError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Copies between Python and guest memory go in pieces so other threads get the GIL.
COPY_CHUNK = 4 << 20


def dirty_log_bitmap_size(size: int) -> int:
    """Bytes of dirty bitmap for a region of `size` bytes: one bit per page (as crosvm)."""
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    return (pages + 7) // 8


def round_up_to_page(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True)
class MemoryRegionInfo:
    """What a slot maps: guest physical range and flags."""

    slot: int
    guest_addr: int
    size: int
    read_only: bool
    log_dirty: bool

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemoryRegion:
    """One memfd and its MAP_SHARED mapping; owns both until `close()`.

    memfd (not anonymous) memory so the region can later be handed to another process
    (systemd fd store, migration) by its fd.
    """

    def __init__(self, info: MemoryRegionInfo, name: str) -> None:
        self.info = info
        self.memfd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.memfd, info.size)
            ptr = lib.mmap(ffi.NULL, info.size, lib.PROT_READ | lib.PROT_WRITE,
                           lib.MAP_SHARED | lib.MAP_NORESERVE, self.memfd, 0)
            if ptr == ffi.cast("void *", -1):
                raise KvmError(ffi.errno, "mmap", f"{info.size} bytes of guest memory")
        except BaseException:
            os.close(self.memfd)
            raise
        self.ptr: Any = ffi.cast("uint8_t *", ptr)

    @property
    def host_address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for done in range(0, length, COPY_CHUNK):
            n = min(COPY_CHUNK, length - done)
            out[done : done + n] = ffi.buffer(self.ptr + offset + done, n)
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for done in range(0, len(view), COPY_CHUNK):
            piece = view[done : done + COPY_CHUNK]
            ffi.memmove(self.ptr + offset + done, piece, len(piece))

    def msync(self, offset: int, size: int) -> None:
        if lib.msync(self.ptr + offset, size, lib.MS_SYNC) < 0:
            raise KvmError(ffi.errno, "msync")

    def close(self) -> None:
        if self.ptr != ffi.NULL:
            lib.munmap(self.ptr, self.info.size)
            self.ptr = ffi.NULL
            os.close(self.memfd)
            self.memfd = -1
