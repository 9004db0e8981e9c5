"""Guest memory owned by the Vm: slots, host access, msync, dirty logging, read-only slots.

The first tests port crosvm's hypervisor/kvm test module (dirty_log_size, get_memory,
add_memory, add_memory_ro, remove_memory, remove_invalid_memory, overlap_memory,
sync_memory) to this binding, where the Vm allocates the memory of each slot itself.
"""

from __future__ import annotations

import errno
import os

import pytest
from guests import (
    CODE_ADDR,
    DATA_ADDR,
    HLT,
    MMIO_ADDR,
    mmio_write_read_program,
    mov_al_mem16,
    open_kvm_fds,
    real_mode_program,
    run_guarded,
    setup_real_mode,
    store_pages_program,
)

from kvmd.kvm import PAGE_SIZE, HltExit, KvmError, MemoryRegionInfo, MmioExit, Vm
from kvmd.kvm import dirty_log_bitmap_size as bitmap_size


def _errno_of(call: object, *args: object, **kwargs: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    return exc.value.errno


# -- crosvm's tests ----------------------------------------------------------------------


def test_dirty_log_size() -> None:
    assert bitmap_size(0) == 0
    assert bitmap_size(PAGE_SIZE) == 1
    assert bitmap_size(PAGE_SIZE * 8) == 1
    assert bitmap_size(PAGE_SIZE * 8 + 1) == 2
    assert bitmap_size(PAGE_SIZE * 100) == 13


def test_get_memory(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    vm.write(0xF0, bytes([67]))
    assert vm.read(0xF0, 1) == bytes([67])


def test_add_memory(vm: Vm) -> None:
    assert vm.add_memory_region(0, 0x1000) == 0
    assert vm.add_memory_region(0x5000, 0x5000) == 1
    assert vm.add_memory_region(0x1000, 0x1000) == 2
    assert vm.add_memory_region(0x10000, 0x1000) == 3
    assert [r.guest_addr for r in vm.memory_regions()] == [0, 0x1000, 0x5000, 0x10000]
    assert vm.memory_size == 0x1000 + 0x5000 + 0x1000 + 0x1000


def test_add_memory_ro(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    slot = vm.add_memory_region(0x1000, 0x1000, read_only=True)
    assert vm.memory_region(slot) == MemoryRegionInfo(slot, 0x1000, 0x1000, True, False)


def test_remove_memory(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    slot = vm.add_memory_region(0x1000, 0x1000)
    removed = vm.remove_memory_region(slot)
    assert removed == MemoryRegionInfo(slot, 0x1000, 0x1000, False, False)
    assert [r.slot for r in vm.memory_regions()] == [0]
    # The guest range is no longer backed.
    assert _errno_of(vm.read, 0x1000, 1) == errno.EFAULT


def test_remove_invalid_memory(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    assert _errno_of(vm.remove_memory_region, 1) == errno.ENOENT
    assert _errno_of(vm.remove_memory_region, 12345) == errno.ENOENT


def test_overlap_memory(vm: Vm) -> None:
    vm.add_memory_region(0, 0x10000)
    assert _errno_of(vm.add_memory_region, 0x2000, 0x2000) == errno.EEXIST
    # Touching but not overlapping is fine, on either side.
    vm.add_memory_region(0x10000, 0x1000)
    vm.remove_memory_region(0)
    vm.add_memory_region(0xF000, 0x1000)
    # Sharing a single page with a slot is an overlap.
    assert _errno_of(vm.add_memory_region, 0xE000, 0x2000) == errno.EEXIST
    assert _errno_of(vm.add_memory_region, 0x10000, 0x1000) == errno.EEXIST


def test_sync_memory(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    vm.add_memory_region(0x5000, 0x5000)
    mem_size = 0x1000
    slot = vm.add_memory_region(0x1000, mem_size)
    vm.msync_memory_region(slot, 0, mem_size)
    vm.msync_memory_region(slot, mem_size, 0)
    assert _errno_of(vm.msync_memory_region, slot, mem_size + 1, 0) == errno.EFAULT
    assert _errno_of(vm.msync_memory_region, slot + 1, mem_size, 0) == errno.ENOENT
    assert _errno_of(vm.msync_memory_region, slot, 0, mem_size + 1) == errno.EFAULT
    assert _errno_of(vm.msync_memory_region, slot, mem_size, -mem_size) == errno.EFAULT


# -- slot numbers ------------------------------------------------------------------------


def test_slots_reused_lowest_first(vm: Vm) -> None:
    slots = [vm.add_memory_region(i * 0x10000, 0x1000) for i in range(4)]
    assert slots == [0, 1, 2, 3]
    vm.remove_memory_region(2)
    vm.remove_memory_region(0)
    assert vm.add_memory_region(0x100000, 0x1000) == 0
    assert vm.add_memory_region(0x200000, 0x1000) == 2
    assert vm.add_memory_region(0x300000, 0x1000) == 4


def test_failed_add_takes_no_slot(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    with pytest.raises(KvmError):
        vm.add_memory_region(0, 0x1000)
    assert vm.add_memory_region(0x1000, 0x1000) == 1


# -- argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize(("addr", "size", "err"), [
    (0x800, 0x1000, errno.EINVAL),        # guest address not page aligned
    (0x1001, 0x1000, errno.EINVAL),
    (-0x1000, 0x1000, errno.EINVAL),      # negative address
    (0x1000, 0, errno.EINVAL),            # zero size (in KVM, size 0 means "delete")
    (0x1000, -0x1000, errno.EINVAL),      # negative size
    (0, 1 << 62, errno.EOVERFLOW),        # past any guest physical address
    ((1 << 52) - 0x1000, 0x2000, errno.EOVERFLOW),
])
def test_add_memory_invalid(vm: Vm, addr: int, size: int, err: int) -> None:
    assert _errno_of(vm.add_memory_region, addr, size) == err
    assert vm.memory_regions() == []


def test_a_bool_is_not_a_size(vm: Vm) -> None:
    """A size is an int, not a bool (True would map a page): EINVAL, nothing mapped."""
    assert _errno_of(vm.add_memory_region, 0, True) == errno.EINVAL
    assert vm.memory_regions() == []


def test_the_last_page_of_guest_physical_space_is_not_refused_by_the_binding(vm: Vm) -> None:
    # A slot ending exactly at 2^52: the binding passes it on (this host's KVM takes it;
    # a kernel with a smaller physical width would say EINVAL, never EOVERFLOW).
    top = (1 << 52) - PAGE_SIZE
    try:
        slot = vm.add_memory_region(top, PAGE_SIZE)
    except KvmError as exc:
        assert exc.errno != errno.EOVERFLOW, exc
    else:
        assert vm.read(top + PAGE_SIZE - 1, 1) == b"\0"
        vm.remove_memory_region(slot)


def test_an_explicit_slot_number_is_checked(vm: Vm) -> None:
    """A restore names its slots: a number past the VM's slots, or one in use, is refused
    before KVM (which would move a live slot given its number again)."""
    used = vm.add_memory_region(0, PAGE_SIZE)
    last = vm.max_memory_slots - 1
    fds = open_kvm_fds()
    for bad, err in ((vm.max_memory_slots, errno.EINVAL), (-1, errno.EINVAL),
                     (used, errno.EEXIST)):
        assert _errno_of(vm.add_memory_region, 0x100000, PAGE_SIZE, slot=bad) == err, bad
    assert [r.slot for r in vm.memory_regions()] == [used]
    assert open_kvm_fds() == fds
    assert vm.add_memory_region(0x100000, PAGE_SIZE, slot=last) == last


def test_a_full_slot_table_is_enospc(vm: Vm, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every slot taken, one more is refused (ENOSPC) before KVM, nothing mapped. The
    VM's limit is cut to 2 (filling KVM's 32764 would take as many memfds): the next slot
    number, 2, is one KVM itself would still take."""
    monkeypatch.setattr(vm, "_max_slots", 2)
    assert [vm.add_memory_region(i * PAGE_SIZE, PAGE_SIZE) for i in range(2)] == [0, 1]
    fds = open_kvm_fds()
    assert _errno_of(vm.add_memory_region, 0x100000, PAGE_SIZE) == errno.ENOSPC
    assert [r.slot for r in vm.memory_regions()] == [0, 1]
    assert open_kvm_fds() == fds


def test_add_memory_too_large_for_kvm(vm: Vm) -> None:
    # 8 TiB fits the guest physical address space, but a slot may not exceed
    # KVM_MEM_MAX_NR_PAGES (2^31 - 1) pages: the kernel refuses it, and the memfd and
    # mapping the binding made for it are released.
    fds_before = open_kvm_fds()
    assert _errno_of(vm.add_memory_region, 1 << 32, 1 << 43) == errno.EINVAL
    assert open_kvm_fds() == fds_before
    assert vm.memory_regions() == []


def test_unaligned_size_rounds_up_to_pages(vm: Vm) -> None:
    slot = vm.add_memory_region(0, 100)
    assert vm.memory_region(slot).size == PAGE_SIZE
    assert vm.read(PAGE_SIZE - 1, 1) == b"\0"


def test_read_only_slot_can_log_dirty(vm: Vm) -> None:
    # As KVM allows (see test_kvm_dirty.py for what the log then reports).
    slot = vm.add_memory_region(0, 0x1000, read_only=True, log_dirty=True)
    assert vm.memory_region(slot) == MemoryRegionInfo(slot, 0, 0x1000, True, True)


# -- host access -------------------------------------------------------------------------


def test_memory_starts_zeroed(vm: Vm) -> None:
    vm.add_memory_region(0, 0x4000)
    assert vm.read(0, 0x4000) == bytes(0x4000)


def test_read_write_across_adjacent_slots(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    vm.add_memory_region(0x1000, 0x1000)
    data = bytes(range(256)) * 2
    vm.write(0x1000 - 256, data)
    assert vm.read(0x1000 - 256, len(data)) == data
    assert vm.read(0x1000, 256) == data[256:]


def test_read_into_across_adjacent_slots(vm: Vm) -> None:
    """read_into fills the caller's buffer piece by piece across a slot boundary: each
    slot's bytes land after the previous slot's, not over them."""
    vm.add_memory_region(0, 0x1000)
    vm.add_memory_region(0x1000, 0x1000)
    data = bytes(range(256)) * 2
    vm.write(0x1000 - 256, data)
    out = bytearray(len(data))
    vm.read_into(0x1000 - 256, out)
    assert out == data


def test_empty_access_needs_a_backed_address(vm: Vm) -> None:
    """A zero-length read or write is still checked: at a backed address it reads b"" and
    writes nothing; in a hole (or past the last slot) it is EFAULT, as a longer one."""
    vm.add_memory_region(0, 0x1000)
    assert vm.read(0x800, 0) == b""
    vm.write(0x800, b"")
    assert _errno_of(vm.read, 0x1000, 0) == errno.EFAULT
    assert _errno_of(vm.write, 0x5000, b"") == errno.EFAULT
    assert _errno_of(vm.read_into, 0x1000, bytearray()) == errno.EFAULT


def test_read_write_outside_memory_is_efault(vm: Vm) -> None:
    vm.add_memory_region(0, 0x1000)
    vm.add_memory_region(0x2000, 0x1000)
    assert _errno_of(vm.read, 0x1000, 1) == errno.EFAULT          # the hole
    assert _errno_of(vm.read, 0xFFF, 2) == errno.EFAULT           # runs into the hole
    assert _errno_of(vm.write, 0x2FFF, b"ab") == errno.EFAULT     # runs off the end
    assert _errno_of(vm.read, 0x100000, 1) == errno.EFAULT
    assert _errno_of(vm.read, -1, 1) == errno.EFAULT
    assert _errno_of(vm.read, (1 << 52) - 1, 2) == errno.EFAULT
    assert _errno_of(vm.read, 0, -1) == errno.EINVAL
    # Nothing was written by the refused call.
    assert vm.read(0x2FFF, 1) == b"\0"


def test_read_only_slot_is_writable_by_the_host(vm: Vm) -> None:
    slot = vm.add_memory_region(0x1000, 0x1000, read_only=True)
    vm.write(0x1000, b"rom")
    assert vm.read(0x1000, 3) == b"rom"
    assert vm.memory_region(slot).read_only


def test_memory_fd_backs_the_slot(vm: Vm) -> None:
    slot = vm.add_memory_region(0x4000, 0x2000)
    vm.write(0x5000, b"through the memfd")
    fd = vm.memory_fd(slot)
    assert os.fstat(fd).st_size == 0x2000
    assert os.pread(fd, 17, 0x1000) == b"through the memfd"
    assert _errno_of(vm.memory_fd, slot + 1) == errno.ENOENT


def test_closed_vm_memory_ops_give_ebadf(vm: Vm) -> None:
    slot = vm.add_memory_region(0, 0x1000)
    vm.close()
    assert vm.memory_regions() == []
    for call, args in ((vm.add_memory_region, (0x1000, 0x1000)),
                       (vm.remove_memory_region, (slot,)),
                       (vm.read, (0, 1)),
                       (vm.write, (0, b"x")),
                       (vm.msync_memory_region, (slot, 0, 0x1000)),
                       (vm.memory_fd, (slot,)),
                       (vm.get_dirty_log, (slot,))):
        assert _errno_of(call, *args) == errno.EBADF, call


# -- the dirty log, written by a real guest ----------------------------------------------


def test_dirty_log_marks_exactly_the_stored_pages(vm: Vm) -> None:
    # Code in an unlogged slot; a logged slot of 14 pages at 0x2000 receives the stores.
    vm.add_memory_region(0, 0x2000)
    logged = vm.add_memory_region(0x2000, 0xE000, log_dirty=True)
    assert len(vm.get_dirty_log(logged)) == bitmap_size(0xE000) == 2
    # Host writes do not mark pages.
    vm.write(0x9000, b"host")
    assert vm.get_dirty_log(logged) == b"\0\0"

    # Store to absolute pages 3, 5, 7 and 0xF: slot pages 1, 3, 5 and 13.
    vm.write(CODE_ADDR, real_mode_program(
        store_pages_program(3, 3, stride=0x2000, end=b""),
        store_pages_program(0xF, 1),
    ))
    vcpu = vm.create_vcpu(0)
    setup_real_mode(vcpu)
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vm.read(0x3000, 1) == b"\xab"
    assert vm.get_dirty_log(logged) == bytes([0b0010_1010, 0b0010_0000])
    # Reading the log resets it.
    assert vm.get_dirty_log(logged) == b"\0\0"


def test_dirty_log_clean_after_fetch_and_loads(vm: Vm) -> None:
    # The code itself lives in the logged slot; fetching it and loading from it marks
    # nothing.
    logged = vm.add_memory_region(0, 0x10000, log_dirty=True)
    vm.write(DATA_ADDR, b"\x5a")
    vm.write(CODE_ADDR, real_mode_program(
        [0x31, 0xC0],             # xor ax, ax
        [0x8E, 0xD8],             # mov ds, ax
        mov_al_mem16(DATA_ADDR),  # mov al, [DATA_ADDR]
        HLT,                      # hlt
    ))
    vcpu = vm.create_vcpu(0)
    setup_real_mode(vcpu)
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rax & 0xFF == 0x5A
    assert vm.get_dirty_log(logged) == bytes(bitmap_size(0x10000))


def test_dirty_log_errors(vm: Vm) -> None:
    plain = vm.add_memory_region(0, 0x1000)
    assert _errno_of(vm.get_dirty_log, plain) == errno.EINVAL
    assert _errno_of(vm.get_dirty_log, 7) == errno.ENOENT


def test_dirty_log_of_a_large_slot(vm: Vm) -> None:
    slot = vm.add_memory_region(0x100000, 0x100000 + 0x3000, log_dirty=True)
    log = vm.get_dirty_log(slot)
    assert len(log) == bitmap_size(0x103000) == 33
    assert log == bytes(33)


# -- read-only slots, seen by a real guest -----------------------------------------------


def test_guest_write_to_read_only_slot_is_an_mmio_exit(vm: Vm) -> None:
    # mmio_write_read_program stores 0x5a at MMIO_ADDR+0x10, then loads MMIO_ADDR+0x18.
    vm.add_memory_region(0, 0x10000)
    vm.add_memory_region(MMIO_ADDR, 0x1000, read_only=True)
    vm.write(MMIO_ADDR + 0x18, b"\x33")
    vm.write(CODE_ADDR, mmio_write_read_program(0x5A, 0x10))
    vcpu = vm.create_vcpu(0)
    setup_real_mode(vcpu)
    ex = run_guarded(vcpu)
    assert ex == MmioExit(address=MMIO_ADDR + 0x10, length=1, is_write=True, data=b"\x5a")
    # The load is served from the read-only memory without an exit.
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vcpu.get_regs().rbx & 0xFF == 0x33
    assert vm.read(MMIO_ADDR + 0x10, 1) == b"\0"   # the store did not land
