"""Run control of a VM object, without gRPC: its state from its vCPUs', a start that
fails midway, the reason it ended, holds (snapshots, migrations) and what they refuse,
and the migration's throttle."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest
from core_guests import SPIN
from guests import boot
from polling import drained, wait_until

from kvmd.core.dirty import MIGRATION
from kvmd.core.errors import (
    DomainError,
    InvalidArgument,
    InvalidState,
    KernelError,
    NotFound,
    Reason,
)
from kvmd.core.host import Host
from kvmd.core.vcpu import Action, Launch, Outcome, PauseTicket
from kvmd.core.vm import VmOptions
from kvmd.kvm import KvmError
from kvmd.kvm.exits import DirtyRingFullExit


def test_a_vm_with_a_stopped_and_a_never_started_vcpu_is_stopped(host: Host) -> None:
    """The VM reads as created only while every vCPU is: one stopped vCPU makes it
    stopped, not created."""
    vm = host.create_vm("mixed", {}, VmOptions())
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    assert vm.state == "created"
    vm.stop_vcpu(0)
    assert [v.state for v in vm.vcpus()] == ["stopped", "created"]
    assert vm.state == "stopped"


def test_a_start_that_fails_midway_leaves_no_vcpu_thread(host: Host) -> None:
    """When committing one vCPU's launch fails (the VM was deleted between the launch and
    the commit), the launches of every later vCPU are cancelled: no thread is left waiting
    at its gate, and each vCPU is as it was."""
    vm = host.create_vm("midway", {}, VmOptions())
    for i in range(2):
        vm.create_vcpu(i)
    last = vm.vcpus()[-1]
    launch = last.launch

    def launch_then_delete() -> Launch:
        made = launch()
        vm.closed = True  # as a DeleteVm racing in after the last launch
        return made

    last.launch = launch_then_delete  # type: ignore[method-assign]
    with pytest.raises(NotFound):
        vm.start()
    # The later vCPU's launch was cancelled (and joined); the failed one's thread ends alone.
    assert not [t for t in threading.enumerate() if t.name == "vcpu-midway-1"]
    wait_until(lambda: not [t for t in threading.enumerate()
                            if t.name.startswith("vcpu-midway-")], 10, "the threads to end")
    assert [v.state for v in vm.vcpus()] == ["created", "created"]
    vm.closed = False
    host.delete_vm("midway")


def test_the_first_reason_a_vcpu_gives_is_the_vms(host: Host) -> None:
    """Two vCPUs that end by themselves at once: the VM keeps the first one's reason (and
    the exit code of any that gave one), not the last one's."""
    vm = host.create_vm("why", {}, VmOptions())
    vm.record_outcome(Outcome(Action.STOP, "debug_exit", 0x2A))
    vm.record_outcome(Outcome(Action.CRASH, "shutdown: triple fault"))
    assert (vm.reason, vm.exit_code) == ("debug_exit", 0x2A)


def test_every_run_control_call_is_refused_while_a_hold_lasts(host: Host) -> None:
    """While a snapshot holds the VM paused, run control of the VM and of each vCPU is
    refused as VM_BUSY (not done, nor refused for another reason), and the VM runs on
    afterwards."""
    vm = host.create_vm("held", {}, VmOptions())
    boot(vm, SPIN, vcpus=2)
    vm.start()
    calls: dict[str, Callable[[], object]] = {
        "start": vm.start, "pause": vm.pause, "resume": vm.resume, "stop": vm.stop,
        "start_vcpu": lambda: vm.start_vcpu(1), "pause_vcpu": lambda: vm.pause_vcpu(1),
        "resume_vcpu": lambda: vm.resume_vcpu(1), "stop_vcpu": lambda: vm.stop_vcpu(1)}
    with vm.held_paused("snapshot"):
        for name, call in calls.items():
            with pytest.raises(InvalidState) as caught:
                call()
            assert caught.value.reason == Reason.VM_BUSY, name
        assert [v.state for v in vm.vcpus()] == ["paused", "paused"]
    assert [v.state for v in vm.vcpus()] == ["running", "running"]
    vm.stop()


def test_a_hold_is_refused_while_another_lasts_or_the_vm_migrates(host: Host) -> None:
    """One hold at a time (a second is VM_BUSY, and the first still holds after it), and
    a snapshot's hold is refused while the VM migrates (VM_MIGRATING): its layout is the
    migration's; the migration's own hold is not."""
    vm = host.create_vm("holds", {}, VmOptions())
    boot(vm, SPIN)
    vm.start()
    with vm.held_paused("snapshot"):
        with pytest.raises(InvalidState) as caught, vm.held_paused("snapshot"):
            pass
        assert caught.value.reason == Reason.VM_BUSY
        assert vm.busy == "snapshot" and vm.vcpu(0).state == "paused"
    assert vm.busy == "" and vm.vcpu(0).state == "running"
    vm.begin_migration("elsewhere:1")
    with pytest.raises(InvalidState) as caught, vm.held_paused("snapshot"):
        pass
    assert caught.value.reason == Reason.VM_MIGRATING
    with vm.held_paused("migration"):
        assert vm.vcpu(0).state == "paused"
    vm.end_migration()
    assert vm.vcpu(0).state == "running"
    vm.stop()


def test_a_deleted_vm_is_not_held(host: Host) -> None:
    """A hold (a snapshot racing a DeleteVm) of a VM deleted meanwhile is NotFound, and
    leaves it not busy."""
    vm = host.create_vm("gone", {}, VmOptions())
    vm.create_vcpu(0)
    host.delete_vm("gone")
    with pytest.raises(NotFound), vm.held_paused("snapshot"):
        pass
    assert vm.busy == ""


def test_a_migrating_vm_is_not_deleted(host: Host) -> None:
    """DeleteVm of a VM that migrates is VM_MIGRATING and leaves it whole; once the
    migration ended it is deleted."""
    vm = host.create_vm("leaving", {}, VmOptions())
    vm.create_vcpu(0)
    vm.begin_migration("elsewhere:1")
    with pytest.raises(InvalidState) as caught:
        host.delete_vm("leaving")
    assert caught.value.reason == Reason.VM_MIGRATING
    assert [v.id for v in host.list_vms()] == ["leaving"] and not vm.closed
    vm.end_migration()
    host.delete_vm("leaving")
    assert vm.closed and host.list_vms() == []


def test_the_throttle_is_0_to_99_percent(host: Host) -> None:
    """A throttle is a share of the time the guest may not run, 0-99%: 100 (never runs) or
    a negative share is refused, and changes nothing."""
    vm = host.create_vm("throttled", {}, VmOptions())
    for bad in (100, -1):
        with pytest.raises(InvalidArgument) as caught:
            vm.set_throttle(bad)
        assert caught.value.field == "percent"
    assert vm.throttle_percent == 0
    vm.set_throttle(99)
    assert vm.throttle_percent == 99
    vm.set_throttle(0)
    assert vm.throttle_percent == 0


def test_deleting_a_throttled_vm_ends_its_throttle_thread(host: Host) -> None:
    """A VM deleted while auto-converge throttles it (a migration's end never came) takes
    its throttle thread with it."""
    vm = host.create_vm("slowed", {}, VmOptions())
    vm.set_throttle(50)
    assert [t for t in threading.enumerate() if t.name == "throttle-slowed"]
    host.delete_vm("slowed")
    assert not [t for t in threading.enumerate() if t.name == "throttle-slowed"]


def test_a_migration_does_not_begin_while_a_snapshot_holds_the_vm(host: Host) -> None:
    """BeginMigration while a snapshot holds the VM is VM_BUSY and leaves it not migrating
    (its layout free, no MIGRATION consumer of dirty pages)."""
    vm = host.create_vm("busy", {}, VmOptions())
    vm.create_vcpu(0)
    with vm.held_paused("snapshot"):
        with pytest.raises(InvalidState) as caught:
            vm.begin_migration("elsewhere:1")
        assert caught.value.reason == Reason.VM_BUSY
    assert vm.migrating_to == "" and not vm.dirty.has_consumer(MIGRATION)


def test_a_migration_that_cannot_begin_or_ended_leaves_logging_as_callers_set_it(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration logs every slot's dirty pages while it runs. If the kernel refuses that
    for one slot, the slots it was turned on for get it off again; after a migration that
    did begin, logging is as callers set it and the MIGRATION consumer is gone."""
    vm = host.create_vm("logging", {}, VmOptions())
    for i in range(2):
        vm.add_memory_region(i * 0x100000, 0x1000, False, False)
    enable = vm.vm.set_dirty_logging

    def refuse_slot_1(slot: int, enabled: bool) -> None:
        if slot == 1 and enabled:
            raise KvmError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION")
        enable(slot, enabled)

    monkeypatch.setattr(vm.vm, "set_dirty_logging", refuse_slot_1)
    with pytest.raises(DomainError):
        vm.begin_migration("elsewhere:1")
    assert [r.log_dirty for r in vm.vm.memory_regions()] == [False, False]
    assert vm.migrating_to == "" and not vm.dirty.has_consumer(MIGRATION)
    monkeypatch.undo()
    vm.begin_migration("elsewhere:1")
    assert [r.log_dirty for r in vm.vm.memory_regions()] == [True, True]
    assert [r.log_dirty for r in vm.memory_regions()] == [False, False]
    vm.end_migration()
    assert [r.log_dirty for r in vm.vm.memory_regions()] == [False, False]
    assert vm.migrating_to == "" and not vm.dirty.has_consumer(MIGRATION)


def test_a_vcpu_crashes_after_1000_ring_full_exits_in_a_row_with_nothing_to_harvest(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full dirty ring that yields nothing to harvest 999 times in a row is tolerated;
    the 1000th time crashes the vCPU (the kernel lost track). A harvest that finds pages
    starts the count again."""
    vm = host.create_vm("stuck-ring", {}, VmOptions())
    vcpu = vm.create_vcpu(0)
    found = [0]
    monkeypatch.setattr(vm.dirty, "harvest", lambda: found[0])
    full = DirtyRingFullExit()
    for _ in range(999):
        assert vm.dispatch(vcpu, full).action is Action.CONTINUE
    found[0] = 1  # this harvest finds pages
    assert vm.dispatch(vcpu, full).action is Action.CONTINUE
    found[0] = 0
    for _ in range(999):
        assert vm.dispatch(vcpu, full).action is Action.CONTINUE
    outcome = vm.dispatch(vcpu, full)
    assert outcome.action is Action.CRASH and "1000 times in a row" in outcome.reason


def test_a_throttle_turned_off_and_on_again_throttles(host: Host) -> None:
    """Auto-converge may end a throttle and start another: each one has its thread, and
    turning it off ends that thread."""
    vm = host.create_vm("rethrottled", {}, VmOptions())

    def throttling() -> bool:
        return any(t.name == "throttle-rethrottled" for t in threading.enumerate())

    vm.set_throttle(50)
    assert throttling()
    vm.set_throttle(0)
    assert not throttling()
    vm.set_throttle(30)
    assert throttling() and vm.throttle_percent == 30
    vm.set_throttle(0)
    assert not throttling()


def test_a_vm_migrates_to_one_target_at_a_time(host: Host) -> None:
    """A second BeginMigration while one runs is VM_MIGRATING and changes nothing: the
    first target stays, and its end still turns off the logging it turned on."""
    vm = host.create_vm("once", {}, VmOptions())
    vm.add_memory_region(0, 0x1000, False, False)
    vm.begin_migration("first:1")
    with pytest.raises(InvalidState) as caught:
        vm.begin_migration("second:1")
    assert caught.value.reason == Reason.VM_MIGRATING and vm.migrating_to == "first:1"
    vm.end_migration()
    assert [r.log_dirty for r in vm.vm.memory_regions()] == [False]


def test_a_hold_that_cannot_pause_every_vcpu_lets_the_paused_ones_run_again(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold whose pause fails for one vCPU (it did not park in time: VCPU_UNRESPONSIVE)
    fails, and the vCPUs it did pause run again, even for a holder that wanted the VM left
    paused (it never got the hold to resume it): a failed snapshot, switch-over or
    hand-over does not leave the VM paused."""
    vm = host.create_vm("half-held", {}, VmOptions())
    boot(vm, SPIN, vcpus=2)
    vm.start()
    late = vm.vcpu(1)
    wait_paused = late.wait_paused

    def unresponsive(ticket: PauseTicket) -> None:
        wait_paused(ticket)
        raise late.timed_out("pause")

    monkeypatch.setattr(late, "wait_paused", unresponsive)
    for leave_paused in (False, True):
        with pytest.raises(KernelError) as caught, vm.held_paused("snapshot", leave_paused):
            pass
        assert caught.value.reason == Reason.VCPU_UNRESPONSIVE
        assert [v.state for v in vm.vcpus()] == ["running", "running"] and vm.busy == ""
    vm.stop()


def test_a_deleted_vm_is_not_saved_migrated_or_throttled(host: Host) -> None:
    """After a delete (racing a snapshot or a migration), save_state and begin_migration
    are NotFound, and a throttle starts no thread."""
    vm = host.create_vm("deleted", {}, VmOptions())
    vm.create_vcpu(0)
    host.delete_vm("deleted")
    with pytest.raises(NotFound):
        vm.save_state()
    with pytest.raises(NotFound):
        vm.begin_migration("elsewhere:1")
    assert vm.migrating_to == ""
    vm.set_throttle(50)
    assert not [t for t in threading.enumerate() if t.name == "throttle-deleted"]


def test_a_vcpu_event_carries_the_vms_state(host: Host) -> None:
    """The state a vCPU's event reports is its VM's: one vCPU of two paused leaves the VM
    running, and the "paused" event says so."""
    vm = host.create_vm("two-states", {}, VmOptions())
    boot(vm, SPIN, vcpus=2)
    vm.start()
    events = vm.watch()
    vm.pause_vcpu(0)
    paused = [e for e in drained(events.get) if e.type == "paused"]
    assert [(e.vcpu_id, e.state) for e in paused] == [(0, "running")]
    events.close()
    vm.stop()
