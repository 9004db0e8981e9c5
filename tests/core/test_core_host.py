"""The core layer without gRPC: registry rules, limits, ids, ownership of resources."""

from __future__ import annotations

import os

import pytest
from core_guests import SPIN, debug_exit_program
from guests import boot
from polling import drained, wait_until

from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    NotFound,
    Reason,
    ResourceExhausted,
)
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions


def test_vm_ids_are_validated_and_unique(host: Host) -> None:
    host.create_vm("a-1", {}, VmOptions())
    with pytest.raises(AlreadyExists):
        host.create_vm("a-1", {}, VmOptions())
    for bad in ["", "x" * 65, "has space", "-leading", "ünï"]:
        with pytest.raises(InvalidArgument):
            host.create_vm(bad, {}, VmOptions())
        with pytest.raises(InvalidArgument):
            host.get_vm(bad)
    with pytest.raises(NotFound):
        host.get_vm("missing")


def test_vm_limit_and_memory_budget(host: Host) -> None:
    vms = [host.create_vm(f"v{i}", {}, VmOptions()) for i in range(4)]
    with pytest.raises(ResourceExhausted):
        host.create_vm("v4", {}, VmOptions())
    vms[0].add_memory_region(0, 1 << 24, False, False)  # the whole per-VM limit
    with pytest.raises(ResourceExhausted):
        vms[0].add_memory_region(1 << 24, 0x1000, False, False)
    vms[1].add_memory_region(0, 1 << 24, False, False)  # the total limit is now reached
    with pytest.raises(ResourceExhausted):
        vms[2].add_memory_region(0, 0x1000, False, False)
    host.delete_vm("v1")  # deleting a VM returns its memory to the budget
    vms[2].add_memory_region(0, 0x1000, False, False)
    assert host.budget.in_use == (1 << 24) + 0x1000


def test_ids_held_for_vms_in_the_making_count_against_max_vms(host: Host) -> None:
    """A VM being created, restored or migrated in holds its place: max_vms (4 here) cannot
    be passed by starting several at once."""
    host.create_vm("made", {}, VmOptions())
    for vm_id in ("r1", "r2", "r3"):
        host.reserve_id(vm_id, "local")
    with pytest.raises(ResourceExhausted) as err:
        host.reserve_id("r4", "local")
    assert err.value.reason == Reason.LIMIT_VMS
    with pytest.raises(ResourceExhausted):
        host.create_vm("v5", {}, VmOptions())
    host.release_id("r1")
    host.create_vm("v5", {}, VmOptions())


def test_labels_select_vms(host: Host) -> None:
    host.create_vm("a", {"team": "x", "tier": "1"}, VmOptions())
    host.create_vm("b", {"team": "y"}, VmOptions())
    assert [v.id for v in host.list_vms({"team": "x"})] == ["a"]
    assert [v.id for v in host.list_vms()] == ["a", "b"]
    assert host.list_vms({"team": "z"}) == []


def test_pit_needs_irqchip_and_failed_create_leaks_nothing(host: Host) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidArgument):
        host.create_vm("p", {}, VmOptions(pit=True))
    with pytest.raises(InvalidArgument):
        host.create_vm("p", {}, VmOptions(debug_exit_port=0x3F9))  # inside COM1
    assert len(os.listdir("/proc/self/fd")) == before
    assert host.vm_count() == 0


def test_delete_running_vm_releases_every_fd(host: Host) -> None:
    before = len(os.listdir("/proc/self/fd"))
    vm = host.create_vm("run", {}, VmOptions(irqchip=True))
    boot(vm, SPIN, vcpus=2)
    vm.register_irqfd("i", 4, resample=True)
    vm.start()
    wait_until(lambda: vm.state == "running", 10, "running")
    vcpus = vm.vcpus()
    host.delete_vm("run")
    assert [v.state for v in vcpus] == ["stopped", "stopped"]
    assert len(os.listdir("/proc/self/fd")) == before


def test_state_machine_rules(host: Host) -> None:
    vm = host.create_vm("sm", {}, VmOptions())
    with pytest.raises(InvalidState):
        vm.start()  # no vCPUs
    boot(vm, SPIN)
    with pytest.raises(InvalidState):
        vm.pause()  # not running
    vm.start()
    with pytest.raises(InvalidState):
        vm.start()
    with pytest.raises(InvalidState):
        vm.vcpu(0).get_regs()  # registers only outside the guest
    vm.pause()
    rip = vm.vcpu(0).get_regs().rip
    assert 0x1000 <= rip < 0x1003
    with pytest.raises(InvalidState):
        vm.pause()
    vm.resume()
    vm.stop()
    assert vm.state == "stopped"
    with pytest.raises(InvalidState):
        vm.stop()
    vm.start()  # a stopped VM starts again where it was
    vm.stop()


def test_debug_exit_stops_every_vcpu_and_records_the_code(host: Host) -> None:
    vm = host.create_vm("dx", {}, VmOptions())
    boot(vm, debug_exit_program(0x2A), vcpus=2)
    events = vm.watch()
    vm.start()
    wait_until(lambda: vm.state == "stopped", 10, "the VM to stop")
    assert vm.exit_code == 0x2A and vm.reason == "debug_exit"
    # The OUT that ended the VM was completed: the stopped vCPU's RIP is past it.
    assert 0x1006 in {v.get_regs().rip for v in vm.vcpus()}
    seen = [e.type for e in drained(events.get)]
    assert "debug_exit" in seen and "started" in seen
    events.close()


def test_a_halted_vcpu_is_halted_again_after_a_hold(host: Host) -> None:
    """A snapshot or a migration's switch-over holds the VM paused; afterwards a vCPU that
    had halted (HLT without the in-kernel irqchip) waits halted again, as before: it is
    not made to run past its HLT."""
    vm = host.create_vm("halts", {}, VmOptions())
    boot(vm, bytes([0xF4, 0xEB, 0xFE]))  # hlt; then spin (reached only if run past it)
    vm.start()
    wait_until(lambda: vm.vcpu(0).state == "halted", 10, "the vCPU to halt")
    with vm.held_paused("snapshot") as hold:
        assert hold.run_states == {0: "halted"}
        assert vm.vcpu(0).state == "paused"
    assert vm.vcpu(0).state == "halted"
    assert vm.state == "running"  # a halted vCPU is a running VM's
    vm.stop()
