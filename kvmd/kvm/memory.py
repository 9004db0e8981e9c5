"""Guest memory owned by the binding: memfd-backed shared mappings, one per slot."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import Any

from kvmd.kvm._ffi import ffi, lib
from kvmd.kvm.errors import KvmError, check

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


@dataclass(frozen=True)
class FileBacking:
    """A slot's memory taken from part of a file (by reference: a disk image, a ROM, a
    snapshot's memory file), mapped MAP_SHARED so guest writes reach the file (durably after
    `Vm.msync_memory_region`). `offset` is where the slot starts in the file (page aligned).
    Not `writable`: the file is mapped read-only and the slot is KVM_MEM_READONLY, so guest
    writes become MMIO exits. The Vm dups `fd`; the caller keeps (and closes) its own.

    The file must stay at least offset+size long while mapped: KVM cannot report a later
    truncation, and an access past the end of a file is SIGBUS."""

    fd: int
    offset: int = 0
    writable: bool = True


@dataclass(frozen=True)
class MemfdBacking:
    """A slot's memory taken from an existing memfd, starting at `offset`: guest RAM handed
    over from another process (daemon take-over), kept as the slot's own memory (copied by
    snapshots, freed by `Vm.discard`). The Vm dups `fd`; the caller keeps (and closes) its
    own, so the memory lives as long as either holds it."""

    fd: int
    offset: int = 0


@dataclass(frozen=True)
class FileMapping:
    """A file range mapped into guest memory: a whole slot (`FileBacking`) or an overlay
    made with `Vm.map_fd`. What a snapshot records by reference instead of copying: the file
    (`path` as it was named when mapped, and its `device`/`inode`), `fd_offset` in it, and
    where it lies in the slot (`offset`, `size`) and in the guest (`guest_addr`)."""

    slot: int
    guest_addr: int
    offset: int
    size: int
    fd_offset: int
    writable: bool
    path: str
    device: int
    inode: int


def _file_io(call: Any, fd: int, position: int, view: memoryview) -> None:
    """preadv/pwritev all of `view` at `position`, in COPY_CHUNK pieces (the GIL is free
    during each call); a short count continues, end of file is EFAULT."""
    done = 0
    while done < len(view):
        piece = view[done : done + COPY_CHUNK]
        n = call(fd, [piece], position + done)
        if n <= 0:
            raise KvmError(errno.EFAULT, "guest memory", f"end of the backing file at "
                           f"{position + done:#x}")
        done += n


class GuestMemoryRegion:
    """One slot's memory: a shared mapping of a file (by default a new memfd) and the fds
    it maps; owns both until `close()`.

    memfd (not anonymous) memory so the region can later be handed to another process
    (systemd fd store, migration) by its fd. `from_fd` maps an existing file instead. Parts
    of the range may be overlaid by other files (`map_fd`), each owned here too.
    """

    def __init__(self, info: MemoryRegionInfo, name: str) -> None:
        self.info = info
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.fd_offset = 0
        self.writable = True
        self.is_file = False
        self._overlays: dict[int, tuple[FileMapping, int]] = {}  # offset -> (mapping, fd)
        try:
            os.ftruncate(self.fd, info.size)
            self.ptr: Any = ffi.cast("uint8_t *", _mmap(ffi.NULL, info.size, True, self.fd, 0,
                                                      "guest memory"))
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def from_fd(cls, info: MemoryRegionInfo, fd: int, offset: int = 0, writable: bool = True,
                is_file: bool = False) -> GuestMemoryRegion:
        """Map `info.size` bytes of an existing file from `offset`, on a dup of `fd` (the
        caller keeps its own). `is_file`: memory by reference (`FileBacking`), else guest
        RAM (`MemfdBacking`). Refuses a closed fd (EBADF), an unaligned offset, a file
        that is not a regular file or is shorter than offset+size (EINVAL)."""
        op = "mmap"
        dup = _dup_file(op, fd, offset, info.size)
        self = cls.__new__(cls)
        self.info = info
        self.fd = dup
        self.fd_offset = offset
        self.writable = writable
        self.is_file = is_file
        self._overlays = {}
        try:
            self.ptr = ffi.cast("uint8_t *", _mmap(ffi.NULL, info.size, writable, dup, offset,
                                                 "guest memory"))
        except BaseException:
            os.close(dup)
            raise
        return self

    @property
    def memfd(self) -> int:
        """The fd this region maps (a memfd unless `from_fd` was given another file)."""
        return self.fd

    @property
    def host_address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ptr))

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.read_into(offset, memoryview(out))
        return bytes(out)

    def mapped(self, offset: int, length: int) -> Any:
        """A buffer over [offset, offset+length) of the mapping itself (no copy): valid
        while the region stays mapped; reading a hole of the memfd through it allocates
        that page (zeroed), as a guest read would."""
        return ffi.buffer(self.ptr + offset, length)

    def read_into(self, offset: int, out: memoryview) -> None:
        """Copy len(out) bytes from `offset` into `out` (one copy, in pieces so other
        threads get the GIL). From the backing file where nothing is mapped over it: a
        read there allocates no page for a hole, as a read through the mapping would."""
        if not self.overlaps_overlay(offset, len(out)):
            _file_io(os.preadv, self.fd, self.fd_offset + offset, out)
            return
        for done in range(0, len(out), COPY_CHUNK):
            n = min(COPY_CHUNK, len(out) - done)
            ffi.memmove(out[done : done + n], self.ptr + offset + done, n)

    def check_writable(self, op: str, offset: int, length: int) -> None:
        """Refuse (EACCES) a host write to a part mapped read-only, which would fault."""
        ro = self.read_only_ranges(offset, length)
        if ro:
            raise KvmError(errno.EACCES, op, f"slot {self.info.slot} offset {ro[0][0]:#x} "
                           "is mapped from a read-only file")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` in at `offset`. Into the backing file where nothing is mapped over
        it: the kernel fills fresh pages without a page fault each (several times faster
        for a restore or an incoming migration, which write every page of a new VM once);
        the mapping (and the guest) see the same pages."""
        view = memoryview(data).cast("B")
        if not self.overlaps_overlay(offset, len(view)):
            _file_io(os.pwritev, self.fd, self.fd_offset + offset, view)
            return
        for done in range(0, len(view), COPY_CHUNK):
            piece = view[done : done + COPY_CHUNK]
            ffi.memmove(self.ptr + offset + done, piece, len(piece))

    def msync(self, offset: int, size: int) -> None:
        if lib.msync(self.ptr + offset, size, lib.MS_SYNC) < 0:
            raise KvmError(ffi.errno, "msync")

    # -- what the guest has --------------------------------------------------------------

    @property
    def allocated_bytes(self) -> int:
        """Bytes of memory (or disk) the backing file holds: st_blocks * 512. For the
        region's own memfd, the host RAM its guest memory costs; for a file mapped from an
        offset, the whole file's."""
        return os.fstat(self.fd).st_blocks * 512

    def populated_ranges(self, offset: int = 0, size: int | None = None
                         ) -> list[tuple[int, int]]:
        """The (offset, length) ranges of [offset, offset+size) whose pages hold data in the
        region's own backing (SEEK_DATA/SEEK_HOLE): pages never touched, or discarded, are
        holes (a read of a hole through a shared mapping allocates it, zeroed). Ranges
        overlaid by `map_fd` files are left out (see `file_mappings`)."""
        start, end = self._range("populated_ranges", offset, size)
        ranges: list[tuple[int, int]] = []
        pos = start
        base = self.fd_offset
        while pos < end:
            try:
                data = os.lseek(self.fd, base + pos, os.SEEK_DATA) - base
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after pos
                    break
                raise KvmError(exc.errno or errno.EIO, "lseek(SEEK_DATA)") from None
            if data >= end:
                break
            hole = os.lseek(self.fd, base + data, os.SEEK_HOLE) - base
            # Filesystems report at block granularity; whole pages are what the guest has.
            lo = max(start, data // PAGE_SIZE * PAGE_SIZE)
            hi = min(end, round_up_to_page(hole))
            if ranges and ranges[-1][0] + ranges[-1][1] >= lo:
                lo = ranges.pop()[0]
            ranges.append((lo, hi - lo))
            pos = hi
        return _subtract(ranges, [(m.offset, m.size) for m, _ in self._overlays.values()])

    def nonzero_page_runs(self, offset: int = 0, size: int | None = None,
                          populated: bool = False) -> list[tuple[int, int]]:
        """The (offset, length) runs of pages in [offset, offset+size) that hold a non-zero
        byte: the populated ranges, with pages that are all zeros left out (scanned in C).
        What a sparse snapshot or a migration must send; everything else reads as zeros.
        `populated`: the caller knows the range is (from populated_ranges), so the backing
        is not asked again; its SEEK_HOLE walks all the data after `offset`, which costs a
        caller going through a large range piece by piece once per piece. (A hole in the
        range after all is read, so allocated, and reported as zeros.)"""
        out: list[tuple[int, int]] = []
        runs = ffi.new("uint64_t[]", 2 * _RUNS_PER_CALL)
        scanned = ffi.new("uint64_t *")
        if populated:
            start, end = self._range("nonzero_page_runs", offset, size)
            ranges = [(start, end - start)]
        else:
            ranges = self.populated_ranges(offset, size)
        for lo, length in ranges:
            first, npages = lo // PAGE_SIZE, length // PAGE_SIZE
            done = 0
            while done < npages:
                n = lib.kvmd_nonzero_page_runs(self.ptr + (first + done) * PAGE_SIZE,
                                               npages - done, PAGE_SIZE, runs, _RUNS_PER_CALL,
                                               scanned)
                for i in range(n):
                    out.append(((first + done + int(runs[2 * i])) * PAGE_SIZE,
                                int(runs[2 * i + 1]) * PAGE_SIZE))
                done += int(scanned[0])
        # Runs meet across the ends of populated ranges and of C calls: join them.
        return _merge(out)

    def discard(self, offset: int, size: int) -> int:
        """Free the host pages behind [offset, offset+size) (punch a hole in the memfd); the
        range stays mapped and reads back zeros. Returns the bytes the backing released."""
        before = self.allocated_bytes
        check(lib.kvmd_punch_hole(self.fd, self.fd_offset + offset, size), "fallocate",
              f"punch hole at {offset:#x}+{size:#x} of slot {self.info.slot}")
        return max(0, before - self.allocated_bytes)

    # -- file overlays (crosvm's add_fd_mapping / remove_mapping) -------------------------

    def file_mappings(self) -> list[FileMapping]:
        """The file ranges mapped here: the whole region if it is file-backed, else the
        overlays, by offset."""
        if self.is_file:
            return [_describe(self.info, 0, self.info.size, self.fd, self.fd_offset,
                              self.writable)]
        return [m for _, (m, _fd) in sorted(self._overlays.items())]

    def overlaps_overlay(self, offset: int, size: int) -> bool:
        return any(offset < m.offset + m.size and m.offset < offset + size
                   for m, _ in self._overlays.values())

    def read_only_ranges(self, offset: int, size: int) -> list[tuple[int, int]]:
        """Parts of [offset, offset+size) mapped without write permission."""
        if not self.writable:
            return [(offset, size)] if size else []
        return [(m.offset, m.size) for m, _ in self._overlays.values()
                if not m.writable and offset < m.offset + m.size and m.offset < offset + size]

    def map_fd(self, offset: int, size: int, fd: int, fd_offset: int,
               writable: bool) -> FileMapping:
        """Map `size` bytes of the file `fd` from `fd_offset` over [offset, offset+size) of
        this region (MAP_FIXED, on a dup of fd). The caller has checked the range."""
        dup = _dup_file("map_fd", fd, fd_offset, size)
        try:
            _mmap(self.ptr + offset, size, writable, dup, fd_offset, "file over guest memory",
                  fixed=True)
        except BaseException:
            os.close(dup)
            # A failed MAP_FIXED may have unmapped the range: put the own backing back.
            self._restore(offset, size)
            raise
        mapping = _describe(self.info, offset, size, dup, fd_offset, writable)
        self._overlays[offset] = (mapping, dup)
        return mapping

    def overlay_at(self, offset: int, size: int) -> FileMapping | None:
        entry = self._overlays.get(offset)
        return entry[0] if entry is not None and entry[0].size == size else None

    def unmap_fd(self, offset: int) -> FileMapping:
        """Undo `map_fd` at `offset`: msync a writable file, then map the region's own
        backing back over the range (its earlier contents reappear) and close the dup."""
        mapping, dup = self._overlays[offset]
        sync_error = None
        if mapping.writable and lib.msync(self.ptr + offset, mapping.size, lib.MS_SYNC) < 0:
            sync_error = KvmError(ffi.errno, "msync", "file mapped over guest memory")
        self._restore(offset, mapping.size)
        del self._overlays[offset]
        os.close(dup)
        if sync_error is not None:
            raise sync_error
        return mapping

    def _restore(self, offset: int, size: int) -> None:
        _mmap(self.ptr + offset, size, self.writable, self.fd, self.fd_offset + offset,
              "guest memory", fixed=True)

    def _range(self, op: str, offset: int, size: int | None) -> tuple[int, int]:
        if size is None:
            size = self.info.size - offset if 0 <= offset <= self.info.size else -1
        if offset < 0 or size < 0 or offset + size > self.info.size:
            raise KvmError(errno.EINVAL, op, f"{offset:#x}+{size:#x} is outside slot "
                           f"{self.info.slot}")
        if offset % PAGE_SIZE or size % PAGE_SIZE:
            raise KvmError(errno.EINVAL, op, "offset and size must be page aligned")
        return offset, offset + size

    def close(self) -> None:
        """Unmap everything (msync-ing writable file mappings first) and close every fd."""
        if self.ptr == ffi.NULL:
            return
        # munmap throws away nothing a shared file mapping wrote, but a file by reference
        # should be on disk when the VM lets go of it. Errors cannot stop the release.
        if self.is_file and self.writable:
            lib.msync(self.ptr, self.info.size, lib.MS_SYNC)
        for mapping, _ in self._overlays.values():
            if mapping.writable:
                lib.msync(self.ptr + mapping.offset, mapping.size, lib.MS_SYNC)
        lib.munmap(self.ptr, self.info.size)
        self.ptr = ffi.NULL
        for _, dup in self._overlays.values():
            os.close(dup)
        self._overlays.clear()
        os.close(self.fd)
        self.fd = -1


# Runs returned per C call by the zero-page scan before Python collects them.
_RUNS_PER_CALL = 4096


def _mmap(addr: Any, size: int, writable: bool, fd: int, offset: int, what: str,
          fixed: bool = False) -> Any:
    prot = lib.PROT_READ | (lib.PROT_WRITE if writable else 0)
    flags = lib.MAP_SHARED | lib.MAP_NORESERVE | (lib.MAP_FIXED if fixed else 0)
    ptr = lib.mmap(addr, size, prot, flags, fd, offset)
    if ptr == ffi.cast("void *", -1):
        raise KvmError(ffi.errno, "mmap", f"{size} bytes of {what}")
    return ptr


def _dup_file(op: str, fd: int, offset: int, size: int) -> int:
    """A close-on-exec dup of `fd` after checking it can back `size` bytes from `offset`."""
    if not isinstance(fd, int) or fd < 0:
        raise KvmError(errno.EBADF, op, f"{fd!r} is not an open fd")
    if not isinstance(offset, int) or offset < 0 or offset % PAGE_SIZE:
        raise KvmError(errno.EINVAL, op, f"file offset {offset!r} is not page aligned")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise KvmError(exc.errno or errno.EBADF, op, f"fd {fd}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KvmError(errno.EINVAL, op, f"fd {fd} is not a regular file or memfd")
    if st.st_size < offset + size:
        raise KvmError(errno.EINVAL, op, f"fd {fd} has {st.st_size} bytes, the mapping needs "
                       f"{offset + size} (offset {offset:#x} + size {size:#x})")
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)


def _describe(info: MemoryRegionInfo, offset: int, size: int, fd: int, fd_offset: int,
              writable: bool) -> FileMapping:
    st = os.fstat(fd)
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = ""
    return FileMapping(info.slot, info.guest_addr + offset, offset, size, fd_offset, writable,
                       path, st.st_dev, st.st_ino)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] >= lo:
            plo, pn = out.pop()
            out.append((plo, max(plo + pn, lo + n) - plo))
        else:
            out.append((lo, n))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]
              ) -> list[tuple[int, int]]:
    """`ranges` (sorted, disjoint) without the parts covered by `holes`."""
    out = []
    for lo, n in ranges:
        pieces = [(lo, lo + n)]
        for hlo, hn in holes:
            hhi = hlo + hn
            pieces = [p for a, b in pieces for p in ((a, min(b, hlo)), (max(a, hhi), b))
                      if p[0] < p[1]]
        out += [(a, b - a) for a, b in pieces]
    return out
