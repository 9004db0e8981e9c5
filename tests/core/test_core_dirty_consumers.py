"""DirtyTracker's consumers over a stand-in VM whose dirty log is scripted: each consumer
gets every dirty page once, whether its bitmap is still KVM's bytes (harvests only) or has
become an int (host writes, clears, bits put back)."""

from __future__ import annotations

from typing import Any, cast

from kvmd.core.dirty import API, MIGRATION, SNAPSHOT, DirtyTracker, bitmap_bytes
from kvmd.kvm import PAGE_SIZE, MemoryRegionInfo, Vm

PAGES = 200
INFO = MemoryRegionInfo(slot=0, guest_addr=0, size=PAGES * PAGE_SIZE, read_only=False,
                        log_dirty=True)


class ScriptedVm:
    """get_dirty_log answers the next bitmap queued (then nothing dirty)."""

    def __init__(self) -> None:
        self.logs: list[bytes] = []

    def memory_regions(self) -> list[MemoryRegionInfo]:
        return [INFO]

    def get_dirty_log(self, slot: int) -> bytes:
        return self.logs.pop(0) if self.logs else bytes((PAGES + 7) // 8)

    def clear_dirty_log(self, *args: Any) -> None:
        pass


def pages(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


def tracker() -> tuple[DirtyTracker, ScriptedVm]:
    vm = ScriptedVm()
    return DirtyTracker(cast(Vm, vm)), vm


def test_each_consumer_gets_each_page_once() -> None:
    t, vm = tracker()
    t.add_consumer(SNAPSHOT)
    vm.logs = [bitmap_bytes(pages(1, 199), PAGES)]
    assert t.take_bitmap(API, INFO) == bitmap_bytes(pages(1, 199), PAGES)
    assert t.take_bitmap(API, INFO) == bytes((PAGES + 7) // 8)  # taken: nothing again
    vm.logs = [bitmap_bytes(pages(2, 64), PAGES)]
    assert t.harvest() == 2
    # The snapshot's view: both harvests, OR-ed (bytes with bytes), once.
    assert t.take(SNAPSHOT, INFO) == pages(1, 2, 64, 199)
    assert t.take(SNAPSHOT, INFO) == 0
    assert t.take(API, INFO) == pages(2, 64)
    assert t.harvested_pages == 4


def test_harvest_onto_an_int_bitmap_and_back_to_bytes() -> None:
    t, vm = tracker()
    t.add_consumer(SNAPSHOT)
    t.mark(0, 5 * PAGE_SIZE, 2 * PAGE_SIZE)  # host write: the snapshot's, not the API's
    vm.logs = [bitmap_bytes(pages(0, 6), PAGES)]
    t.harvest()
    assert t.take(SNAPSHOT, INFO) == pages(0, 5, 6)
    assert t.take_bitmap(API, INFO) == bitmap_bytes(pages(0, 6), PAGES)
    t.put_back(SNAPSHOT, 0, pages(3))
    vm.logs = [bitmap_bytes(pages(4), PAGES)]
    assert t.peek_bitmap(SNAPSHOT, INFO) == bitmap_bytes(pages(3, 4), PAGES)
    t.clear(SNAPSHOT, 0, 3, 1)
    assert t.peek(SNAPSHOT, INFO) == pages(4)


def test_a_shared_harvest_is_never_changed_in_place() -> None:
    t, vm = tracker()
    t.add_consumer(SNAPSHOT)
    first = bitmap_bytes(pages(1), PAGES)
    vm.logs = [first]
    t.harvest()  # both consumers now hold KVM's bytes
    vm.logs = [bitmap_bytes(pages(2), PAGES)]
    assert t.take_bitmap(API, INFO) == bitmap_bytes(pages(1, 2), PAGES)
    assert first == bitmap_bytes(pages(1), PAGES)
    assert t.take(SNAPSHOT, INFO) == pages(1, 2)


def test_bits_put_back_merge_with_pages_dirtied_since() -> None:
    """A failed snapshot puts back what it took; pages harvested meanwhile stay too."""
    t, vm = tracker()
    t.add_consumer(SNAPSHOT)
    vm.logs = [bitmap_bytes(pages(3), PAGES)]
    taken = t.take(SNAPSHOT, INFO)
    assert taken == pages(3)
    vm.logs = [bitmap_bytes(pages(7), PAGES)]
    t.harvest()  # the guest dirtied page 7 while the snapshot ran
    t.put_back(SNAPSHOT, INFO.slot, taken)
    assert t.take(SNAPSHOT, INFO) == pages(3, 7)


def test_host_writes_mark_every_page_they_touch() -> None:
    t, _ = tracker()
    t.add_consumer(SNAPSHOT)
    t.mark(INFO.slot, 0, 1)  # one byte
    assert t.take(SNAPSHOT, INFO) == pages(0)
    t.mark(INFO.slot, PAGE_SIZE - 1, 2)  # across a page boundary
    assert t.take(SNAPSHOT, INFO) == pages(0, 1)
    t.mark(INFO.slot, 5 * PAGE_SIZE, PAGE_SIZE)  # exactly one page
    assert t.take(SNAPSHOT, INFO) == pages(5)
    assert t.take(API, INFO) == 0  # the API's view follows KVM: guest writes only


def test_a_removed_slot_leaves_no_bits_in_any_consumer() -> None:
    """A new slot that takes the number must not inherit the old one's pages."""
    t, vm = tracker()
    t.add_consumer(SNAPSHOT)
    t.add_consumer(MIGRATION)
    vm.logs = [bitmap_bytes(pages(4, 9), PAGES)]
    t.harvest()
    t.mark(INFO.slot, 0, PAGE_SIZE)
    t.forget_slot(INFO.slot)
    for consumer in (API, SNAPSHOT, MIGRATION):
        assert t.take(consumer, INFO) == 0, consumer


def test_a_measured_rate_counts_only_the_pages_dirtied_while_measuring() -> None:
    """measure_rate harvests first: pages KVM logged before the measurement are not counted
    in its pages or rate, but still reach every consumer (nothing is lost)."""
    t, vm = tracker()
    vm.logs = [bitmap_bytes(pages(1, 2, 3), PAGES),  # dirtied before the measurement
               bitmap_bytes(pages(4, 5), PAGES)]  # dirtied during it
    dirtied, seconds = t.measure_rate(0.001)
    assert dirtied == 2 and seconds > 0
    assert t.rate == dirtied / seconds
    assert t.take(API, INFO) == pages(1, 2, 3, 4, 5)


class TwoSlotVm(ScriptedVm):
    """Slot 0 logs dirty pages, slot 1 does not: KVM refuses its dirty log (ENOENT)."""

    UNLOGGED = MemoryRegionInfo(slot=1, guest_addr=PAGES * PAGE_SIZE, size=PAGES * PAGE_SIZE,
                                read_only=False, log_dirty=False)

    def memory_regions(self) -> list[MemoryRegionInfo]:
        return [INFO, self.UNLOGGED]

    def get_dirty_log(self, slot: int) -> bytes:
        assert slot == INFO.slot, f"the dirty log of slot {slot}, which logs nothing"
        return super().get_dirty_log(slot)


def test_a_harvest_of_every_slot_reads_only_the_logging_ones() -> None:
    """harvest() of a VM with a slot that does not log dirty pages reads the logging slots
    only (KVM has no log for the other)."""
    vm = TwoSlotVm()
    t = DirtyTracker(cast(Vm, vm))
    vm.logs = [bitmap_bytes(pages(8), PAGES)]
    assert t.harvest() == 1
    assert t.take(API, INFO) == pages(8)


def test_mark_all_marks_every_page_of_the_slot_the_last_included() -> None:
    """mark_all (dirty logging turned off: the consumer cannot track the slot) makes every
    page of the slot dirty for that consumer, the last one too, and for no other."""
    t, _ = tracker()
    t.add_consumer(SNAPSHOT)
    t.mark_all(SNAPSHOT, INFO)
    assert t.take_bitmap(SNAPSHOT, INFO) == bitmap_bytes((1 << PAGES) - 1, PAGES)
    assert t.take(API, INFO) == 0
