"""DirtyTracker: the daemon's view of dirty guest pages, for several consumers at once.

KVM keeps one dirty log per slot and (in the classic mode) resets it on every read. But
several parts of the daemon need their own view: the GetDirtyLog API, diff snapshots (pages
dirtied since the last snapshot) and a migration in progress (pages dirtied since the last
round). A harvest reads KVM's log once and ORs it into every consumer's bitmap; a consumer
takes (reads and clears) only its own. Host writes through the daemon (WriteGuestMemory)
mark pages for the daemon's own consumers (a snapshot or migration must carry them), but
not for the API's view, which reports what KVM reports: guest writes only. Bitmaps have
one bit per page of the slot, least significant bit first, as KVM's.
"""

from __future__ import annotations

import threading

from kvmd.kvm import PAGE_SIZE, MemoryRegionInfo, Vm

API = "api"  # GetDirtyLog: always present (KVM's log starts at the slot's creation)
SNAPSHOT = "snapshot"  # diff snapshots: pages dirtied since the last snapshot
MIGRATION = "migration"  # a migration's current round


class DirtyTracker:
    """Per-consumer dirty bitmaps over one VM's logging slots. Thread-safe."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        # consumer -> slot -> bitmap as an int (bit i: page i of the slot)
        self._consumers: dict[str, dict[int, int]] = {API: {}}
        self.harvested_pages = 0  # dirty pages KVM reported, all slots, ever

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

    def harvest(self, slots: list[MemoryRegionInfo] | None = None) -> None:
        """Read KVM's log of each logging slot (all of them by default) into every
        consumer's bitmap. The caller holds whatever keeps the slots alive (the VM lock)."""
        regions = slots if slots is not None else self._vm.memory_regions()
        for info in regions:
            if not info.log_dirty:
                continue
            bits = int.from_bytes(self._vm.get_dirty_log(info.slot), "little")
            if not bits:
                continue
            with self._lock:
                self.harvested_pages += bits.bit_count()
                for bitmaps in self._consumers.values():
                    bitmaps[info.slot] = bitmaps.get(info.slot, 0) | bits

    def take(self, name: str, info: MemoryRegionInfo) -> int:
        """Harvest the slot, then return and clear `name`'s bitmap of it (as an int)."""
        self.harvest([info])
        with self._lock:
            return self._consumers.get(name, {}).pop(info.slot, 0)

    def put_back(self, name: str, slot: int, bits: int) -> None:
        """Merge bits taken earlier back (the work that took them failed)."""
        with self._lock:
            bitmaps = self._consumers.get(name)
            if bitmaps is not None and bits:
                bitmaps[slot] = bitmaps.get(slot, 0) | bits

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
                    bitmaps[slot] = bitmaps.get(slot, 0) | bits

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


def page_runs(bits: int) -> list[tuple[int, int]]:
    """The runs of set bits as (first page, page count), in order."""
    runs: list[tuple[int, int]] = []
    base = 0
    while bits:
        skip = (bits & -bits).bit_length() - 1  # trailing zeros
        bits >>= skip
        base += skip
        ones = (~bits & (bits + 1)).bit_length() - 1  # trailing ones
        runs.append((base, ones))
        bits >>= ones
        base += ones
    return runs
