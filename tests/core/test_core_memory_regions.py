"""ManagedVm's memory regions and dirty logs on the real /dev/kvm: what a refused
AddMemoryRegion gives back (descriptors, memory budget), that a removed slot's dirty pages
do not reach a slot reusing its number, that a slot logged only for a migration stays
unlogged to GetDirtyLog, that turning logging off loses no logged page, ClearDirtyLog's
page bounds and MeasureDirtyRate's duration bounds."""

from __future__ import annotations

import struct
import time

import pytest

from kvmd.core.errors import AlreadyExists, DomainError, InvalidArgument, Reason
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import PAGE_SIZE, Regs

CODE = 0x1000


def test_a_region_the_kernel_refuses_gives_back_its_descriptors_and_budget(
        host: Host) -> None:
    """An overlapping slot, refused by KVM, leaves the owner's descriptor count and the
    daemon's memory budget as they were: refusals repeated never exhaust either."""
    vm = host.create_vm("overlap", {}, VmOptions())
    vm.add_memory_region(0, 0x10000, False, False)
    held, in_use = host.fds.held_by("local"), host.budget.in_use
    for _ in range(3):
        with pytest.raises(DomainError) as caught:
            vm.add_memory_region(0x8000, 0x10000, False, False)
        assert isinstance(caught.value, AlreadyExists), caught.value
    assert (host.fds.held_by("local"), host.budget.in_use) == (held, in_use)
    assert [(r.guest_addr, r.size) for r in vm.memory_regions()] == [(0, 0x10000)]


def _guest_stores(vm: ManagedVm, pages: list[int]) -> None:
    """Run a real-mode guest that stores one byte at the first byte of each page, then
    halts (a guest write, which KVM logs)."""
    code = bytes([0x31, 0xC0, 0x8E, 0xD8])  # xor ax, ax; mov ds, ax
    for page in pages:
        code += bytes([0xC6, 0x06]) + struct.pack("<H", page * PAGE_SIZE) + b"\xab"
    vm.write_memory(CODE, code + b"\xf4")
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "ss"):
        seg = getattr(sregs, name)
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=CODE, rsp=0x8000, rflags=2))
    vm.start()
    deadline = time.monotonic() + 10
    while vcpu.state != "halted":
        assert time.monotonic() < deadline, f"the guest did not halt ({vcpu.state})"
        time.sleep(0.005)


def test_a_removed_slots_dirty_pages_do_not_reappear_in_a_new_slot(host: Host) -> None:
    """Pages the guest dirtied in a slot, already harvested (turning logging off does),
    go with the slot: a new region given the same slot number reports none of them."""
    vm = host.create_vm("reuse", {}, VmOptions())
    vm.add_memory_region(0, 8 * PAGE_SIZE, False, False)
    logged = vm.add_memory_region(8 * PAGE_SIZE, 8 * PAGE_SIZE, False, True)
    _guest_stores(vm, [11, 13])  # pages 3 and 5 of the logged slot
    vm.set_dirty_logging(logged.slot, False)  # harvests what KVM logged
    vm.remove_memory_region(logged.slot)
    again = vm.add_memory_region(0x40000, 8 * PAGE_SIZE, False, True)
    assert again.slot == logged.slot
    assert not any(vm.get_dirty_log(again.slot)[1])



def test_a_slot_logging_only_for_a_migration_still_refuses_get_dirty_log(
        host: Host) -> None:
    """While the VM migrates, a slot added without dirty logging is logged for the
    migration only: to callers it stays unlogged, and GetDirtyLog on it is refused
    (SLOT_NOT_LOGGED) rather than handing out the migration's pages."""
    vm = host.create_vm("migrating", {}, VmOptions())
    plain = vm.add_memory_region(0, 8 * PAGE_SIZE, False, False)
    logged = vm.add_memory_region(8 * PAGE_SIZE, 8 * PAGE_SIZE, False, True)
    vm.begin_migration("stand-in:1")
    try:
        assert [r.log_dirty for r in vm.memory_regions()] == [False, True]
        with pytest.raises(InvalidArgument) as caught:
            vm.get_dirty_log(plain.slot)
        assert caught.value.reason == Reason.SLOT_NOT_LOGGED
        assert vm.get_dirty_log(logged.slot)[0].slot == logged.slot
    finally:
        vm.end_migration()


@pytest.mark.parametrize(("first", "count"), [(7, 2), (8, 1), (-1, 1), (0, 0)])
def test_clear_dirty_log_refuses_pages_outside_the_slot(host: Host, first: int,
                                                        count: int) -> None:
    """Manual mode: ClearDirtyLog's ranges must be non-empty and lie within the slot's
    pages (one page past its end is refused: RANGE_OUTSIDE_MEMORY on `ranges`); the whole
    slot is fine."""
    vm = host.create_vm("manual", {}, VmOptions(dirty_tracking="manual"))
    info = vm.add_memory_region(0, 8 * PAGE_SIZE, False, True)
    vm.clear_dirty_log(info.slot, [(0, 8)])
    with pytest.raises(InvalidArgument) as caught:
        vm.clear_dirty_log(info.slot, [(first, count)])
    assert (caught.value.reason, caught.value.field) == (Reason.RANGE_OUTSIDE_MEMORY,
                                                         "ranges")


def test_pages_logged_before_logging_is_turned_off_are_not_lost(host: Host) -> None:
    """Turning a slot's dirty logging off first collects what KVM logged so far: the
    pages the guest dirtied before are counted and GetDirtyLog reports them once logging
    is back on."""
    vm = host.create_vm("toggle", {}, VmOptions())
    vm.add_memory_region(0, 8 * PAGE_SIZE, False, False)
    logged = vm.add_memory_region(8 * PAGE_SIZE, 8 * PAGE_SIZE, False, True)
    _guest_stores(vm, [11, 13])  # pages 3 and 5 of the logged slot
    vm.set_dirty_logging(logged.slot, False)
    assert vm.dirty_pages_total == 2
    vm.set_dirty_logging(logged.slot, True)
    assert int.from_bytes(vm.get_dirty_log(logged.slot)[1], "little") == 1 << 3 | 1 << 5


@pytest.mark.parametrize(("duration_ms", "reason"), [
    (60_000, Reason.DIRTY_MODE), (0, Reason.DIRTY_MODE),
    (60_001, Reason.VALUE_OUT_OF_RANGE), (-1, Reason.VALUE_OUT_OF_RANGE)])
def test_measure_dirty_rate_takes_durations_up_to_a_minute(
        host: Host, duration_ms: int, reason: Reason) -> None:
    """MeasureDirtyRate's duration is 0-60000 ms, both ends included: on a VM without a
    logged slot, a duration in range is refused for the VM (DIRTY_MODE), one outside for
    itself (VALUE_OUT_OF_RANGE), before anything is measured."""
    vm = host.create_vm("rate", {}, VmOptions())
    vm.add_memory_region(0, 8 * PAGE_SIZE, False, False)
    with pytest.raises(DomainError) as caught:
        vm.measure_dirty_rate(duration_ms)
    assert caught.value.reason == reason
