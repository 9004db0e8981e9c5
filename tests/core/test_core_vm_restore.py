"""save_state, restore_state and resume_run_states of a VM object, without gRPC: what a
restore refuses, the counts and clocks that travel, and the run state each vCPU is put
back in."""

from __future__ import annotations

import dataclasses
import time

import pytest
from core_guests import SPIN
from guests import GUEST_MEM_SIZE, boot
from polling import wait_until

from kvmd.core.errors import (
    InvalidArgument,
    InvalidState,
    Reason,
    ResourceExhausted,
)
from kvmd.core.host import Host
from kvmd.core.state import SlotState
from kvmd.core.vm import VmOptions
from kvmd.kvm import IoSpace


def test_a_restore_needs_a_vm_without_vcpus_and_within_the_limit(host: Host) -> None:
    """A restore goes only into a new VM: restore_state and restore_memory_layout refuse
    one with vCPUs (VM_NOT_NEW). A saved VM with more vCPUs than max_vcpus_per_vm (2
    here) is refused before any is made."""
    source = host.create_vm("two", {}, VmOptions())
    for i in range(2):
        source.create_vcpu(i)
    saved = source.save_state()
    target = host.create_vm("target", {}, VmOptions())
    target.create_vcpu(0)
    with pytest.raises(InvalidState) as caught:
        target.restore_state(saved)
    assert caught.value.reason == Reason.VM_NOT_NEW
    assert [v.id for v in target.vcpus()] == [0]
    with pytest.raises(InvalidState) as caught:
        target.restore_memory_layout(saved.slots)
    assert caught.value.reason == Reason.VM_NOT_NEW
    three = dataclasses.replace(saved, vcpus=[
        *saved.vcpus, dataclasses.replace(saved.vcpus[1], vcpu_id=2)])
    fresh = host.create_vm("fresh", {}, VmOptions())
    with pytest.raises(ResourceExhausted) as exhausted:
        fresh.restore_state(three)
    assert exhausted.value.reason == Reason.LIMIT_VCPUS
    assert fresh.vcpus() == []


def test_a_saved_layout_over_the_slot_limit_is_refused_before_any_slot(host: Host) -> None:
    """A saved VM with more memory slots than max_memory_slots_per_vm (4 here) is refused
    whole, before any slot is made."""
    vm = host.create_vm("many-slots", {}, VmOptions())
    slots = [SlotState(i, i * 0x100000, 0x1000, False, False) for i in range(5)]
    with pytest.raises(ResourceExhausted) as caught:
        vm.restore_memory_layout(slots)
    assert caught.value.reason == Reason.LIMIT_MEMORY_SLOTS
    assert vm.memory_regions() == []
    vm.restore_memory_layout(slots[:4])
    assert [r.slot for r in vm.memory_regions()] == [0, 1, 2, 3]


def test_irqfd_and_ioevent_counts_survive_a_restore(host: Host) -> None:
    """A restored VM's irqfds and ioevents carry on counting from the saved triggers,
    resamples and guest writes."""
    source = host.create_vm("counted", {}, VmOptions(irqchip=True))
    irqfd = source.register_irqfd("level", 5, True)
    ioevent = source.register_ioevent("bell", IoSpace.PIO, 0x99, 1, None)
    irqfd.triggers, irqfd.resamples, ioevent.fired = 3, 4, 5
    target = host.create_vm("restored", {}, VmOptions(irqchip=True))
    target.restore_state(source.save_state())
    assert [(e.irqfd_id, e.triggers, e.resamples) for e in target.irqfds()] == [
        ("level", 3, 4)]
    assert [(e.ioevent_id, e.fired) for e in target.ioevents()] == [("bell", 5)]


def test_pit_load_times_travel_relative_to_now(host: Host) -> None:
    """A saved PIT channel's load time is relative to the moment of the save (it is the
    host's monotonic clock, meaningless on another host), and a restore rebases it on the
    restoring host's clock."""
    source = host.create_vm("pit-src", {}, VmOptions(irqchip=True, pit=True))
    source.create_vcpu(0)
    pit = source.vm.get_pit2()
    pit.channels[0].count_load_time = time.monotonic_ns() - 5_000_000  # loaded 5 ms ago
    source.vm.set_pit2(pit)
    saved = source.save_state()
    assert saved.pit is not None
    loads = [ch.count_load_time for ch in saved.pit.channels]
    assert all(-60_000_000_000 < t < 0 for t in loads if t) and loads[0] <= -5_000_000, loads
    target = host.create_vm("pit-dst", {}, VmOptions(irqchip=True, pit=True))
    before = time.monotonic_ns()
    target.restore_state(saved)
    after = time.monotonic_ns()
    got = target.vm.get_pit2().channels[0].count_load_time
    assert before + loads[0] <= got <= after + loads[0]


def test_a_crashed_vm_is_restored_crashed(host: Host) -> None:
    """A VM saved after its guest crashed comes back crashed, with its crash reason, not as
    a new VM: its vCPU was started once, and is not started again by the restore."""
    source = host.create_vm("crashes", {}, VmOptions(strict_io=True))
    boot(source, bytes([0xBA, 0x34, 0x12, 0xEE, 0xF4]))  # out dx=0x1234, al: unclaimed
    source.start()
    wait_until(lambda: source.state == "crashed", 10, "the VM to crash")
    saved = source.save_state()
    target = host.create_vm("restored", {}, VmOptions(strict_io=True))
    target.restore_state(saved)
    target.resume_run_states(saved, start=True)
    assert target.vcpu(0).state == "crashed" and target.state == "crashed"
    assert target.reason == "unclaimed port write at 0x1234"


def test_a_restore_with_start_starts_only_a_vm_that_never_ran(host: Host) -> None:
    """resume_run_states(start=True) starts a saved VM only if every vCPU was created (as
    StartVm would): one with a stopped vCPU among created ones stays as saved."""
    source = host.create_vm("half", {}, VmOptions())
    boot(source, SPIN, vcpus=2)
    source.stop_vcpu(0)
    saved = source.save_state()
    target = host.create_vm("half-restored", {}, VmOptions())
    target.restore_state(saved)
    target.resume_run_states(saved, start=True)
    assert [v.state for v in target.vcpus()] == ["stopped", "created"]


def test_a_halted_vcpu_restored_as_saved_halts_again(host: Host) -> None:
    """A VM saved under a hold while its vCPU was halted (HLT without the in-kernel
    irqchip), restored and put back exactly as saved (a migration, a hand-over): the vCPU
    waits halted again, it is not made to run on past its HLT."""
    source = host.create_vm("halter", {}, VmOptions())
    boot(source, bytes([0xF4, 0xEB, 0xFE]))  # hlt; then spin (reached only if run past it)
    source.start()
    wait_until(lambda: source.vcpu(0).state == "halted", 10, "the vCPU to halt")
    with source.held_paused("migration") as hold:
        saved = source.save_state(hold.run_states)
        memory = source.read_memory(0, GUEST_MEM_SIZE)
    source.stop()
    target = host.create_vm("halter-restored", {}, VmOptions())
    target.restore_memory_layout(saved.slots)
    target.write_memory(0, memory)
    target.restore_state(saved)
    target.resume_run_states(saved, start=False)
    assert target.vcpu(0).state == "paused"
    assert target.resume_saved_run_states(saved)
    assert target.vcpu(0).state == "halted" and target.state == "running"
    target.stop()


def test_a_saved_vms_options_are_checked_as_create_vms_are(host: Host) -> None:
    """A restore builds its VM from the saved options (not through CreateVm's checks): a
    PIT without the in-kernel irqchip is refused there too, as a conflict of options, and
    leaves nothing behind."""
    in_use = host.fds.in_use
    with pytest.raises(InvalidArgument) as caught:
        host.build_vm("crafted", {}, VmOptions(pit=True), "local")
    assert (caught.value.reason, caught.value.field) == (Reason.ARGUMENTS_CONFLICT,
                                                         "options.pit")
    assert host.fds.in_use == in_use
