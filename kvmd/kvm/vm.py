"""Vm: one KVM VM fd, its guest memory, vCPUs, irqfds, ioeventfds and devices."""

from __future__ import annotations

import bisect
import dataclasses
import errno
import os
import threading
from dataclasses import dataclass
from typing import Literal, TypeGuard, overload

from kvmd.kvm._ffi import ffi, ioctl, lib
from kvmd.kvm.caps import capability_number
from kvmd.kvm.dirty import (
    CLEAR_DIRTY_LOG_ALIGN,
    MIN_DIRTY_RING_BYTES,
    DirtyBitmaps,
    DirtyLogModes,
    dirty_log_modes,
)
from kvmd.kvm.errors import KvmError, check, invalid
from kvmd.kvm.eventfd import HasFileno, fd_of
from kvmd.kvm.marshal import enable_cap_struct
from kvmd.kvm.memory import (
    PAGE_SIZE,
    FileBacking,
    FileMapping,
    GuestMemoryRegion,
    MemfdBacking,
    MemoryRegionInfo,
    dirty_log_bitmap_size,
    round_up_to_page,
)
from kvmd.kvm.state_types import (
    PIC_STATE_FIELDS,
    PIT_CHANNEL_FIELDS,
    XSAVE_LEGACY_SIZE,
    ClockData,
    IoapicState,
    PicState,
    PitChannelState,
    PitState,
)
from kvmd.kvm.stats import StatsReader
from kvmd.kvm.types import (
    Datamatch,
    IoEventAddress,
    IoSpace,
    IrqChip,
    IrqChipRoute,
    IrqRoute,
    MsiRoute,
)
from kvmd.kvm.vcpu import Vcpu

GUEST_ADDR_LIMIT = 1 << 52  # x86_64 architectural maximum guest physical address width
MAX_IRQ_ROUTES = 4096  # KVM_MAX_IRQ_ROUTES
PIC_PINS = 8
IOAPIC_PINS = 24
KVM_MSI_VALID_DEVID = 1
PIO_LIMIT = 1 << 16
ANY_WRITE = Datamatch()  # the default ioeventfd match: any write, of any length


@dataclass(frozen=True)
class IrqfdRegistration:
    """An irqfd this Vm registered with KVM (which does not report unknown or doubly
    removed ones, so the Vm is where that is known); `tag` is the caller's, kept as given."""

    gsi: int
    fd: int
    resample_fd: int | None
    tag: object = None


@dataclass(frozen=True)
class IoeventRegistration:
    """An ioeventfd this Vm registered with KVM; `tag` is the caller's, kept as given."""

    address: IoEventAddress
    datamatch: Datamatch
    fd: int
    tag: object = None


def _check_fds_available(fd: int, n: int, op: str) -> None:
    """Raise EMFILE/ENFILE now unless `n` more descriptors can be opened (duplicates of
    `fd`, closed again at once)."""
    held: list[int] = []
    try:
        for _ in range(n):
            held.append(os.dup(fd))
    except OSError as exc:
        raise KvmError(exc.errno or errno.EMFILE, op, "descriptors for a new vcpu") from None
    finally:
        for dup in held:
            os.close(dup)


@dataclass(frozen=True)
class Device:
    """A device created with KVM_CREATE_DEVICE; its fd is owned by the Vm."""

    type: int
    fd: int

    def fileno(self) -> int:
        return self.fd


class Vm:
    """A VM. Owns its guest memory (memfd mappings it makes itself), vCPUs, devices and
    stats fd; `close()` releases all of them. Safe to call from several threads: the
    memory table is guarded so a read can never race with the unmapping of its slot."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self._fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._lock = threading.RLock()
        self._regions: dict[int, GuestMemoryRegion] = {}
        self._starts: list[int] = []  # sorted guest addresses, for lookups
        self._by_start: dict[int, GuestMemoryRegion] = {}
        # The slot table in guest address order, replaced (never changed in place) under the
        # lock on every change: `memory_regions()` reads it without the lock, so readers on
        # the API's event loop never wait behind a slot being mapped or unmapped.
        self._infos: tuple[MemoryRegionInfo, ...] = ()
        self._vcpus: dict[int, Vcpu] = {}
        self._devices: list[Device] = []
        # What this Vm registered with KVM, in registration order.
        self._irqfds: dict[tuple[int, int], IrqfdRegistration] = {}
        self._ioevents: dict[tuple[IoSpace, int, int, int | None], IoeventRegistration] = {}
        self._stats: StatsReader | None = None
        self._max_slots = self.check_extension("KVM_CAP_NR_MEMSLOTS") or 32

    # -- lifetime -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Stop and close every vCPU, close devices and the VM fd, then unmap guest memory."""
        with self._lock:
            if self._fd < 0:
                return
            for vcpu in self._vcpus.values():
                vcpu.close()
            self._vcpus.clear()
            for dev in self._devices:
                os.close(dev.fd)
            self._devices.clear()
            if self._stats is not None:
                self._stats.close()
                self._stats = None
            fd, self._fd = self._fd, -1
            os.close(fd)
            # The kernel drops its references to our pages with the last VM reference;
            # unmapping after the fd is closed means no vCPU can touch them meanwhile.
            for region in self._regions.values():
                region.close()
            self._regions.clear()
            self._starts.clear()
            self._by_start.clear()
            self._infos = ()
            self._irqfds.clear()
            self._ioevents.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_fd(self, op: str) -> int:
        if self._fd < 0:
            raise KvmError(errno.EBADF, op, "vm is closed")
        return self._fd

    # -- capabilities ---------------------------------------------------------------------

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers may differ from /dev/kvm's)."""
        return ioctl(self._open_fd("KVM_CHECK_EXTENSION"), "KVM_CHECK_EXTENSION",
                     capability_number(cap))

    def enable_cap(self, cap: int | str, args: tuple[int, ...] = (), flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM."""
        ioctl(self._open_fd("KVM_ENABLE_CAP"), "KVM_ENABLE_CAP",
              enable_cap_struct(capability_number(cap), args, flags))

    @property
    def max_memory_slots(self) -> int:
        return self._max_slots

    # -- guest memory ---------------------------------------------------------------------

    def add_memory_region(self, guest_addr: int, size: int, read_only: bool = False,
                          log_dirty: bool = False,
                          backing: FileBacking | MemfdBacking | None = None,
                          slot: int | None = None) -> int:
        """Map `size` bytes (rounded up to pages) of new zeroed memory at `guest_addr`, or,
        with `backing`, of an existing file (`FileBacking`: memory by reference, read-only
        slot when not writable) or memfd (`MemfdBacking`: adopted guest RAM). The Vm dups
        a backing fd and owns the dup; the caller keeps its own.

        A read-only slot may log dirty pages, as KVM allows (guest writes to it exit as
        MMIO and mark nothing). Returns the slot: the lowest free slot number, so freed
        slots are reused first. Refuses zero or negative sizes and unaligned addresses
        (EINVAL), ranges past the guest physical address space (EOVERFLOW), overlaps
        (EEXIST), a full slot table (ENOSPC), a closed backing fd (EBADF), and a backing
        file that is not a regular file, has an unaligned offset or is shorter than
        offset+size (EINVAL). `slot` asks for that exact slot number (a restore recreates
        the slot table as it was): EEXIST if it is taken, EINVAL beyond the table.
        """
        op = "KVM_SET_USER_MEMORY_REGION"
        check_page_aligned(op, "guest address", guest_addr)
        check_positive_size(op, size)
        size = round_up_to_page(size)
        if guest_addr + size > GUEST_ADDR_LIMIT:
            raise invalid(op, f"{guest_addr:#x}+{size:#x} is beyond guest physical addresses",
                          errno.EOVERFLOW)
        if isinstance(backing, FileBacking) and not backing.writable:
            read_only = True  # a read-only mapping can only back a read-only slot
        elif backing is not None and not isinstance(backing, FileBacking | MemfdBacking):
            raise invalid(op, f"not a memory backing: {backing!r}")
        with self._lock:
            fd = self._open_fd(op)
            clash = self._overlapping(guest_addr, size)
            if clash is not None:
                raise invalid(op, f"{guest_addr:#x}+{size:#x} overlaps slot {clash.slot} at "
                              f"{clash.guest_addr:#x}+{clash.size:#x}", errno.EEXIST)
            if slot is None:
                slot = next(i for i in range(len(self._regions) + 1)
                            if i not in self._regions)
            elif not is_int(slot) or not 0 <= slot < self._max_slots:
                raise invalid(op, f"slot {slot!r} is not a slot number below "
                              f"{self._max_slots}")
            elif slot in self._regions:
                raise invalid(op, f"slot {slot} is in use", errno.EEXIST)
            if slot >= self._max_slots:
                raise invalid(op, f"all {self._max_slots} memory slots are in use",
                              errno.ENOSPC)
            info = MemoryRegionInfo(slot, guest_addr, size, read_only, log_dirty)
            if backing is None:
                region = GuestMemoryRegion(info, f"kvmd-slot{slot}")
            elif isinstance(backing, FileBacking):
                region = GuestMemoryRegion.from_fd(info, backing.fd, backing.offset,
                                                   backing.writable, is_file=True)
            else:
                region = GuestMemoryRegion.from_fd(info, backing.fd, backing.offset)
            try:
                self._set_region(fd, info, region.host_address)
            except BaseException:
                region.close()
                raise
            self._regions[slot] = region
            bisect.insort(self._starts, guest_addr)
            self._by_start[guest_addr] = region
            self._publish_infos()
            return slot

    def remove_memory_region(self, slot: int) -> MemoryRegionInfo:
        """Unmap a slot from the guest and release its memory; returns what it mapped."""
        op = "KVM_SET_USER_MEMORY_REGION"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            info = region.info
            self._set_region(fd, MemoryRegionInfo(slot, 0, 0, False, False), 0)
            del self._regions[slot]
            self._starts.remove(info.guest_addr)
            del self._by_start[info.guest_addr]
            self._publish_infos()
            region.close()
            return info

    def _publish_infos(self) -> None:
        """Under the lock: replace the lock-free copy of the slot table."""
        self._infos = tuple(self._by_start[a].info for a in self._starts)

    def memory_regions(self) -> list[MemoryRegionInfo]:
        """Every slot, in guest address order. Takes no lock (a consistent copy made at the
        last change), so it never waits for a slot being added or removed."""
        return list(self._infos)

    def memory_region(self, slot: int) -> MemoryRegionInfo:
        with self._lock:
            region = self._regions.get(slot)
            if region is None:
                raise invalid("memory_region", f"no memory slot {slot}", errno.ENOENT)
            return region.info

    def memory_fd(self, slot: int) -> int:
        """The memfd behind a slot (still owned by the Vm; an adopted memfd is the Vm's dup,
        mapped from its `MemfdBacking.offset`). A file-backed slot has none (EINVAL): see
        `file_mappings`."""
        with self._lock:
            self._open_fd("memory_fd")
            region = self._regions.get(slot)
            if region is None:
                raise invalid("memory_fd", f"no memory slot {slot}", errno.ENOENT)
            if region.is_file:
                raise invalid("memory_fd", f"slot {slot} is file-backed, not a memfd")
            return region.memfd

    @property
    def memory_size(self) -> int:
        with self._lock:
            return sum(r.info.size for r in self._regions.values())

    def msync_memory_region(self, slot: int, offset: int, size: int) -> None:
        """msync part of a slot's memory to its backing file."""
        with self._lock:
            self._open_fd("msync")
            region = self._regions.get(slot)
            if region is None:
                raise invalid("msync", f"no memory slot {slot}", errno.ENOENT)
            if offset < 0 or size < 0 or offset + size > region.info.size:
                raise invalid("msync", f"{offset:#x}+{size:#x} is outside slot {slot}",
                              errno.EFAULT)
            if offset % PAGE_SIZE:
                raise invalid("msync", "offset must be page aligned")
            region.msync(offset, size)

    def read(self, guest_addr: int, length: int) -> bytes:
        """Read guest memory at a guest physical address; the range may span adjacent slots
        but must be backed throughout (else EFAULT)."""
        if length < 0:
            raise invalid("read", "negative length")
        with self._lock:
            self._open_fd("read")
            return b"".join(region.read(off, n) for region, off, n in
                            self._pieces("read", guest_addr, length))

    def read_into(self, guest_addr: int, out: bytearray | memoryview) -> None:
        """Read len(out) bytes of guest memory into `out`: `read` without its extra copies
        (snapshots and migration copy each guest page once, straight into their message)."""
        view = memoryview(out).cast("B")
        with self._lock:
            self._open_fd("read")
            done = 0
            for region, off, n in self._pieces("read", guest_addr, len(view)):
                region.read_into(off, view[done:done + n])
                done += n

    def read_joined(self, guest_addr: int, length: int, head: bytes = b"") -> bytes:
        """`head` then `length` bytes of guest memory, as one bytes object copied once,
        straight from the mappings: a snapshot's or a migration's frame of guest pages.
        For pages that hold data (see `nonzero_page_runs`): unlike `read_into`, which goes
        through the file, a hole read here is allocated (zeroed). Several times faster on
        these hosts than preadv of the memfd into a buffer, then a join."""
        if length < 0:
            raise invalid("read", "negative length")
        with self._lock:
            self._open_fd("read")
            return b"".join([head, *(region.mapped(off, n) for region, off, n in
                                     self._pieces("read", guest_addr, length))])

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write guest memory (host writes do not mark the dirty log; read-only slots are
        writable from the host, as in KVM, except where a file is mapped read-only: EACCES,
        and nothing is written)."""
        view = memoryview(data).cast("B")
        with self._lock:
            self._open_fd("write")
            done = 0
            pieces = self._pieces("write", guest_addr, len(view))
            for region, off, n in pieces:
                region.check_writable("write", off, n)
            for region, off, n in pieces:
                region.write(off, view[done : done + n])
                done += n

    def _pieces(self, op: str, guest_addr: int, length: int
                ) -> list[tuple[GuestMemoryRegion, int, int]]:
        if guest_addr < 0 or guest_addr + length > GUEST_ADDR_LIMIT:
            raise invalid(op, f"address {guest_addr:#x} is outside guest memory", errno.EFAULT)
        pieces: list[tuple[GuestMemoryRegion, int, int]] = []
        addr, end = guest_addr, guest_addr + length
        while addr < end or (length == 0 and not pieces):
            region = self._region_at(addr)
            if region is None:
                raise invalid(op, f"guest address {addr:#x} is not backed by memory",
                              errno.EFAULT)
            n = min(end, region.info.end) - addr
            pieces.append((region, addr - region.info.guest_addr, n))
            addr += n
            if length == 0:
                break
        return pieces

    def _region_at(self, addr: int) -> GuestMemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        region = self._by_start[self._starts[i]]
        return region if addr < region.info.end else None

    def _overlapping(self, start: int, size: int) -> MemoryRegionInfo | None:
        for region in self._regions.values():
            if start < region.info.end and region.info.guest_addr < start + size:
                return region.info
        return None

    def _set_region(self, fd: int, info: MemoryRegionInfo, host_addr: int) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot = info.slot
        r.flags = ((lib.KVM_MEM_READONLY if info.read_only else 0)
                   | (lib.KVM_MEM_LOG_DIRTY_PAGES if info.log_dirty else 0))
        r.guest_phys_addr = info.guest_addr
        r.memory_size = info.size
        r.userspace_addr = host_addr
        ioctl(fd, "KVM_SET_USER_MEMORY_REGION", r)

    def get_dirty_log(self, slot: int) -> bytes:
        """The slot's dirty bitmap (one bit per page, dirty_log_bitmap_size bytes); reading
        it resets the log, as KVM does, unless manual protect is enabled (then see
        `clear_dirty_log`). Only guest writes mark pages. With a dirty ring the kernel has
        no bitmap (ENXIO)."""
        op = "KVM_GET_DIRTY_LOG"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            if not region.info.log_dirty:
                raise invalid(op, f"slot {slot} was added without dirty logging")
            size = dirty_log_bitmap_size(region.info.size)
            # The kernel writes whole 64-bit words.
            buf = ffi.new("uint8_t[]", (size + 7) // 8 * 8)
            check(lib.kvmd_get_dirty_log(fd, slot, buf), op)
            return bytes(ffi.buffer(buf, size))

    # -- dirty-page tracking: modes, manual protect, dirty ring, logging per slot ---------

    # Class defaults, so __init__ stays as it was: set by the enable_* methods below.
    _manual_protect_flags = 0
    _dirty_ring_bytes = 0

    def dirty_log_modes(self) -> DirtyLogModes:
        """Which dirty-tracking modes this VM can use (asked on the VM fd)."""
        return dirty_log_modes(self.check_extension)

    @property
    def manual_dirty_log_protect(self) -> int:
        """The KVM_DIRTY_LOG_* flags enabled by `enable_manual_dirty_log_protect` (0: off)."""
        return self._manual_protect_flags

    def enable_manual_dirty_log_protect(self, initially_set: bool | None = None) -> int:
        """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: from now on `get_dirty_log` only reads
        the bitmap and `clear_dirty_log` re-protects pages. `initially_set` (default: where
        the kernel offers it) makes slots that start logging report every page dirty until
        cleared. Returns the flags enabled. A kernel without the capability, or without
        initially-set when asked for it, refuses (EINVAL)."""
        op = "KVM_ENABLE_CAP"
        with self._lock:
            offered = self.check_extension("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            if initially_set is None:
                initially_set = bool(offered & lib.KVM_DIRTY_LOG_INITIALLY_SET)
            flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if initially_set:
                flags |= lib.KVM_DIRTY_LOG_INITIALLY_SET
            ioctl(self._open_fd(op), op, enable_cap_struct(
                lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, (flags,), 0))
            self._manual_protect_flags = flags
            return flags

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: bytes | bytearray | memoryview | None = None) -> None:
        """Re-protect pages of a slot (KVM_CLEAR_DIRTY_LOG, manual protect only): the pages
        first_page+i whose bit i is set in `bitmap` (default: all `num_pages`) read clean
        until the guest writes them again. The kernel's rules, checked here first (EINVAL):
        `first_page` a multiple of 64, `num_pages` a multiple of 64 unless the range reaches
        the end of the slot, the range inside the slot, `bitmap` at least num_pages bits.
        Refused without manual protect (EINVAL): the kernel would accept it (and clear
        bits GET_DIRTY_LOG already cleared), but it is always the caller's mistake. For a
        slot without logging, the kernel's ENOENT; with a dirty ring, its ENXIO."""
        op = "KVM_CLEAR_DIRTY_LOG"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            if not self._manual_protect_flags and not self._dirty_ring_bytes:
                raise invalid(op, "manual dirty log protect is not enabled "
                              "(enable_manual_dirty_log_protect)")
            npages = region.info.size // PAGE_SIZE
            if not isinstance(first_page, int) or not isinstance(num_pages, int):
                raise invalid(op, "first_page and num_pages must be integers")
            if first_page < 0 or first_page % CLEAR_DIRTY_LOG_ALIGN:
                raise invalid(op, f"first_page {first_page} is not a multiple of "
                              f"{CLEAR_DIRTY_LOG_ALIGN}")
            if num_pages < 0 or first_page + num_pages > npages:
                raise invalid(op, f"pages {first_page}+{num_pages} are outside slot {slot} "
                              f"({npages} pages)")
            if num_pages % CLEAR_DIRTY_LOG_ALIGN and first_page + num_pages != npages:
                raise invalid(op, f"num_pages {num_pages} is not a multiple of "
                              f"{CLEAR_DIRTY_LOG_ALIGN} and does not reach the end of the slot")
            words = max(1, (num_pages + 63) // 64)
            buf = ffi.new("uint64_t[]", words)
            if bitmap is None:
                ffi.memmove(buf, b"\xff" * (words * 8), words * 8)
            else:
                view = memoryview(bitmap).cast("B")
                if len(view) * 8 < num_pages:
                    raise invalid(op, f"bitmap has {len(view) * 8} bits for {num_pages} pages")
                ffi.memmove(buf, view[: words * 8], min(len(view), words * 8))
            check(lib.kvmd_clear_dirty_log(fd, slot, first_page, num_pages, buf), op)

    def set_dirty_logging(self, slot: int, enabled: bool) -> MemoryRegionInfo:
        """Start or stop dirty logging on an existing slot: KVM_SET_USER_MEMORY_REGION again
        with the same slot, address, size and memory, only KVM_MEM_LOG_DIRTY_PAGES changed
        (a flag change KVM allows). The memory and its contents stay. Turning logging on
        starts a clean log (all dirty with initially-set); turning it off drops the log.
        Returns the slot's new info."""
        op = "KVM_SET_USER_MEMORY_REGION"
        with self._lock:
            fd = self._open_fd(op)
            region = self._regions.get(slot)
            if region is None:
                raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
            info = dataclasses.replace(region.info, log_dirty=bool(enabled))
            if info != region.info:
                self._set_region(fd, info, region.host_address)
                region.info = info
                self._publish_infos()
            return info

    @property
    def dirty_ring_bytes(self) -> int:
        """Each vCPU's dirty ring size in bytes (0: no dirty ring)."""
        return self._dirty_ring_bytes

    def enable_dirty_ring(self, size_bytes: int) -> None:
        """Switch the VM to dirty rings of `size_bytes` per vCPU: KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        where offered, else KVM_CAP_DIRTY_LOG_RING. Must come before any vCPU exists (else
        the kernel's EINVAL); every vCPU created afterwards maps its ring. The size is a
        power of two from MIN_DIRTY_RING_BYTES (the kernel may need more: it reserves
        entries) to `dirty_log_modes().ring_max_bytes` (E2BIG past it). Once on, the VM has
        no dirty bitmaps: `get_dirty_log` and `clear_dirty_log` fail (ENXIO), slots still
        need `log_dirty` to be tracked, and harvesting replaces them."""
        op = "KVM_ENABLE_CAP"
        with self._lock:
            fd = self._open_fd(op)
            if not isinstance(size_bytes, int) or size_bytes < MIN_DIRTY_RING_BYTES or (
                    size_bytes & (size_bytes - 1)):
                raise invalid(op, f"dirty ring size {size_bytes!r} is not a power of two of at "
                              f"least {MIN_DIRTY_RING_BYTES} bytes")
            modes = self.dirty_log_modes()
            if not modes.ring:
                raise invalid(op, "the kernel offers no dirty ring", errno.EINVAL)
            if size_bytes > modes.ring_max_bytes:
                raise invalid(op, f"dirty ring size {size_bytes} is above the kernel's "
                              f"{modes.ring_max_bytes}", errno.E2BIG)
            cap = ("KVM_CAP_DIRTY_LOG_RING_ACQ_REL" if modes.ring_acq_rel
                   else "KVM_CAP_DIRTY_LOG_RING")
            ioctl(fd, op, enable_cap_struct(getattr(lib, cap), (size_bytes,), 0))
            self._dirty_ring_bytes = size_bytes

    def dirty_bitmaps(self) -> DirtyBitmaps:
        """Fresh `DirtyBitmaps` for every slot that logs dirty pages now."""
        with self._lock:
            return DirtyBitmaps.for_regions(r.info for r in self._regions.values())

    def harvest_dirty_rings(self, bitmaps: DirtyBitmaps) -> int:
        """Collect every vCPU's dirty ring into `bitmaps` (see `Vcpu.harvest_dirty_ring`);
        returns the entries collected. Follow with `reset_dirty_rings()`."""
        with self._lock:
            self._open_fd("harvest_dirty_rings")
            if not self._dirty_ring_bytes:
                raise invalid("harvest_dirty_rings", "the VM has no dirty ring", errno.ENXIO)
            vcpus = list(self._vcpus.values())
        return sum(v.harvest_dirty_ring(bitmaps) for v in vcpus)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect the pages of every harvested ring entry and
        make the entries reusable; returns how many the kernel reset. A vCPU that exited
        with DirtyRingFullExit can run again afterwards."""
        op = "KVM_RESET_DIRTY_RINGS"
        return ioctl(self._open_fd(op), op)

    # -- guest memory backing: what the guest has, discard, files mapped over slots -------

    def _region(self, op: str, slot: int) -> GuestMemoryRegion:
        self._open_fd(op)
        region = self._regions.get(slot)
        if region is None:
            raise invalid(op, f"no memory slot {slot}", errno.ENOENT)
        return region

    def allocated_bytes(self, slot: int) -> int:
        """Bytes the slot's backing file holds in memory or on disk (st_blocks * 512): for
        the Vm's own memfd, the host RAM the slot costs now. Takes no lock (one fstat):
        a slot being removed meanwhile reports ENOENT (or, at worst, a stale count)."""
        region = self._regions.get(slot)
        if region is None:
            raise invalid("allocated_bytes", f"no memory slot {slot}", errno.ENOENT)
        try:
            return region.allocated_bytes
        except OSError as exc:
            raise KvmError(exc.errno or errno.EBADF, "fstat", f"slot {slot}") from None

    def populated_ranges(self, slot: int, offset: int = 0, size: int | None = None
                         ) -> list[tuple[int, int]]:
        """(offset, length) ranges of the slot, within [offset, offset+size), whose pages
        exist in its own backing: pages never touched and discarded ones are left out, and
        so are ranges overlaid by `map_fd` (see `file_mappings`). A read touches too: the
        kernel allocates a page of shared memfd memory on a read fault, so guest reads of
        untouched memory populate it (with zeros; see `nonzero_page_runs`); host reads
        (`read`, `read_into`) go through the file and do not.
        Offset and size page aligned (EINVAL)."""
        with self._lock:
            return self._region("populated_ranges", slot).populated_ranges(offset, size)

    def nonzero_page_runs(self, slot: int, offset: int = 0, size: int | None = None,
                          populated: bool = False) -> list[tuple[int, int]]:
        """(offset, length) runs of the slot's pages that hold a non-zero byte: the
        populated ranges less the pages that read all zeros (found in C, GIL released).
        What a sparse snapshot or a migration sends; the rest of the slot reads as zeros.
        `populated`: the range is known to hold data (GuestMemoryRegion.nonzero_page_runs)."""
        with self._lock:
            return self._region("nonzero_page_runs", slot).nonzero_page_runs(
                offset, size, populated)

    def discard(self, guest_addr: int, size: int) -> int:
        """Give the host pages behind guest [guest_addr, guest_addr+size) back (as crosvm's
        balloon inflate): holes are punched in the memfds (fallocate PUNCH_HOLE|KEEP_SIZE),
        the slots stay mapped, the range reads as zeros and a guest touching it again gets
        fresh zero pages. The range may span adjacent slots but must be backed throughout
        (EFAULT) by the slots' own memory, not by files (EINVAL: the file is the caller's),
        page aligned and non-empty (EINVAL). Nothing is discarded if any check fails.
        Returns the bytes the backing files released (allocated size before - after)."""
        op = "discard"
        check_page_range(op, "guest address", guest_addr, size)
        with self._lock:
            self._open_fd(op)
            pieces = self._pieces(op, guest_addr, size)
            for region, off, n in pieces:
                if region.is_file or region.overlaps_overlay(off, n):
                    raise invalid(op, f"slot {region.info.slot} offset {off:#x}+{n:#x} is "
                                  "backed by a file")
            return sum(region.discard(off, n) for region, off, n in pieces)

    def map_fd(self, slot: int, offset: int, size: int, fd: int, fd_offset: int = 0,
               writable: bool = True) -> FileMapping:
        """Map `size` bytes of file `fd` (from `fd_offset`) over [offset, offset+size) of a
        slot (crosvm's add_fd_mapping): the guest sees the file there, MAP_SHARED, until
        `unmap_fd`. The Vm dups fd. `writable=False` maps it read-only: host writes there
        are refused (EACCES); a guest write is an MMIO exit in a read-only slot, and in a
        writable one makes KVM_RUN fail with EFAULT (PVM: an MMIO exit too). Refuses an
        unknown slot (ENOENT), unaligned or empty ranges, ranges outside the slot, a
        file-backed slot, a file shorter than fd_offset+size (EINVAL), an overlap with
        another mapped file (EEXIST) and a closed fd (EBADF)."""
        op = "map_fd"
        check_page_range(op, "offset", offset, size)
        if not isinstance(fd_offset, int):
            raise invalid(op, f"file offset {fd_offset!r} is not a number")
        with self._lock:
            region = self._region(op, slot)
            if offset + size > region.info.size:
                raise invalid(op, f"{offset:#x}+{size:#x} is outside slot {slot} "
                              f"({region.info.size:#x} bytes)")
            if region.is_file:
                raise invalid(op, f"slot {slot} is file-backed as a whole")
            if region.overlaps_overlay(offset, size):
                raise invalid(op, f"{offset:#x}+{size:#x} overlaps a file already mapped in "
                              f"slot {slot}", errno.EEXIST)
            return region.map_fd(offset, size, fd, fd_offset, writable)

    def unmap_fd(self, slot: int, offset: int, size: int) -> FileMapping:
        """Undo `map_fd` (crosvm's remove_mapping): msync the file if writable, map the
        slot's own memory back over the range (its earlier contents reappear; guest writes
        meanwhile went to the file) and close the dup. `offset` and `size` must be exactly
        those of a mapping (else ENOENT). Returns the mapping removed."""
        op = "unmap_fd"
        with self._lock:
            region = self._region(op, slot)
            if region.overlay_at(offset, size) is None:
                raise invalid(op, f"no file is mapped at {offset!r}+{size!r} of slot {slot}",
                              errno.ENOENT)
            return region.unmap_fd(offset)

    def file_mappings(self) -> list[FileMapping]:
        """Every file range mapped into guest memory (file-backed slots and `map_fd`
        overlays), in guest address order: what snapshots record by reference."""
        with self._lock:
            return [m for a in self._starts for m in self._by_start[a].file_mappings()]

    # -- interrupt controller, timers -----------------------------------------------------

    def create_irq_chip(self) -> None:
        """The in-kernel PIC, IOAPIC and per-vCPU LAPICs (create before vCPUs)."""
        ioctl(self._open_fd("KVM_CREATE_IRQCHIP"), "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """The in-kernel i8254 PIT (needs the irqchip)."""
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl(self._open_fd("KVM_CREATE_PIT2"), "KVM_CREATE_PIT2", cfg)

    def set_tss_address(self, addr: int) -> None:
        """Three pages of guest physical space Intel VMX needs for real mode (KVM_SET_TSS_ADDR)."""
        ioctl(self._open_fd("KVM_SET_TSS_ADDR"), "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_address(self, addr: int) -> None:
        """One page for the EPT identity map (KVM_SET_IDENTITY_MAP_ADDR); before vCPUs."""
        a = ffi.new("uint64_t *", addr)
        ioctl(self._open_fd("KVM_SET_IDENTITY_MAP_ADDR"), "KVM_SET_IDENTITY_MAP_ADDR", a)

    def set_irq_line(self, irq: int, active: bool) -> None:
        """Raise or lower an in-kernel irqchip input (KVM_IRQ_LINE)."""
        if not 0 <= irq < MAX_IRQ_ROUTES:
            raise invalid("KVM_IRQ_LINE", f"irq {irq} out of range")
        check(lib.kvmd_irq_line(self._open_fd("KVM_IRQ_LINE"), irq, 1 if active else 0),
              "KVM_IRQ_LINE")

    def register_irqfd(self, gsi: int, event: HasFileno | int,
                       resample: HasFileno | int | None = None, *, tag: object = None) -> None:
        """Inject GSI `gsi` whenever `event` is written. With `resample`, the line is
        level-triggered and `resample` is signalled when the guest acknowledges it.
        The same (gsi, eventfd) twice is refused (EEXIST). `tag` is returned with the
        registration by `irqfds()`."""
        op = "KVM_IRQFD"
        efd = fd_of(event)
        if not 0 <= gsi < MAX_IRQ_ROUTES:
            raise invalid(op, f"gsi {gsi} out of range")
        with self._lock:
            fd = self._open_fd(op)
            if (gsi, efd) in self._irqfds:
                raise invalid(op, f"eventfd {efd} is already registered on gsi {gsi}",
                              errno.EEXIST)
            s = ffi.new("struct kvm_irqfd *")
            s.fd, s.gsi = efd, gsi
            rfd = None if resample is None else fd_of(resample)
            if rfd is not None:
                s.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
                s.resamplefd = rfd & 0xFFFFFFFF
            ioctl(fd, op, s)
            self._irqfds[(gsi, efd)] = IrqfdRegistration(gsi, efd, rfd, tag)

    def unregister_irqfd(self, gsi: int, event: HasFileno | int) -> None:
        """Detach an irqfd. KVM does not report unknown pairs, so this binding tracks them
        and refuses what was never registered (ENOENT)."""
        op = "KVM_IRQFD"
        efd = fd_of(event)
        with self._lock:
            fd = self._open_fd(op)
            if (gsi, efd) not in self._irqfds:
                raise invalid(op, f"eventfd {efd} is not registered on gsi {gsi}", errno.ENOENT)
            s = ffi.new("struct kvm_irqfd *")
            s.fd, s.gsi, s.flags = efd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN
            ioctl(fd, op, s)
            del self._irqfds[(gsi, efd)]

    def irqfds(self) -> list[IrqfdRegistration]:
        """The irqfds registered (and not yet removed), oldest first."""
        with self._lock:
            return list(self._irqfds.values())

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        """Replace the whole GSI routing table (irqchip pins and MSI messages)."""
        op = "KVM_SET_GSI_ROUTING"
        if len(routes) > MAX_IRQ_ROUTES:
            raise invalid(op, f"at most {MAX_IRQ_ROUTES} routes")
        arr = ffi.new("struct kvmd_route[]", max(1, len(routes)))
        for i, route in enumerate(routes):
            dst = arr[i]
            if not isinstance(route, IrqChipRoute | MsiRoute):
                raise invalid(op, f"not a route: {route!r}")
            if not 0 <= route.gsi < MAX_IRQ_ROUTES:
                raise invalid(op, f"gsi {route.gsi} out of range")
            dst.gsi = route.gsi
            if isinstance(route, IrqChipRoute):
                if route.chip not in tuple(IrqChip):
                    raise invalid(op, f"irqchip {route.chip!r} is not PIC_MASTER (0), "
                                  "PIC_SLAVE (1) or IOAPIC (2)")
                pins = IOAPIC_PINS if route.chip == IrqChip.IOAPIC else PIC_PINS
                if not 0 <= route.pin < pins:
                    chip = (IrqChip(route.chip).name if route.chip in tuple(IrqChip)
                            else f"unknown irqchip {int(route.chip)}")
                    raise invalid(op, f"pin {route.pin} is not a pin of {chip}")
                dst.kind, dst.irqchip, dst.pin = 0, int(route.chip), route.pin
            else:
                if not 0 <= route.address < 1 << 64 or not 0 <= route.data < 1 << 32:
                    raise invalid(op, "MSI address must fit 64 bits and data 32 bits")
                if route.devid is not None and not 0 <= route.devid < 1 << 32:
                    raise invalid(op, "MSI devid must fit 32 bits")
                dst.kind = 1
                dst.address_lo = route.address & 0xFFFFFFFF
                dst.address_hi = route.address >> 32
                dst.data = route.data
                if route.devid is not None:
                    dst.flags, dst.devid = KVM_MSI_VALID_DEVID, route.devid
        check(lib.kvmd_set_gsi_routing(self._open_fd(op), arr, len(routes)), op)

    def signal_msi(self, address: int, data: int, devid: int | None = None) -> int:
        """Inject an MSI directly; returns >0 if delivered, 0 if the guest blocked it."""
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise invalid("KVM_SIGNAL_MSI", "MSI address must fit 64 bits and data 32 bits")
        if devid is not None and not 0 <= devid < 1 << 32:
            raise invalid("KVM_SIGNAL_MSI", "MSI devid must fit 32 bits")
        m = ffi.new("struct kvm_msi *")
        m.address_lo, m.address_hi, m.data = address & 0xFFFFFFFF, address >> 32, data
        if devid is not None:
            m.flags, m.devid = KVM_MSI_VALID_DEVID, devid
        return ioctl(self._open_fd("KVM_SIGNAL_MSI"), "KVM_SIGNAL_MSI", m)

    # -- ioeventfd ------------------------------------------------------------------------

    def register_ioevent(self, event: HasFileno | int, addr: IoEventAddress,
                         datamatch: Datamatch = ANY_WRITE, *, tag: object = None) -> None:
        """Signal `event` (instead of exiting) when the guest writes to `addr`, optionally
        only for writes of `datamatch.length` bytes equal to `datamatch.value`. `tag` is
        returned with the registration by `ioevents()`."""
        self._ioeventfd(event, addr, datamatch, deassign=False, tag=tag)

    def unregister_ioevent(self, event: HasFileno | int, addr: IoEventAddress,
                           datamatch: Datamatch = ANY_WRITE) -> None:
        """Remove an ioeventfd; one never registered is refused (ENOENT)."""
        self._ioeventfd(event, addr, datamatch, deassign=True)

    def ioevents(self) -> list[IoeventRegistration]:
        """The ioeventfds registered (and not yet removed), oldest first."""
        with self._lock:
            return list(self._ioevents.values())

    def _ioeventfd(self, event: HasFileno | int, addr: IoEventAddress, dm: Datamatch,
                   deassign: bool, tag: object = None) -> None:
        op = "KVM_IOEVENTFD"
        efd = fd_of(event)
        check_datamatch(dm)
        limit = PIO_LIMIT if addr.space == IoSpace.PIO else GUEST_ADDR_LIMIT
        if addr.address < 0 or addr.address + max(dm.length, 1) > limit:
            raise invalid(op, f"{addr.space.value} address {addr.address:#x} out of range")
        key = (addr.space, addr.address, dm.length, dm.value)
        with self._lock:
            fd = self._open_fd(op)
            known = self._ioevents.get(key)
            if deassign and (known is None or known.fd != efd):
                raise invalid(op, f"no ioevent registered at {addr.space.value} "
                              f"{addr.address:#x} for this eventfd", errno.ENOENT)
            if not deassign and key in self._ioevents:
                raise invalid(op, f"an ioevent is already registered at {addr.space.value} "
                              f"{addr.address:#x} with this datamatch", errno.EEXIST)
            s = ffi.new("struct kvm_ioeventfd *")
            s.addr, s.len, s.fd = addr.address, dm.length, efd
            flags = lib.KVM_IOEVENTFD_FLAG_PIO if addr.space == IoSpace.PIO else 0
            if dm.value is not None:
                flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
                s.datamatch = dm.value
            if deassign:
                flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
            s.flags = flags
            ioctl(fd, op, s)
            if deassign:
                del self._ioevents[key]
            else:
                self._ioevents[key] = IoeventRegistration(addr, dm, efd, tag)

    # -- vCPUs, devices, stats ------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """A new vCPU with its kvm_run mapping; owned (and closed) by this Vm. KVM cannot
        destroy a vCPU before its VM: the descriptors it needs (its fd, its stats fd) are
        made sure of first, so running out refuses it (EMFILE) instead of leaving its id
        taken by a vCPU nobody holds."""
        op = "KVM_CREATE_VCPU"
        with self._lock:
            fd = self._open_fd(op)
            if vcpu_id in self._vcpus:
                raise invalid(op, f"vcpu {vcpu_id} already exists", errno.EEXIST)
            xsave2 = self._xsave2_cap()
            _check_fds_available(fd, 2, op)
            vfd = ioctl(fd, op, vcpu_id)
            vcpu = Vcpu(vfd, vcpu_id, self._vcpu_mmap_size)
            vcpu._xsave2_size = xsave2
            if self._dirty_ring_bytes:
                try:
                    vcpu._attach_dirty_ring(self._dirty_ring_bytes)
                except BaseException:
                    vcpu.close()
                    raise
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    def vcpus(self) -> list[Vcpu]:
        with self._lock:
            return list(self._vcpus.values())

    def create_device(self, device_type: int, test_only: bool = False) -> Device | None:
        """KVM_CREATE_DEVICE; with test_only, just check the type is supported (returns
        None). The device fd is owned by this Vm."""
        op = "KVM_CREATE_DEVICE"
        with self._lock:
            fd = self._open_fd(op)
            d = ffi.new("struct kvm_create_device *")
            d.type = device_type
            d.flags = 1 if test_only else 0  # KVM_CREATE_DEVICE_TEST
            ioctl(fd, op, d)
            if test_only:
                return None
            dev = Device(device_type, int(d.fd))
            self._devices.append(dev)
            return dev

    def stats(self) -> StatsReader:
        """The kernel's binary statistics for this VM (fd owned by the Vm)."""
        with self._lock:
            if self._stats is None:
                fd = ioctl(self._open_fd("KVM_GET_STATS_FD"), "KVM_GET_STATS_FD")
                self._stats = StatsReader(fd)
            return self._stats

    def get_clock(self) -> ClockData:
        """The kvmclock (KVM_GET_CLOCK): `clock` in ns and, when `flags` says so, the host
        wall clock and TSC it was read at. KVM reports KVM_CLOCK_TSC_STABLE, REALTIME and
        HOST_TSC only while its master clock is on, which it decides when a vCPU runs or
        KVM_SET_CLOCK is called, not at VM creation."""
        c = ffi.new("struct kvm_clock_data *")
        ioctl(self._open_fd("KVM_GET_CLOCK"), "KVM_GET_CLOCK", c)
        return ClockData(int(c.clock), int(c.flags), int(c.realtime), int(c.host_tsc))

    def set_clock(self, value: ClockData | int) -> None:
        """Set the kvmclock (KVM_SET_CLOCK) from a ClockData, or from a plain ns value (no
        flags). With KVM_CLOCK_REALTIME in flags, KVM adds the wall time elapsed since
        `realtime` (if positive), so a ClockData saved by get_clock resumes where the wall
        clock is now; other flags are accepted and ignored, unknown ones refused (EINVAL)."""
        data = ClockData(value) if isinstance(value, int) else value
        c = ffi.new("struct kvm_clock_data *")
        try:
            c.clock, c.flags = data.clock, data.flags
            c.realtime, c.host_tsc = data.realtime, data.host_tsc
        except (OverflowError, TypeError) as exc:
            raise invalid("KVM_SET_CLOCK", str(exc)) from None
        ioctl(self._open_fd("KVM_SET_CLOCK"), "KVM_SET_CLOCK", c)

    # -- state for snapshot/restore -------------------------------------------------------

    _xsave2: int | None = None  # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2), asked once

    def _xsave2_cap(self) -> int:
        if self._xsave2 is None:
            self._xsave2 = self.check_extension("KVM_CAP_XSAVE2")
        return self._xsave2

    def xsave_size(self) -> int:
        """Bytes in this VM's vCPU XSAVE images: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the
        VM fd (never less than 4096), or 4096 on kernels without it."""
        return self._xsave2_cap() or XSAVE_LEGACY_SIZE

    @overload
    def get_irqchip(self, chip: Literal[IrqChip.PIC_MASTER, IrqChip.PIC_SLAVE]) -> PicState:
        ...

    @overload
    def get_irqchip(self, chip: Literal[IrqChip.IOAPIC]) -> IoapicState:
        ...

    @overload
    def get_irqchip(self, chip: IrqChip | int) -> PicState | IoapicState:
        ...

    def get_irqchip(self, chip: IrqChip | int) -> PicState | IoapicState:
        """The state of one in-kernel interrupt controller (KVM_GET_IRQCHIP): a PicState
        for PIC_MASTER or PIC_SLAVE, an IoapicState for IOAPIC. ENXIO without the
        in-kernel irqchip (or with the split irqchip); EINVAL for any other chip."""
        op = "KVM_GET_IRQCHIP"
        c = ffi.new("struct kvmd_irqchip *")
        c.chip_id = _chip_id(op, chip)
        check(lib.kvmd_get_irqchip(self._open_fd(op), c), op)
        if c.chip_id == IrqChip.IOAPIC:
            io = c.ioapic
            return IoapicState(int(io.base_address), int(io.ioregsel), int(io.id),
                               int(io.irr), [int(io.redirtbl[i]) for i in range(IOAPIC_PINS)])
        return PicState(**{name: int(getattr(c.pic, name)) for name in PIC_STATE_FIELDS})

    def set_irqchip(self, chip: IrqChip | int, state: PicState | IoapicState) -> None:
        """Restore one in-kernel interrupt controller (KVM_SET_IRQCHIP): a PicState for
        PIC_MASTER or PIC_SLAVE, an IoapicState for IOAPIC (else EINVAL). KVM re-evaluates
        the chip's output at once: an unmasked IRR bit can interrupt a vCPU."""
        op = "KVM_SET_IRQCHIP"
        c = ffi.new("struct kvmd_irqchip *")
        c.chip_id = _chip_id(op, chip)
        try:
            if c.chip_id == IrqChip.IOAPIC:
                if not isinstance(state, IoapicState):
                    raise invalid(op, "the IOAPIC takes an IoapicState")
                if len(state.redirtbl) != IOAPIC_PINS:
                    raise invalid(op, f"the IOAPIC has {IOAPIC_PINS} redirection entries")
                io = c.ioapic
                io.base_address, io.ioregsel = state.base_address, state.ioregsel
                io.id, io.irr = state.id, state.irr
                for i, entry in enumerate(state.redirtbl):
                    io.redirtbl[i] = entry
            else:
                if not isinstance(state, PicState):
                    raise invalid(op, f"{IrqChip(c.chip_id).name} takes a PicState")
                for name in PIC_STATE_FIELDS:
                    setattr(c.pic, name, getattr(state, name))
        except (OverflowError, TypeError) as exc:
            raise invalid(op, str(exc)) from None
        check(lib.kvmd_set_irqchip(self._open_fd(op), c), op)

    def get_pit2(self) -> PitState:
        """The in-kernel PIT's state (KVM_GET_PIT2); ENXIO without create_pit2()."""
        p = ffi.new("struct kvm_pit_state2 *")
        ioctl(self._open_fd("KVM_GET_PIT2"), "KVM_GET_PIT2", p)
        return PitState([PitChannelState(**{name: int(getattr(ch, name))
                                            for name in PIT_CHANNEL_FIELDS})
                         for ch in p.channels], int(p.flags))

    def set_pit2(self, state: PitState) -> None:
        """Restore the in-kernel PIT (KVM_SET_PIT2). KVM reloads each channel's count at
        the time of this call (channels 1 and 2 get a new count_load_time) and restarts
        channel 0's timer for its mode, unless flags has KVM_PIT_FLAGS_HPET_LEGACY (the
        HPET drives IRQ0 then: no PIT timer, and channel 0's count stands still)."""
        op = "KVM_SET_PIT2"
        if len(state.channels) != 3:
            raise invalid(op, "the PIT has 3 channels")
        p = ffi.new("struct kvm_pit_state2 *")
        try:
            for ch, src in zip(p.channels, state.channels, strict=True):
                for name in PIT_CHANNEL_FIELDS:
                    setattr(ch, name, getattr(src, name))
            p.flags = state.flags
        except (OverflowError, TypeError) as exc:
            raise invalid(op, str(exc)) from None
        ioctl(self._open_fd(op), op, p)


def is_int(value: object) -> TypeGuard[int]:
    """An int, and not a bool (which Python counts as one: True would be slot or size 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_size(op: str, size: object) -> None:
    """A region's size: a positive int (EINVAL). Callers that check arguments before
    anything else may call it first (kvmd.core does, to name the request field)."""
    if not is_int(size) or size <= 0:
        raise invalid(op, f"size {size!r} must be positive")


def check_page_aligned(op: str, what: str, value: object) -> None:
    """An address, offset or size that must be a non-negative multiple of the page size
    (EINVAL)."""
    if not is_int(value) or value < 0 or value % PAGE_SIZE:
        raise invalid(op, f"{what} {value!r} is not page aligned ({PAGE_SIZE} bytes)")


def check_page_range(op: str, start_name: str, start: object, size: object) -> None:
    """A non-empty range of whole pages: `start` and `size` page aligned, `size` positive."""
    check_positive_size(op, size)
    check_page_aligned(op, start_name, start)
    check_page_aligned(op, "size", size)


def check_datamatch(dm: Datamatch) -> None:
    """KVM_IOEVENTFD's rule for a datamatch: a length of 0 (any), 1, 2, 4 or 8 bytes, and a
    value (if any) that fits the length; EINVAL otherwise. Callers that check arguments
    before anything else may call it first (kvmd.core does)."""
    op = "KVM_IOEVENTFD"
    if dm.length not in (0, 1, 2, 4, 8):
        raise invalid(op, f"datamatch length {dm.length} is not 0, 1, 2, 4 or 8")
    if dm.value is not None and (dm.length == 0 or not 0 <= dm.value < 1 << (8 * dm.length)):
        raise invalid(op, f"datamatch value {dm.value!r} does not fit {dm.length} bytes")


def _chip_id(op: str, chip: IrqChip | int) -> int:
    """The kernel's chip id for `chip`, refusing (EINVAL, as KVM does) unknown chips."""
    if not isinstance(chip, int) or chip not in tuple(IrqChip):
        raise invalid(op, f"chip {chip!r} is not PIC_MASTER (0), PIC_SLAVE (1) or IOAPIC (2)")
    return int(chip)
