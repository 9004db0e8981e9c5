"""File descriptors (issue 13 #6): what each VM object holds, counted exactly; the budget
derived from RLIMIT_NOFILE, per identity and host-wide; refusals before the kernel's."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmd.core.errors import ResourceExhausted
from kvmd.core.fds import (
    FdBudget,
    derived_max_fds,
    derived_max_fds_per_identity,
    fds_per_vm,
    reserve,
)
from kvmd.core.host import Host
from kvmd.core.images import MemoryFile
from kvmd.core.limits import Limits
from kvmd.core.vm import VmOptions
from kvmd.kvm import IoSpace

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "kvmd.service"
P = 4096


def open_now() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: the core tests drive real VMs")
    (tmp_path / "f.img").write_bytes(bytes(16 * P))
    h = Host(Limits(max_vms=4), images_dir=str(tmp_path))
    yield h
    h.close()


def test_fds_per_vm_at_the_default_limits_and_what_the_unit_allows() -> None:
    lim = Limits()
    # VM + stats + console eventfd, 64 vCPUs x (fd + stats), 256 memfds, 256 irqfds x 2
    # (resample), 256 ioevents.
    assert fds_per_vm(lim) == 3 + 2 * 64 + 256 + 2 * 256 + 256 == 1155
    nofile = int(re.findall(r"^LimitNOFILE=(\d+)", UNIT.read_text(), re.M)[-1])
    assert nofile == 131072
    assert reserve(nofile) == 16384
    assert derived_max_fds(nofile) == 114688
    assert derived_max_fds_per_identity(nofile) == 28672
    # Every VM at the per-VM limits fits, with room for the daemon's own descriptors.
    assert lim.max_vms * fds_per_vm(lim) == 73920 <= derived_max_fds(nofile)
    # A plain shell's 1024 still leaves VMs some, and the daemon 256.
    assert (reserve(1024), derived_max_fds(1024)) == (256, 768)


def test_the_budget_counts_exactly_what_a_vm_holds(host: Host) -> None:
    """The account of a VM equals the descriptors it really holds, object by object, and
    everything goes back with it."""
    base, in_use = open_now(), host.fds.in_use
    vm = host.create_vm("count", {}, VmOptions(irqchip=True))
    vm.vm.stats()  # the VM's stats fd (opened at the first scrape; charged up front)

    def check() -> None:
        assert open_now() - base == vm.fds.held == host.fds.in_use - in_use

    check()
    for i in range(3):
        vm.create_vcpu(i)
    slot = vm.add_memory_region(0, 16 * P, False, False).slot
    vm.add_memory_region(0x100000, 4 * P, False, True)
    vm.add_file_memory_region(0x200000, 4 * P, False, False, MemoryFile("f.img"))
    vm.map_file(slot, 4 * P, 2 * P, MemoryFile("f.img"))
    vm.map_file(slot, 8 * P, 2 * P, MemoryFile("f.img"))
    plain = vm.register_irqfd("plain", 5, False)
    level = vm.register_irqfd("level", 6, True)
    bell = vm.register_ioevent("bell", IoSpace.MMIO, 0xD000_0000, 4, None)
    check()
    assert vm.fds.held == 3 + 3 * 2 + 3 + 2 + 1 + 2 + 1
    vm.unmap_file(slot, 4 * P, 2 * P)
    vm.unregister_irqfd("level")
    vm.unregister_ioevent("bell")
    check()
    # Closed when unregistered, not whenever the last reference happens to go.
    assert level.event.closed and level.resample is not None and level.resample.closed
    assert bell.event.closed and not plain.event.closed
    vm.remove_memory_region(slot)  # its memfd and the file still mapped over it
    check()
    host.delete_vm("count")
    assert open_now() == base and host.fds.in_use == in_use
    assert plain.event.closed


def test_refusals_come_before_the_kernel_and_leave_nothing(host: Host) -> None:
    host.fds.limit = host.fds.in_use + 3 + 2 + 1  # a VM, one vCPU, one more descriptor
    host.fds.privileged = lambda owner: True  # no per-identity share here
    vm = host.create_vm("tight", {}, VmOptions(irqchip=True))
    vm.create_vcpu(0)
    base = open_now()
    with pytest.raises(ResourceExhausted, match="max_fds"):
        vm.create_vcpu(1)
    with pytest.raises(ResourceExhausted):
        vm.register_irqfd("level", 5, True)  # two descriptors: one is left
    vm.register_irqfd("plain", 5, False)
    with pytest.raises(ResourceExhausted):
        vm.add_memory_region(0, P, False, False)
    with pytest.raises(ResourceExhausted):
        host.create_vm("more", {}, VmOptions())
    assert [v.id for v in vm.vcpus()] == [0] and vm.memory_regions() == []
    assert [e.irqfd_id for e in vm.irqfds()] == ["plain"]
    assert [v.id for v in host.list_vms()] == ["tight"]
    assert open_now() == base + 1
    host.delete_vm("tight")


def test_shares_per_identity_and_the_admins_reserve() -> None:
    budget = FdBudget(80, 30, privileged=lambda owner: owner == "admin")
    a, b, c, admin = (budget.account(o) for o in ("a", "b", "c", "admin"))
    a.take(30)
    with pytest.raises(ResourceExhausted, match="max_fds_per_identity"):
        a.take(1)
    b.take(30)
    with pytest.raises(ResourceExhausted, match="non-admin"):
        c.take(11)  # the last eighth (10) is the admins'
    c.take(10)
    admin.take(10)  # admins: no share, and the reserve is theirs
    with pytest.raises(ResourceExhausted, match="max_fds"):
        admin.take(1)
    a.close()
    assert budget.held_by("a") == 0 and budget.in_use == 50
    c.take(20)
    assert budget.in_use == 70
