"""What a take-over's hand-over state carries besides registers and memory: the snapshot
chain (the last snapshot and the pages owed to the next diff), the VM's counters, and its
checks (the host's compatibility, exactly one VM). In process, two Hosts on the real
/dev/kvm standing for the old and the new daemon."""

from __future__ import annotations

import os
import struct
import time

import grpc
import pytest
from state_guests import CODE_ADDR, CODE_SEGMENT, COUNTER_SOURCE, MEM_SIZE, assemble
from state_support import rewrite

from kvmd.core.errors import InvalidState
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import Regs
from kvmd.state.format import HANDOVER_MAGIC, CorruptSnapshot
from kvmd.state.handover import read_state, restore_vm, save_vm
from kvmd.state.snapshot import SnapshotTaker, restore_bytes
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
P = 4096


# -- hand-over --------------------------------------------------------------------------------

def paused_counter_vm(host: Host, vm_id: str = "src") -> ManagedVm:
    """A counter guest that has run a little and is paused."""
    vm = host.create_vm(vm_id, {}, VmOptions())
    vm.add_memory_region(0, MEM_SIZE, False, True)
    vm.write_memory(CODE_ADDR, assemble(COUNTER_SOURCE))
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0, rsp=0xF000, rflags=2))
    vm.start()
    deadline = time.monotonic() + 30
    while struct.unpack("<I", vm.read_memory(0x2000, 4))[0] < 5:
        assert time.monotonic() < deadline, "the guest does not count"
        time.sleep(0.01)
    vm.pause()
    return vm


def handed(vm: ManagedVm) -> tuple[bytes, dict[str, int]]:
    with vm.held_paused("handover", True) as hold:
        out = save_vm(vm, hold.run_states, 1)
    return out.data, {n: os.dup(fd) for n, fd in out.memfds.items()}


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


def test_a_diff_after_a_handover_continues_the_snapshot_chain(
        hosts: tuple[Host, Host]) -> None:
    """A VM snapshotted before a hand-over takes a diff afterwards: based on that
    snapshot, holding the pages written since the hand-over (base + diff restores them)."""
    a, b = hosts
    vm = paused_counter_vm(a)
    base = b"".join(SnapshotTaker(vm))
    data, fds = handed(vm)
    a.delete_vm("src")
    copy = restore_vm(b, read_state(data, "src"), fds)
    close_all(fds)
    try:
        copy.write_memory(0x30000, b"\x5a" * P)
        diff = b"".join(SnapshotTaker(copy, diff=True))
        restored = restore_bytes(b, "back", "local", iter([base, diff]))
        assert restored.read_memory(0x30000, P) == b"\x5a" * P
        b.delete_vm("back")
    finally:
        copy.close()


def test_counters_continue_across_a_handover(hosts: tuple[Host, Host]) -> None:
    """The bytes discarded and the dirty pages reported so far (GetVm.discarded_bytes, the
    dirty-pages metric) continue in the new daemon instead of starting from 0."""
    a, b = hosts
    vm = paused_counter_vm(a)
    vm.write_memory(0x30000, b"\x01" * (8 * P))
    assert vm.discard_memory(0x30000, 8 * P) == 8 * P
    vm.get_dirty_log(0)
    discarded, dirty = vm.discarded_bytes_total, vm.dirty_pages_total
    assert discarded == 8 * P and dirty > 0
    data, fds = handed(vm)
    copy = restore_vm(b, read_state(data, "src"), fds)
    close_all(fds)
    try:
        assert (copy.discarded_bytes_total, copy.dirty_pages_total) == (discarded, dirty)
    finally:
        copy.close()


def test_a_handover_state_for_another_host_is_refused(hosts: tuple[Host, Host]) -> None:
    """A hand-over state from a host this one is not compatible with (a larger XSAVE
    image) is refused before anything is built."""
    a, b = hosts
    data, fds = handed(paused_counter_vm(a))
    try:
        def bigger_xsave(r: pb.SnapshotRecord) -> None:
            if r.HasField("header"):
                r.header.host.xsave_size = 1 << 16
        record = read_state(rewrite(data, bigger_xsave, HANDOVER_MAGIC))
        with pytest.raises(InvalidState, match="incompatible host"):
            restore_vm(b, record, fds)
        assert b.vm_count() == 0
    finally:
        close_all(fds)


def test_a_handover_state_holding_two_vms_is_refused(hosts: tuple[Host, Host]) -> None:
    """A hand-over state is exactly one VM: two states back to back are corrupt."""
    a, _ = hosts
    data, fds = handed(paused_counter_vm(a))
    close_all(fds)
    with pytest.raises(CorruptSnapshot, match="not exactly one VM"):
        read_state(data + data)


def test_unsaved_pages_of_a_slot_of_9_pages_cross_a_handover(
        hosts: tuple[Host, Host]) -> None:
    """A slot whose page count is not a multiple of 8 (its dirty bitmap ends in a partial
    byte): a page written after the last snapshot, the slot's last, is handed over as
    owed to the next diff, which then holds it."""
    a, b = hosts
    vm = paused_counter_vm(a)
    vm.add_memory_region(1 << 20, 9 * P, False, True)
    base = b"".join(SnapshotTaker(vm))
    vm.write_memory((1 << 20) + 8 * P, b"\x77" * P)
    data, fds = handed(vm)
    a.delete_vm("src")
    copy = restore_vm(b, read_state(data, "src"), fds)
    close_all(fds)
    try:
        diff = b"".join(SnapshotTaker(copy, diff=True))
        restored = restore_bytes(b, "back", "local", iter([base, diff]))
        assert restored.read_memory((1 << 20) + 8 * P, P) == b"\x77" * P
        b.delete_vm("back")
    finally:
        copy.close()
