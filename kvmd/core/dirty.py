"""DirtyTracker: the daemon's view of dirty guest pages, for several consumers at once.

KVM keeps one dirty log per slot and (in the classic mode) resets it on every read. But
several parts of the daemon need their own view: the GetDirtyLog API, diff snapshots (pages
dirtied since the last snapshot) and a migration in progress (pages dirtied since the last
round). A harvest reads KVM's log once and ORs it into every consumer's bitmap; a consumer
takes (reads and clears) only its own. Host writes through the daemon (WriteGuestMemory)
mark pages for the daemon's own consumers (a snapshot or migration must carry them), but
not for the API's view, which reports what KVM reports: guest writes only. Bitmaps have
one bit per page of the slot, least significant bit first, as KVM's.

A consumer's bitmap of a slot is kept as KVM returned it (bytes) for as long as harvests
only add to it: the first harvest stores KVM's bytes as they are (shared, never changed in
place), later ones OR into a new copy in C. Only the rarer edits (host writes, clears,
bits put back) turn it into an int. So a harvest and a GetDirtyLog of a big slot cost the
ioctl and a pass or two in C, not big-int conversions of the whole bitmap per consumer.
"""

from __future__ import annotations

import logging
import threading
import time

from kvmd.kvm import (
    PAGE_SIZE,
    DirtyBitmaps,
    MemoryRegionInfo,
    Vm,
    bitmap_or,
    bitmap_popcount,
    bitmap_runs,
)

API = "api"  # GetDirtyLog: always present (KVM's log starts at the slot's creation)
SNAPSHOT = "snapshot"  # diff snapshots: pages dirtied since the last snapshot
MIGRATION = "migration"  # a migration's current round

# How KVM reports dirty pages for a VM (chosen at creation; see kvmd.kvm.dirty):
BITMAP = "bitmap"  # KVM_GET_DIRTY_LOG, which also re-protects what it reports
MANUAL = "manual"  # KVM_GET_DIRTY_LOG only reads; KVM_CLEAR_DIRTY_LOG re-protects
RING = "ring"  # per-vCPU dirty rings, harvested by the daemon
MODES = (BITMAP, MANUAL, RING)
# How often the daemon empties a ring VM's dirty rings without waiting for a ring-full exit
# (QEMU's dirty-ring reaper does the same): a ring kept short never overruns. That matters on
# hosts whose KVM checks the ring's soft limit only at guest entry (PVM: a guest storing in
# a long loop between exits pushes past the soft limit and overwrites entries; see
# tests/kvm/test_kvm_dirty.py), and keeps ring-full exits out of a busy guest's path.
REAP_INTERVAL_S = 0.02

log = logging.getLogger(__name__)

# A consumer's bitmap of a slot: KVM's bytes, or an int (bit i: page i).
Bitmap = int | bytes | bytearray


def _as_int(bits: Bitmap) -> int:
    return bits if isinstance(bits, int) else int.from_bytes(bits, "little")


def _merge(old: Bitmap, new: bytes) -> Bitmap:
    """old | new, without changing either (bytes may be shared between consumers)."""
    if not isinstance(old, int) and len(old) == len(new):
        return bitmap_or(old, new)
    return _as_int(old) | int.from_bytes(new, "little")


class DirtyTracker:
    """Per-consumer dirty bitmaps over one VM's logging slots, filled from KVM in the VM's
    mode. Thread-safe."""

    def __init__(self, vm: Vm, mode: str = BITMAP) -> None:
        self._vm = vm
        self.mode = mode
        self._lock = threading.Lock()
        self._harvest_lock = threading.Lock()  # one harvest at a time (rings, clears)
        # consumer -> slot -> bitmap (see Bitmap)
        self._consumers: dict[str, dict[int, Bitmap]] = {API: {}}
        self.harvested_pages = 0  # dirty pages KVM reported, all slots, ever
        self.rate = 0.0  # pages/s, from the last MeasureDirtyRate or migration round
        self.rate_unix_ms = 0
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()

    # -- the ring reaper ------------------------------------------------------------------

    def start_reaper(self, name: str) -> None:
        """Ring mode: harvest the rings every REAP_INTERVAL_S from a thread of its own."""
        if self.mode != RING or self._reaper is not None:
            return
        reaper = threading.Thread(target=self._reap, daemon=True, name=f"dirty-reaper-{name}")
        reaper.start()  # may fail (a tasks limit): then there is no reaper to stop
        self._reaper = reaper

    def stop_reaper(self) -> None:
        """Before the VM's fds close: waits for a harvest in progress."""
        self._reaper_stop.set()
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper is not threading.current_thread():
            reaper.join()

    def _reap(self) -> None:
        while not self._reaper_stop.wait(REAP_INTERVAL_S):
            try:
                self.harvest()
            except Exception as exc:  # a slot going away meanwhile: the next round sees it
                log.debug("dirty ring reap failed", extra={"error": str(exc)})

    # -- consumers ------------------------------------------------------------------------

    def add_consumer(self, name: str) -> None:
        """Start tracking for `name` from now on (a no-op if it already is)."""
        with self._lock:
            self._consumers.setdefault(name, {})

    def remove_consumer(self, name: str) -> None:
        with self._lock:
            if name != API:
                self._consumers.pop(name, None)

    def has_consumer(self, name: str) -> bool:
        with self._lock:
            return name in self._consumers

    # -- reading --------------------------------------------------------------------------

    def harvest(self, slots: list[MemoryRegionInfo] | None = None) -> int:
        """Read KVM's dirty pages of each logging slot (all of them by default) into every
        consumer's bitmap, re-protecting them; returns the pages KVM reported. The caller
        holds whatever keeps the slots alive (the VM lock). With rings every slot is
        harvested whatever `slots` says: a ring holds them all."""
        with self._harvest_lock:
            if self.mode == RING:
                return self._harvest_rings()
            regions = slots if slots is not None else self._vm.memory_regions()
            total = 0
            for info in regions:
                if not info.log_dirty:
                    continue
                raw = self._vm.get_dirty_log(info.slot)
                pages = bitmap_popcount(raw)
                if not pages:
                    continue
                if self.mode == MANUAL:  # re-protect exactly what was reported
                    self._vm.clear_dirty_log(info.slot, 0, info.size // PAGE_SIZE, raw)
                total += self._distribute(info.slot, raw, pages)
            return total

    def _harvest_rings(self) -> int:
        bitmaps = DirtyBitmaps.for_regions(self._vm.memory_regions())
        self._vm.harvest_dirty_rings(bitmaps)
        self._vm.reset_dirty_rings()
        total = 0
        for slot in bitmaps.slots:
            raw = bitmaps.bitmap(slot)
            pages = bitmap_popcount(raw)
            if pages:
                total += self._distribute(slot, raw, pages)
        return total

    def _distribute(self, slot: int, raw: bytes, pages: int) -> int:
        """OR KVM's bitmap `raw` of a slot (`pages` bits set) into every consumer's."""
        with self._lock:
            self.harvested_pages += pages
            for bitmaps in self._consumers.values():
                old = bitmaps.get(slot)
                bitmaps[slot] = _merge(old, raw) if old else raw
        return pages

    def peek(self, name: str, info: MemoryRegionInfo) -> int:
        """Harvest the slot, then return `name`'s bitmap of it without clearing it (the
        API's manual mode: the caller clears the ranges it handled)."""
        self.harvest([info])
        with self._lock:
            return _as_int(self._consumers.get(name, {}).get(info.slot, 0))

    def peek_bitmap(self, name: str, info: MemoryRegionInfo) -> bytes:
        """`peek`, as KVM's bytes (`bitmap_bytes`)."""
        self.harvest([info])
        with self._lock:
            return _to_bytes(self._consumers.get(name, {}).get(info.slot, 0), info)

    def clear(self, name: str, slot: int, first_page: int, pages: int) -> None:
        """Clear pages [first_page, first_page+pages) of `name`'s bitmap of a slot."""
        mask = ((1 << pages) - 1) << first_page
        with self._lock:
            bitmaps = self._consumers.get(name)
            if bitmaps is not None and slot in bitmaps:
                bitmaps[slot] = _as_int(bitmaps[slot]) & ~mask

    def measure_rate(self, seconds: float) -> tuple[int, float]:
        """Pages the guest dirtied over `seconds`, and the seconds it took (as QEMU's
        calc-dirty-rate): harvest, wait, harvest again. The pages still go to every
        consumer: nothing is lost. Records the rate."""
        self.harvest()
        started = time.monotonic()
        time.sleep(seconds)
        pages = self.harvest()
        elapsed = time.monotonic() - started
        self.note_rate(pages, elapsed)
        return pages, elapsed

    def note_rate(self, pages: int, seconds: float) -> None:
        """Record a dirty rate measured elsewhere (a migration round)."""
        if seconds > 0:
            self.rate = pages / seconds
            self.rate_unix_ms = int(time.time() * 1000)

    def take(self, name: str, info: MemoryRegionInfo) -> int:
        """Harvest the slot, then return and clear `name`'s bitmap of it (as an int)."""
        self.harvest([info])
        with self._lock:
            return _as_int(self._consumers.get(name, {}).pop(info.slot, 0))

    def take_bitmap(self, name: str, info: MemoryRegionInfo) -> bytes:
        """`take`, as KVM's bytes (`bitmap_bytes`)."""
        self.harvest([info])
        with self._lock:
            return _to_bytes(self._consumers.get(name, {}).pop(info.slot, 0), info)

    def put_back(self, name: str, slot: int, bits: int) -> None:
        """Merge bits taken earlier back (the work that took them failed)."""
        with self._lock:
            bitmaps = self._consumers.get(name)
            if bitmaps is not None and bits:
                bitmaps[slot] = _as_int(bitmaps.get(slot, 0)) | bits

    # -- writing --------------------------------------------------------------------------

    def mark(self, slot: int, offset: int, length: int) -> None:
        """Host bytes [offset, offset+length) of a slot were written: dirty for the
        daemon's own consumers (not the API's, which follows KVM: guest writes only)."""
        if length <= 0:
            return
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        bits = ((1 << (last - first + 1)) - 1) << first
        with self._lock:
            for name, bitmaps in self._consumers.items():
                if name != API:
                    bitmaps[slot] = _as_int(bitmaps.get(slot, 0)) | bits

    def mark_all(self, name: str, info: MemoryRegionInfo) -> None:
        """Every page of a slot is dirty for `name` (a slot it cannot track otherwise)."""
        pages = info.size // PAGE_SIZE
        with self._lock:
            bitmaps = self._consumers.get(name)
            if bitmaps is not None:
                bitmaps[info.slot] = (1 << pages) - 1

    def forget_slot(self, slot: int) -> None:
        """The slot was removed: its bits mean nothing any more."""
        with self._lock:
            for bitmaps in self._consumers.values():
                bitmaps.pop(slot, None)


def bitmap_bytes(bits: int, pages: int) -> bytes:
    """A bitmap int as KVM's byte layout: one bit per page, LSB first, whole bytes."""
    return bits.to_bytes((pages + 7) // 8, "little")


def _to_bytes(bits: Bitmap, info: MemoryRegionInfo) -> bytes:
    pages = info.size // PAGE_SIZE
    if isinstance(bits, int):
        return bitmap_bytes(bits, pages)
    if len(bits) != (pages + 7) // 8:  # not from this slot's size: as bitmap_bytes would
        return bitmap_bytes(int.from_bytes(bits, "little"), pages)
    return bytes(bits)


def page_runs(bits: int) -> list[tuple[int, int]]:
    """The runs of set bits as (first page, page count), in order (in C: the cost follows
    the bitmap's size, whatever its runs)."""
    if bits <= 0:
        return []
    firsts, counts = bitmap_runs(bits.to_bytes((bits.bit_length() + 7) // 8, "little"))
    return list(zip(firsts, counts, strict=True))
