"""The state a daemon hands over (kvmd.state.handover), in process: saved from a running
guest and restored into another host over the same memfds (no copy: memory is shared),
refused when it is corrupt, when a memfd is missing or is another file, and never taken
for a snapshot; fd names fit systemd's rules."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from handover_support import CODE_ADDR, CODE_SEGMENT, COUNTER, COUNTER_SOURCE, MEM_SIZE
from state_guests import assemble
from state_support import rewrite

from kvmd.core.dirty import API
from kvmd.core.errors import AlreadyExists, InvalidState, ResourceExhausted
from kvmd.core.host import Host
from kvmd.core.images import MemoryFile
from kvmd.core.limits import Limits
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import IoSpace, Regs
from kvmd.state.format import HANDOVER_MAGIC, CorruptSnapshot, SnapshotReader, SnapshotWriter
from kvmd.state.handover import (
    memfd_name,
    parse_memfd_name,
    read_state,
    restore_vm,
    resume,
    save_vm,
)
from kvmd.state.snapshot import SnapshotTaker, restore_bytes
from kvmd.systemd import fd_name_valid
from kvmd_proto import vmm_pb2 as pb

P = 4096


def counter_vm(host: Host, vm_id: str = "src") -> ManagedVm:
    vm = host.create_vm(vm_id, {"k": "v"}, VmOptions(irqchip=True))
    vm.add_memory_region(0, MEM_SIZE, False, True)
    vm.write_memory(CODE_ADDR, assemble(COUNTER_SOURCE))
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=0, rsp=0xF000, rflags=2))
    vm.register_ioevent("out", IoSpace.PIO, 0x99, 1, None)
    vm.register_irqfd("irq5", 5, False)
    vm.start()
    deadline = time.monotonic() + 30
    while u32(vm, COUNTER) < 50:
        assert time.monotonic() < deadline, "the guest does not count"
        time.sleep(0.01)
    return vm


def u32(vm: ManagedVm, addr: int) -> int:
    return int(struct.unpack("<I", vm.read_memory(addr, 4))[0])


def saved(vm: ManagedVm) -> tuple[bytes, dict[str, int]]:
    with vm.held_paused("handover", True) as hold:
        out = save_vm(vm, hold.run_states, 1)
    return out.data, {n: os.dup(fd) for n, fd in out.memfds.items()}


def close_all(fds: dict[str, int]) -> None:
    """Close the test's copies of handed-over memfds (a restored VM holds its own dups)."""
    for fd in fds.values():
        os.close(fd)


def test_restore_adopts_the_memfds_and_continues(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    vm = counter_vm(a)
    vm.trigger_irqfd("irq5")
    data, fds = saved(vm)
    paused_at = u32(vm, COUNTER)
    console = vm.console.save_state()
    exits = vm.exit_stats()[0]
    record = read_state(data, "src")
    assert record.was_running and record.memfd_names == [memfd_name("src", 0)]
    copy = restore_vm(b, record, fds)
    try:
        close_all(fds)  # the new VM holds its own dup
        assert copy.state == "paused" and u32(copy, COUNTER) == paused_at
        # One memory, not a copy: a write through the old VM shows in the new one.
        vm.write_memory(0x30000, b"shared")
        assert copy.read_memory(0x30000, 6) == b"shared"
        assert copy.console.save_state() == console
        assert copy.exit_stats()[0] == exits  # counters continue, not reset
        assert [(e.ioevent_id, e.fired > 0) for e in copy.ioevents()] == [("out", True)]
        assert [(e.irqfd_id, e.triggers) for e in copy.irqfds()] == [("irq5", 1)]
        assert copy.labels == {"k": "v"} and copy.owner == "local"
        a.delete_vm("src")  # the old daemon lets go; the memory lives on in the new VM
        assert resume(copy, record.state)
        deadline = time.monotonic() + 30
        while u32(copy, COUNTER) <= paused_at + 20:
            assert time.monotonic() < deadline, "the restored guest does not count on"
            time.sleep(0.01)
        backlog = copy.console.backlog().split(b"\n")[:-1]
        numbers = [int(x) for x in backlog if x]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    finally:
        copy.close()


def test_a_handover_state_is_no_snapshot(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    data, fds = saved(counter_vm(a))
    try:
        with pytest.raises(CorruptSnapshot, match="hand-over state, not a snapshot"):
            restore_bytes(b, "copy", "local", iter([data]))
        assert b.vm_count() == 0
    finally:
        close_all(fds)


def test_corrupt_state_is_refused(hosts: tuple[Host, Host]) -> None:
    a, _ = hosts
    data, fds = saved(counter_vm(a))
    try:
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x40
        with pytest.raises(CorruptSnapshot):
            read_state(bytes(flipped))
        with pytest.raises(CorruptSnapshot):
            read_state(data[:-10])
        with pytest.raises(CorruptSnapshot, match="holds vm src"):
            read_state(data, "other")
    finally:
        close_all(fds)


def test_missing_or_foreign_memfd_is_refused_and_leaves_nothing(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    data, fds = saved(counter_vm(a))
    record = read_state(data)
    name = memfd_name("src", 0)
    try:
        with pytest.raises(InvalidState, match="was not passed"):
            restore_vm(b, record, {})
        other = os.memfd_create("other")
        os.ftruncate(other, MEM_SIZE)
        try:
            with pytest.raises(InvalidState, match="another file"):
                restore_vm(b, record, {name: other})
        finally:
            os.close(other)
        os.ftruncate(fds[name], 4096)  # truncated under us (what a broken store could do)
        with pytest.raises(InvalidState, match="bytes, the slot needs"):
            restore_vm(b, record, fds)
        assert b.vm_count() == 0
        b.create_vm("src", {}, VmOptions())  # the id is free again
    finally:
        close_all(fds)


def test_memfd_names_are_valid_fd_store_names() -> None:
    vm_id = "a.b-c_" + "x" * 58
    name = memfd_name(vm_id, 255)
    assert fd_name_valid(name) and ":" not in name
    assert parse_memfd_name(name) == (vm_id, 255)
    assert parse_memfd_name("kvmd-mem.x.vm") is None and parse_memfd_name("other") is None
    assert not fd_name_valid("vm:1:slot:0")  # ':' separates LISTEN_FDNAMES


def test_files_of_the_images_directory_go_by_name(tmp_path: Path) -> None:
    """A VM with a file mapped over part of its memory and a file-backed slot: the memfd
    of its own memory is handed over, the files are mapped again by name (the same host,
    the same images directory); writes the guest made to a writable file are in it."""
    images = tmp_path / "images"
    images.mkdir(mode=0o750)
    (images / "rom.img").write_bytes(b"\x40" * (4 * P))
    (images / "data.img").write_bytes(b"\x11" * (8 * P))
    a, b = Host(images_dir=str(images)), Host(images_dir=str(images))
    try:
        vm = counter_vm(a)
        vm.map_file(0, 0x30000, 4 * P, MemoryFile("rom.img", read_only=False))
        vm.add_file_memory_region(MEM_SIZE, 8 * P, False, False, MemoryFile("data.img"))
        vm.write_memory(MEM_SIZE, b"through the mapping")
        data, fds = saved(vm)
        record = read_state(data, "src")
        assert record.memfd_names == [memfd_name("src", 0)]  # slot 1 is the file
        assert (images / "data.img").read_bytes()[:19] == b"through the mapping"
        a.delete_vm("src")
        copy = restore_vm(b, record, fds)
        close_all(fds)
        try:
            assert copy.read_memory(0x30000, 4 * P) == b"\x40" * (4 * P)
            assert copy.read_memory(MEM_SIZE, 19) == b"through the mapping"
            assert [(r.slot, r.offset, r.image, r.whole_slot)
                    for r in copy.file_backed_ranges()] == [(0, 0x30000, "rom.img", False),
                                                             (1, 0, "data.img", True)]
            assert resume(copy, record.state)
        finally:
            copy.close()
    finally:
        a.close()
        b.close()


def test_the_discard_credit_crosses_a_handover() -> None:
    # The next daemon charges an adopted slot as the old one did: its size less the credit
    # of what was discarded and is still not allocated, recomputed at the adoption.
    a = Host(Limits(max_memory_total_bytes=1 << 30))
    b = Host(Limits(max_memory_total_bytes=32 * P))
    try:
        vm = a.create_vm("bal", {}, VmOptions())
        vm.add_memory_region(0, 64 * P, False, False)
        vm.write_memory(0, b"\x01" * (64 * P))
        assert vm.discard_memory(16 * P, 48 * P) == 48 * P
        assert (a.budget.in_use, a.budget.credited) == (16 * P, 48 * P)
        b.create_vm("other", {}, VmOptions()).add_memory_region(0, 16 * P, False, False)
        data, fds = saved(vm)
        record = read_state(data, "bal")
        assert dict(record.extras.discard_credit_bytes) == {0: 48 * P}
        # Touched again after the save: the adoption charges those pages (40 > 32 pages).
        vm.write_memory(16 * P, b"\x02" * (8 * P))
        with pytest.raises(ResourceExhausted):
            restore_vm(b, record, fds)
        assert (b.budget.in_use, b.budget.credited) == (16 * P, 0)
        assert vm.discard_memory(16 * P, 8 * P) == 8 * P
        copy = restore_vm(b, record, fds)
        close_all(fds)
        assert (b.budget.in_use, b.budget.credited) == (32 * P, 48 * P)
        assert copy.discard_credits() == {0: 48 * P}
        copy.write_memory(16 * P, b"\x03" * P)  # the guest's to touch: past the limit
        assert (b.budget.in_use, b.budget.credited) == (33 * P, 47 * P)
    finally:
        a.close()
        b.close()


def test_dirty_pages_cross_a_handover_and_stay_if_it_fails(hosts: tuple[Host, Host]) -> None:
    """The pages the guest dirtied before the hand-over that GetDirtyLog has not reported
    yet: the state carries them to the new VM, and saving it does not take them from the
    old one (should the hand-over fail, that VM runs on and reports them)."""
    a, b = hosts
    vm = counter_vm(a)
    counter_page = 1 << (COUNTER // P)
    vm.get_dirty_log(0)  # reported up to here; the guest goes on counting
    time.sleep(0.05)
    data, fds = saved(vm)
    info = vm.vm.memory_region(0)
    assert vm.dirty.peek(API, info) & counter_page  # still the old VM's to report
    copy = restore_vm(b, read_state(data, "src"), fds)
    try:
        close_all(fds)
        _, bitmap = copy.get_dirty_log(0)
        assert int.from_bytes(bitmap, "little") & counter_page  # and the new VM's
    finally:
        copy.close()


def test_a_state_without_a_memfd_for_a_slot_or_too_short_a_memfd_is_refused(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    data, fds = saved(counter_vm(a))
    try:
        def no_memfd(r: pb.SnapshotRecord) -> None:
            if r.HasField("header"):
                del r.header.handover.memory_fds[:]
        with pytest.raises(CorruptSnapshot, match="no memfd named for slots"):
            read_state(rewrite(data, no_memfd, HANDOVER_MAGIC))

        # The memfd must hold the whole slot, even where the saved size says less.
        def small_record(r: pb.SnapshotRecord) -> None:
            if r.HasField("header"):
                r.header.handover.memory_fds[0].size = P
        record = read_state(rewrite(data, small_record, HANDOVER_MAGIC))
        os.ftruncate(fds[memfd_name("src", 0)], MEM_SIZE // 2)
        with pytest.raises(InvalidState, match="bytes, the slot needs"):
            restore_vm(b, record, fds)
        assert b.vm_count() == 0
    finally:
        close_all(fds)


def test_a_diff_after_a_handover_continues_the_snapshot_chain(
        hosts: tuple[Host, Host]) -> None:
    """A VM snapshotted before a hand-over takes a diff afterwards: based on that
    snapshot, holding the pages written since the hand-over (base + diff restores them)."""
    a, b = hosts
    vm = counter_vm(a)
    vm.pause()
    base = b"".join(SnapshotTaker(vm))
    data, fds = saved(vm)
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
    vm = counter_vm(a)
    vm.pause()
    vm.write_memory(0x30000, b"\x01" * (8 * P))
    assert vm.discard_memory(0x30000, 8 * P) == 8 * P
    vm.get_dirty_log(0)
    discarded, dirty = vm.discarded_bytes_total, vm.dirty_pages_total
    assert discarded == 8 * P and dirty > 0
    data, fds = saved(vm)
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
    data, fds = saved(counter_vm(a))
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
    data, fds = saved(counter_vm(a))
    close_all(fds)
    with pytest.raises(CorruptSnapshot, match="not exactly one VM"):
        read_state(data + data)


def test_unsaved_pages_of_a_slot_of_9_pages_cross_a_handover(
        hosts: tuple[Host, Host]) -> None:
    """A slot whose page count is not a multiple of 8 (its dirty bitmap ends in a partial
    byte): a page written after the last snapshot, the slot's last, is handed over as
    owed to the next diff, which then holds it."""
    a, b = hosts
    vm = counter_vm(a)
    vm.pause()
    vm.add_memory_region(1 << 20, 9 * P, False, True)
    base = b"".join(SnapshotTaker(vm))
    vm.write_memory((1 << 20) + 8 * P, b"\x77" * P)
    data, fds = saved(vm)
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


def kvm_vm_descriptors() -> int:
    """How many KVM VM descriptors this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:kvm-vm"
        except OSError:
            pass
    return count


def test_a_restore_keeps_to_the_id_rules_and_frees_the_id_with_the_vm(
        hosts: tuple[Host, Host]) -> None:
    """A hand-over state of an id the host already has is refused (ALREADY_EXISTS) and the
    VM there is untouched; once restored, the VM holds its id like any other: deleted, the
    id is free again; a restore failing past the build (over the memory limit) leaves no
    VM and no KVM descriptor behind."""
    a, b = hosts
    data, fds = saved(counter_vm(a))
    record = read_state(data, "src")
    try:
        mine = b.create_vm("src", {}, VmOptions())
        with pytest.raises(AlreadyExists):
            restore_vm(b, record, fds)
        assert b.get_vm("src") is mine and b.vm_count() == 1
        b.delete_vm("src")
        restore_vm(b, record, fds)
        b.delete_vm("src")
        b.create_vm("src", {}, VmOptions())
        b.delete_vm("src")
        small = Host(Limits(max_memory_total_bytes=MEM_SIZE // 2))
        try:
            held = kvm_vm_descriptors()
            with pytest.raises(ResourceExhausted):
                restore_vm(small, record, fds)
            assert small.vm_count() == 0 and kvm_vm_descriptors() == held
        finally:
            small.close()
    finally:
        close_all(fds)


def test_a_truncated_or_memory_carrying_state_is_refused(hosts: tuple[Host, Host]) -> None:
    """Every cut of a state's tail is refused (its trailer gone or half there), and a
    state with a memory record (the hand-over format carries none) is refused naming it."""
    a, _ = hosts
    data, fds = saved(counter_vm(a))
    close_all(fds)
    for cut in range(1, 80):
        with pytest.raises(CorruptSnapshot):
            read_state(data[:-cut])
    records = list(SnapshotReader(HANDOVER_MAGIC).feed(data))
    writer = SnapshotWriter()
    with_zero = b"".join(writer.record(r) for r in records
                         if isinstance(r, pb.SnapshotRecord) and not r.HasField("trailer"))
    with_zero += writer.record(pb.SnapshotRecord(zero=pb.MemoryZero(slot=0, length=P)))
    with_zero += writer.trailer()
    with pytest.raises(CorruptSnapshot, match="a zero record"):
        read_state(with_zero)


def test_memfd_names_parse_back_for_every_slot_number_and_id_length() -> None:
    """Slot numbers up to KVM's (32763) and ids up to 64 characters name a memfd that
    parses back."""
    for slot in (0, 9999, 10000, 32763):
        for vm_id in ("a", "Z" * 64):
            assert parse_memfd_name(memfd_name(vm_id, slot)) == (vm_id, slot)
