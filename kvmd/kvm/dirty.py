"""Dirty-page tracking: which modes the kernel offers, per-slot bitmaps, and vCPU dirty rings.

KVM reports the pages a guest wrote in one of three ways, all for slots added with
`log_dirty=True` (only guest writes count; host writes through the mapping never do):

* bitmap: `Vm.get_dirty_log(slot)` returns the slot's bitmap and re-protects those pages in
  the same call, so a page written after the call shows up in the next one.
* manual protect (`Vm.enable_manual_dirty_log_protect`): `get_dirty_log` only reads; the
  caller re-protects the pages it is about to copy with `Vm.clear_dirty_log`, in ranges of
  64 pages, which is cheaper for large guests and lets it copy before it re-protects. With
  `initially_set` a newly logged slot starts all-dirty, so the first round needs no
  write-protection pass at all.
* dirty ring (`Vm.enable_dirty_ring`, before any vCPU exists): each vCPU publishes the pages
  it dirties into a ring shared with userspace. `Vm.harvest_dirty_rings(bitmaps)` collects
  them (in C, into `DirtyBitmaps`), then `Vm.reset_dirty_rings()` re-protects them. A vCPU
  whose ring fills up returns `DirtyRingFullExit` from `run()`; see there.

`dirty_log_modes(check_extension)` (also `Kvm.dirty_log_modes()` and `Vm.dirty_log_modes()`)
says which of these the kernel offers.
"""

from __future__ import annotations

import errno
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvmd.kvm._ffi import ffi, lib, new_uncleared
from kvmd.kvm.errors import KvmError, invalid
from kvmd.kvm.memory import PAGE_SIZE, MemoryRegionInfo, dirty_log_bitmap_size

# struct kvm_dirty_gfn: flags, slot, offset (16 bytes).
DIRTY_GFN_SIZE = ffi.sizeof("struct kvm_dirty_gfn")
# The kernel refuses rings smaller than a page (and smaller than its reserved entries).
MIN_DIRTY_RING_BYTES = PAGE_SIZE
# Pages KVM_CLEAR_DIRTY_LOG works in: first_page and num_pages are multiples of this
# (num_pages may instead reach the end of the slot).
CLEAR_DIRTY_LOG_ALIGN = 64


@dataclass(frozen=True)
class DirtyLogModes:
    """The dirty-tracking modes a kernel offers (for the API's GetInfo).

    The bitmap (KVM_GET_DIRTY_LOG) is always there. `manual_protect`: KVM_CLEAR_DIRTY_LOG
    with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; `initially_set`: that mode can start slots
    all-dirty. `ring_max_bytes`: the largest dirty ring a vCPU may have (0: no ring);
    `ring_acq_rel`: the ring is offered with acquire/release ordering (the variant this
    binding enables where offered).
    """

    bitmap: bool = True
    manual_protect: bool = False
    initially_set: bool = False
    ring_max_bytes: int = 0
    ring_acq_rel: bool = False

    @property
    def ring(self) -> bool:
        return self.ring_max_bytes > 0


def dirty_log_modes(check_extension: Callable[[str], int]) -> DirtyLogModes:
    """Ask a KVM fd (its `check_extension`) which dirty-tracking modes it offers."""
    manual = check_extension("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    ring = check_extension("KVM_CAP_DIRTY_LOG_RING")
    acq_rel = check_extension("KVM_CAP_DIRTY_LOG_RING_ACQ_REL")
    return DirtyLogModes(
        manual_protect=bool(manual & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE),
        initially_set=bool(manual & lib.KVM_DIRTY_LOG_INITIALLY_SET),
        ring_max_bytes=max(ring, acq_rel),
        ring_acq_rel=acq_rel > 0,
    )


class DirtyBitmaps:
    """Per-slot dirty bitmaps in C memory that dirty-ring harvests set bits in.

    One bitmap per tracked slot, in uint64 words with one bit per page: bit `p` is page `p`
    of the slot, so `bitmap(slot)` has the layout of `Vm.get_dirty_log(slot)`. Bits
    accumulate across harvests until `take` or `clear`. A lock serializes harvests into the
    same bitmaps (a ring harvest sets bits without atomics).
    """

    def __init__(self, slots: dict[int, int]) -> None:
        """`slots` maps slot number to slot size in bytes."""
        if any(s < 0 or s >= 1 << 16 for s in slots):
            raise invalid("DirtyBitmaps", "slot numbers are 0..65535")
        self._lock = threading.Lock()
        self._sizes = dict(slots)
        n = max(slots, default=-1) + 1
        self._nslots = n
        self._ptrs = ffi.new("uint64_t *[]", max(n, 1))
        self._npages = ffi.new("uint64_t[]", max(n, 1))
        self._words: dict[int, Any] = {}
        for slot, size in slots.items():
            pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
            words = ffi.new("uint64_t[]", max((pages + 63) // 64, 1))
            self._words[slot] = words
            self._ptrs[slot] = words
            self._npages[slot] = pages
        self._dropped = ffi.new("uint64_t *")

    @classmethod
    def for_regions(cls, regions: Iterable[MemoryRegionInfo]) -> DirtyBitmaps:
        """Bitmaps for every slot among `regions` that logs dirty pages (e.g.
        `DirtyBitmaps.for_regions(vm.memory_regions())`)."""
        return cls({r.slot: r.size for r in regions if r.log_dirty})

    @property
    def slots(self) -> list[int]:
        return sorted(self._words)

    @property
    def dropped(self) -> int:
        """Ring entries harvested into these bitmaps that named no tracked slot or a page
        past one (a slot added after these bitmaps were made): nonzero means incomplete."""
        return int(self._dropped[0])

    def bitmap(self, slot: int) -> bytes:
        """The slot's bitmap, `dirty_log_bitmap_size(size)` bytes (as get_dirty_log)."""
        with self._lock:
            return bytes(ffi.buffer(self._words_of(slot), dirty_log_bitmap_size(
                self._sizes[slot])))

    def take(self, slot: int) -> bytes:
        """The slot's bitmap, cleared in the same step (for the next round)."""
        with self._lock:
            words = self._words_of(slot)
            size = dirty_log_bitmap_size(self._sizes[slot])
            out = bytes(ffi.buffer(words, size))
            ffi.memmove(words, bytes(ffi.sizeof(words)), ffi.sizeof(words))
            return out

    def dirty_pages(self, slot: int) -> list[int]:
        """Page numbers (within the slot) whose bit is set, ascending."""
        bits = int.from_bytes(self.bitmap(slot), "little")
        pages = []
        while bits:
            low = bits & -bits
            pages.append(low.bit_length() - 1)
            bits ^= low
        return pages

    def count(self, slot: int | None = None) -> int:
        """Set bits in one slot's bitmap, or in all of them."""
        slots = self.slots if slot is None else [slot]
        return sum(int.from_bytes(self.bitmap(s), "little").bit_count() for s in slots)

    def clear(self, slot: int | None = None) -> None:
        """Zero one slot's bitmap, or all of them (and the dropped count)."""
        with self._lock:
            for s in (self.slots if slot is None else [slot]):
                words = self._words_of(s)
                ffi.memmove(words, bytes(ffi.sizeof(words)), ffi.sizeof(words))
            if slot is None:
                self._dropped[0] = 0

    def _words_of(self, slot: int) -> Any:
        words = self._words.get(slot)
        if words is None:
            raise invalid("DirtyBitmaps", f"slot {slot} is not tracked", errno.ENOENT)
        return words

    def _harvest(self, ring: Any, entries: int, fetch_index: Any) -> int:
        with self._lock:
            return int(lib.kvmd_dirty_ring_harvest(ring, entries, fetch_index, self._ptrs,
                                                   self._npages, self._nslots, self._dropped))


class DirtyRing:
    """One vCPU's dirty ring: the mapping of its kvm_dirty_gfn entries (at page offset
    KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU fd) and the userspace fetch index. Owned by its
    Vcpu, which unmaps it in `close()`."""

    def __init__(self, vcpu_fd: int, size_bytes: int) -> None:
        ptr = lib.mmap(ffi.NULL, size_bytes, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED,
                       vcpu_fd, lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        if ptr == ffi.cast("void *", -1):
            raise KvmError(ffi.errno, "mmap(dirty ring)", f"{size_bytes} bytes")
        self._ptr = ptr
        self._gfns = ffi.cast("struct kvm_dirty_gfn *", ptr)
        self.size_bytes = size_bytes
        self.entries = size_bytes // DIRTY_GFN_SIZE
        self._fetch_index = ffi.new("uint32_t *")
        # Held while harvesting (GIL released in C), so close() cannot unmap meanwhile.
        self._lock = threading.Lock()

    @property
    def fetch_index(self) -> int:
        """Entries harvested so far (the kernel's indices wrap at 2^32 as this does)."""
        return int(self._fetch_index[0])

    def harvest(self, bitmaps: DirtyBitmaps) -> int:
        """Collect the ring's dirty entries into `bitmaps` and hand them back to the kernel
        (marked for reset); returns how many. The pages are re-protected, and the entries
        reusable, only after `Vm.reset_dirty_rings()`. Safe while the vCPU runs."""
        with self._lock:
            if self._ptr == ffi.NULL:
                raise KvmError(errno.EBADF, "harvest_dirty_ring", "vcpu is closed")
            return bitmaps._harvest(self._gfns, self.entries, self._fetch_index)

    def close(self) -> None:
        with self._lock:
            if self._ptr != ffi.NULL:
                lib.munmap(self._ptr, self.size_bytes)
                self._ptr = ffi.NULL
                self._gfns = ffi.NULL


def _words(bitmap: bytes | bytearray | memoryview) -> tuple[Any, int]:
    """A bitmap as the 64-bit words the C loops take (zero-padded to a whole word, copied
    only then), and how many."""
    view = memoryview(bitmap).cast("B")
    pad = -len(view) % 8
    data = bytes(view) + bytes(pad) if pad else view
    return ffi.from_buffer("uint64_t[]", data), len(data) // 8


def bitmap_runs(bitmap: bytes | bytearray | memoryview) -> tuple[array[int], array[int]]:
    """The runs of set bits of a dirty bitmap (bit i, least significant first: page i), as
    two arrays of the same length: first pages and page counts. In C, word by word: a
    4 GiB slot's 128 KiB bitmap takes well under a millisecond whatever its runs."""
    words, nwords = _words(bitmap)
    n = lib.kvmd_bitmap_runs(words, nwords, ffi.NULL, ffi.NULL)
    firsts, counts = array("Q", bytes(8 * n)), array("Q", bytes(8 * n))
    if n:
        lib.kvmd_bitmap_runs(words, nwords, ffi.from_buffer("uint64_t[]", firsts),
                             ffi.from_buffer("uint64_t[]", counts))
    return firsts, counts


U64_MAX = (1 << 64) - 1


def bitmap_runs_packed(bitmap: bytes | bytearray | memoryview, cap: int
                       ) -> tuple[bytes, bytes, int] | None:
    """The runs of `bitmap_runs` in one pass, already as the bodies of two packed repeated
    protobuf fields (first pages; page counts), and the pages they cover; None when either
    body would pass `cap` bytes (give the bitmap's size to have them only when shorter)."""
    words, nwords = _words(bitmap)
    # Uncleared, and copied once: zeroing two bitmap-sized buffers and slicing then copying
    # the bodies was a third of this call for a 4 GiB slot's log.
    firsts, counts = new_uncleared("uint8_t[]", cap), new_uncleared("uint8_t[]", cap)
    lens = ffi.new("uint64_t[3]")
    n = lib.kvmd_bitmap_runs_packed(words, nwords, firsts, counts, cap, lens)
    if n == U64_MAX:
        return None
    return ffi.buffer(firsts, lens[0])[:], ffi.buffer(counts, lens[1])[:], int(lens[2])


def bitmap_popcount(bitmap: bytes | bytearray | memoryview) -> int:
    """Set bits of a bitmap (in C: no big int made of it)."""
    view = memoryview(bitmap).cast("B")
    if not len(view):
        return 0
    return int(lib.kvmd_bitmap_popcount(ffi.from_buffer("uint8_t[]", view), len(view)))


def bitmap_or(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """A new bitmap, `a | b` (the same length), in C; neither argument changes."""
    if len(a) != len(b):
        raise ValueError(f"bitmaps of {len(a)} and {len(b)} bytes")
    out = bytearray(a)
    if out:
        lib.kvmd_bitmap_or(ffi.from_buffer("uint8_t[]", out), ffi.from_buffer("uint8_t[]", b),
                           len(out))
    return out


def pack_varints(values: array[int]) -> tuple[bytes, int]:
    """Unsigned 64-bit `values` (array "Q") as the body of a packed repeated protobuf field
    (varints back to back), and their sum; in C."""
    n = len(values)
    if not n:
        return b"", 0
    out = bytearray(10 * n)
    total = ffi.new("uint64_t *")
    size = lib.kvmd_pack_varints(ffi.from_buffer("uint64_t[]", values), n,
                                 ffi.from_buffer("uint8_t[]", out), total)
    del out[size:]
    return bytes(out), int(total[0])


def max_u64(values: array[int]) -> int:
    """The largest of unsigned 64-bit `values` (array "Q"), 0 for none; in C."""
    if not len(values):
        return 0
    return int(lib.kvmd_max_u64(ffi.from_buffer("uint64_t[]", values), len(values)))
