"""Guest memory backing: what the guest has (populated ranges, non-zero pages, allocated
bytes), discard (punching holes), file-backed slots, files mapped over part of a slot
(map_fd/unmap_fd) and adopting an existing memfd, with real long-mode guests reading and
writing the memory, and no fd or mapping left behind by any call, failed or not.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
import tempfile
from collections.abc import Iterator

import pytest
from guests import ON_PVM, boot_long_mode, run_guarded

from kvmd.kvm import (
    PAGE_SIZE,
    FileBacking,
    FileMapping,
    HltExit,
    IoExit,
    Kvm,
    KvmError,
    MemfdBacking,
    MmioExit,
    Vcpu,
    Vm,
    memory,
)

P = PAGE_SIZE
MiB = 1 << 20
DATA_SLOT_ADDR = 0x400000  # inside the guest's identity map (first GiB), above its code slot
OUT_PORT = 0xE9


def _errno_of(call: object, *args: object, **kwargs: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    return exc.value.errno


# -- guests ------------------------------------------------------------------------------


def store_program(stores: list[tuple[int, int]]) -> bytes:
    """64-bit: `mov byte [addr], value` for each (addr, value), then hlt."""
    return b"".join(bytes([0xC6, 0x04, 0x25]) + struct.pack("<I", a) + bytes([v])
                    for a, v in stores) + bytes([0xF4])   # mov byte [a], v ... hlt


def load_program(addrs: list[int]) -> bytes:
    """64-bit: for each address, `mov al, [addr]; out OUT_PORT, al`, then hlt."""
    return b"".join(bytes([0x8A, 0x04, 0x25]) + struct.pack("<I", a)   # mov al, [a]
                    + bytes([0xE6, OUT_PORT]) for a in addrs) + bytes([0xF4])  # out; hlt


def guest_reads(vcpu: Vcpu) -> bytes:
    """Run a load_program to its hlt; the bytes it read, in order."""
    out = b""
    while True:
        ex = run_guarded(vcpu)
        if isinstance(ex, HltExit):
            return out
        assert isinstance(ex, IoExit) and ex.port == OUT_PORT, ex
        out += ex.data


def restart(vm: Vm, vcpu: Vcpu, code: bytes) -> None:
    from guests import CODE_ADDR

    vm.write(CODE_ADDR, code)
    regs = vcpu.get_regs()
    regs.rip = CODE_ADDR
    vcpu.set_regs(regs)


# -- leak accounting ---------------------------------------------------------------------


def fds_and_maps() -> tuple[int, int]:
    """Open fds, and mappings of files, memfds and KVM objects (anonymous mappings are left
    out: Python's allocator makes and drops those as it likes)."""
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if any(k in line for k in ("memfd:", "kvm", "(deleted)",
                                                               "/tmp/")))
    return len(os.listdir("/proc/self/fd")), maps


@pytest.fixture
def datafile() -> Iterator[int]:
    """A 16-page regular file (page i filled with the byte 0x40+i), open read-write."""
    with tempfile.TemporaryFile() as f:
        f.write(b"".join(bytes([0x40 + i]) * P for i in range(16)))
        f.flush()
        yield f.fileno()


# -- what the guest has ------------------------------------------------------------------


def test_populated_ranges_are_exactly_the_touched_pages(vm: Vm) -> None:
    vcpu = boot_long_mode(vm, store_program([(DATA_SLOT_ADDR + 50 * P + 7, 0x77)]))
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 128 * P)
    assert vm.populated_ranges(slot) == []
    assert vm.allocated_bytes(slot) == 0
    assert _errno_of(vm.allocated_bytes, slot + 1) == errno.ENOENT   # no such slot
    for page in (0, 1, 5, 100):
        vm.write(DATA_SLOT_ADDR + page * P + 100, b"host")
    assert isinstance(run_guarded(vcpu), HltExit)       # the guest touches page 50
    assert vm.populated_ranges(slot) == [(0, 2 * P), (5 * P, P), (50 * P, P), (100 * P, P)]
    assert vm.populated_ranges(slot, 4 * P, 60 * P) == [(5 * P, P), (50 * P, P)]
    assert vm.populated_ranges(slot, P, P) == [(P, P)]
    assert vm.allocated_bytes(slot) == 5 * P
    # A host read of a hole reads the file (pread), which allocates nothing: through the
    # mapping it would (shmem allocates a page on a read fault, as for a guest read).
    assert vm.read(DATA_SLOT_ADDR + 10 * P, P) == bytes(P)
    assert vm.populated_ranges(slot, 10 * P, P) == []
    assert vm.nonzero_page_runs(slot, 10 * P, P) == []
    for off, size in ((1, P), (0, 1), (-P, P), (0, 129 * P), (128 * P, P)):
        assert _errno_of(vm.populated_ranges, slot, off, size) == errno.EINVAL, (off, size)
    assert _errno_of(vm.populated_ranges, slot + 1) == errno.ENOENT


def test_populated_ranges_around_overlays_at_their_edges(vm: Vm, datafile: int) -> None:
    """Files mapped over the first and the last page of a populated range cut exactly
    those pages out of it: no empty ranges are left where they meet."""
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 8 * P)
    vm.write(DATA_SLOT_ADDR + 2 * P, b"own" * (4 * P // 3))
    assert vm.populated_ranges(slot) == [(2 * P, 4 * P)]
    vm.map_fd(slot, 2 * P, P, datafile)
    vm.map_fd(slot, 5 * P, P, datafile)
    assert vm.populated_ranges(slot) == [(3 * P, 2 * P)]


def test_nonzero_page_runs_of_a_range_known_populated_reach_its_end(vm: Vm) -> None:
    """With populated=True the whole range asked for is scanned, its last page included."""
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 4 * P)
    vm.write(DATA_SLOT_ADDR, bytes(4 * P))
    vm.write(DATA_SLOT_ADDR + 3 * P + 5, b"z")
    assert vm.nonzero_page_runs(slot, P, 3 * P, populated=True) == [(3 * P, P)]
    assert vm.nonzero_page_runs(slot, populated=True) == [(3 * P, P)]


def test_populated_ranges_end_at_the_range_asked_for(vm: Vm) -> None:
    """Data that begins exactly at the end of the range asked about is not in it: no
    range, not even an empty one, is reported. Without a size, the range runs from the
    offset to the end of the slot."""
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 4 * P)
    vm.write(DATA_SLOT_ADDR + 2 * P, b"x")
    assert vm.populated_ranges(slot, 0, 2 * P) == []
    assert vm.populated_ranges(slot, 0, 3 * P) == [(2 * P, P)]
    assert vm.populated_ranges(slot, 3 * P) == []
    assert vm.populated_ranges(slot, P) == [(2 * P, P)]
    assert vm.populated_ranges(slot, 4 * P) == []


def test_nonzero_page_runs_skip_zero_and_untouched_pages(vm: Vm) -> None:
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 64 * P)
    vm.write(DATA_SLOT_ADDR + 2 * P, bytes(2 * P))          # populated, but zeros
    vm.write(DATA_SLOT_ADDR + 4 * P, b"\x01" * (2 * P))     # pages 4, 5
    vm.write(DATA_SLOT_ADDR + 7 * P, b"\x02")               # page 7, first byte
    vm.write(DATA_SLOT_ADDR + 10 * P - 1, b"\x03")          # page 9, last byte
    vm.write(DATA_SLOT_ADDR + 11 * P, bytes(P))             # zero page between data
    vm.write(DATA_SLOT_ADDR + 12 * P + 2048, b"\x04")       # page 12, middle
    vm.write(DATA_SLOT_ADDR + 63 * P, b"\x05")              # the last page
    assert vm.populated_ranges(slot) == [(2 * P, 4 * P), (7 * P, P), (9 * P, P),
                                         (11 * P, 2 * P), (63 * P, P)]
    assert vm.nonzero_page_runs(slot) == [(4 * P, 2 * P), (7 * P, P), (9 * P, P),
                                          (12 * P, P), (63 * P, P)]
    assert vm.nonzero_page_runs(slot, 5 * P, 5 * P) == [(5 * P, P), (7 * P, P), (9 * P, P)]
    assert vm.nonzero_page_runs(slot, 0, 4 * P) == []


def test_read_joined_is_head_then_guest_memory_across_slots(vm: Vm, datafile: int) -> None:
    # Two adjacent slots, a file mapped over part of the second: the frame of a snapshot
    # reads what the guest sees, in one bytes object after its head.
    a = vm.add_memory_region(DATA_SLOT_ADDR, 4 * P)
    b = vm.add_memory_region(DATA_SLOT_ADDR + 4 * P, 4 * P)
    data = bytes(range(256)) * (8 * P // 256)
    vm.write(DATA_SLOT_ADDR, data)
    vm.map_fd(b, 2 * P, P, datafile, fd_offset=8 * P)
    seen = vm.read(DATA_SLOT_ADDR + P, 6 * P)
    got = vm.read_joined(DATA_SLOT_ADDR + P, 6 * P, b"head")
    assert isinstance(got, bytes) and got == b"head" + seen
    assert got[4 + 5 * P:4 + 6 * P] == os.pread(datafile, P, 8 * P)
    assert vm.read_joined(DATA_SLOT_ADDR, 0) == b""
    assert _errno_of(vm.read_joined, DATA_SLOT_ADDR + 7 * P, 2 * P) == errno.EFAULT
    # A negative length is refused as read refuses it, not read as "just the head".
    assert _errno_of(vm.read_joined, DATA_SLOT_ADDR, -1, b"head") == errno.EINVAL
    assert _errno_of(vm.read, DATA_SLOT_ADDR, -1) == errno.EINVAL
    assert vm.populated_ranges(a) == [(0, 4 * P)]


def test_a_slot_number_asked_for_is_an_int_not_a_bool(vm: Vm) -> None:
    """A restore asks for exact slot numbers: True is no slot number (as a bool size is no
    size), and nothing is made."""
    assert _errno_of(vm.add_memory_region, DATA_SLOT_ADDR, P, slot=True) == errno.EINVAL
    assert vm.memory_regions() == []
    assert vm.add_memory_region(DATA_SLOT_ADDR, P, slot=1) == 1


def test_nonzero_page_runs_of_a_large_sparse_slot(vm: Vm,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 MiB written all at once (populated), data in every 97th page and a run of 5000,
    # collected 7 runs per C call: Python resumes each call where the last one stopped.
    monkeypatch.setattr(memory, "_RUNS_PER_CALL", 7)
    pages = 4096 * 4
    slot = vm.add_memory_region(DATA_SLOT_ADDR, pages * P)
    image = bytearray(pages * P)
    expected = set(range(0, pages, 97)) | set(range(6000, 11000))
    for p in expected:
        image[p * P + (p % P)] = 0xEE
    vm.write(DATA_SLOT_ADDR, image)
    runs = vm.nonzero_page_runs(slot)
    got = {off // P + i for off, n in runs for i in range(n // P)}
    assert got == expected
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))


# -- discard -----------------------------------------------------------------------------


def test_discard_frees_64_mib_and_the_guest_sees_zeros(vm: Vm) -> None:
    size = 64 * MiB
    addr = DATA_SLOT_ADDR
    marks = [addr + 5 * P, addr + 40 * MiB + 3, addr + size - 1]
    vcpu = boot_long_mode(vm, store_program([(marks[0], 0x11)]))
    slot = vm.add_memory_region(addr, size)
    vm.write(addr, b"\xa5" * size)
    assert isinstance(run_guarded(vcpu), HltExit)        # the guest writes into it too
    assert vm.read(marks[0], 1) == b"\x11"
    before = vm.allocated_bytes(slot)
    assert before >= size
    released = vm.discard(addr, size)
    assert released == before - vm.allocated_bytes(slot)
    assert released >= size - MiB
    assert vm.allocated_bytes(slot) < MiB
    assert vm.populated_ranges(slot) == []
    assert vm.read(marks[1], 16) == bytes(16)
    # The guest reads zeros too: KVM dropped its mappings of the freed pages.
    restart(vm, vcpu, load_program(marks))
    assert guest_reads(vcpu) == bytes(3)
    # And a guest write after the discard lands and shows.
    restart(vm, vcpu, store_program([(marks[1], 0x22)]))
    assert isinstance(run_guarded(vcpu), HltExit)
    assert vm.read(marks[1], 1) == b"\x22"
    assert (40 * MiB, P) in vm.populated_ranges(slot)
    assert vm.nonzero_page_runs(slot) == [(40 * MiB, P)]


def test_discard_spans_adjacent_slots(vm: Vm) -> None:
    a = vm.add_memory_region(DATA_SLOT_ADDR, 8 * P)
    b = vm.add_memory_region(DATA_SLOT_ADDR + 8 * P, 8 * P)
    vm.write(DATA_SLOT_ADDR, b"\x01" * (16 * P))
    assert vm.discard(DATA_SLOT_ADDR + 6 * P, 4 * P) == 4 * P
    assert vm.populated_ranges(a) == [(0, 6 * P)]
    assert vm.populated_ranges(b) == [(2 * P, 6 * P)]
    assert vm.discard(DATA_SLOT_ADDR + 6 * P, 4 * P) == 0     # holes: nothing to release
    # Host reads of the holes read zeros and allocate nothing (see above); writes do.
    assert vm.read(DATA_SLOT_ADDR + 6 * P, 4 * P) == bytes(4 * P)
    assert vm.read(DATA_SLOT_ADDR + 10 * P, 1) == b"\x01"
    assert vm.discard(DATA_SLOT_ADDR + 6 * P, 4 * P) == 0
    vm.write(DATA_SLOT_ADDR + 6 * P, bytes(4 * P))
    assert vm.discard(DATA_SLOT_ADDR + 6 * P, 4 * P) == 4 * P


def test_discard_refusals_discard_nothing(vm: Vm, datafile: int) -> None:
    vm.add_memory_region(DATA_SLOT_ADDR, 8 * P)
    ram = vm.add_memory_region(DATA_SLOT_ADDR + 16 * P, 8 * P)
    vm.add_memory_region(DATA_SLOT_ADDR + 24 * P, 8 * P, backing=FileBacking(datafile))
    vm.write(DATA_SLOT_ADDR, b"\x01" * (8 * P))
    vm.write(DATA_SLOT_ADDR + 16 * P, b"\x02" * (8 * P))
    for addr, size, err in (
        (DATA_SLOT_ADDR + 1, P, errno.EINVAL),            # unaligned address
        (DATA_SLOT_ADDR, P + 1, errno.EINVAL),            # unaligned size
        (DATA_SLOT_ADDR, 0, errno.EINVAL),                # empty
        (DATA_SLOT_ADDR, -P, errno.EINVAL),
        (DATA_SLOT_ADDR + 4 * P, 8 * P, errno.EFAULT),    # runs into the hole after slot 0
        (DATA_SLOT_ADDR + 8 * P, P, errno.EFAULT),        # in the hole
        (DATA_SLOT_ADDR + 20 * P, 8 * P, errno.EINVAL),   # runs into the file-backed slot
    ):
        assert _errno_of(vm.discard, addr, size) == err, (hex(addr), size)
    assert vm.read(DATA_SLOT_ADDR, 8 * P) == b"\x01" * (8 * P)
    assert vm.read(DATA_SLOT_ADDR + 16 * P, 8 * P) == b"\x02" * (8 * P)
    # A file mapped over part of a slot cannot be discarded either.
    vm.map_fd(ram, 2 * P, P, datafile)
    assert _errno_of(vm.discard, DATA_SLOT_ADDR + 16 * P, 4 * P) == errno.EINVAL
    assert vm.read(DATA_SLOT_ADDR + 16 * P, 1) == b"\x02"
    vm.close()
    assert _errno_of(vm.discard, DATA_SLOT_ADDR, P) == errno.EBADF


# -- file-backed slots ---------------------------------------------------------------------


def test_file_backed_slot_guest_writes_reach_the_file(vm: Vm, datafile: int) -> None:
    addr = DATA_SLOT_ADDR
    vcpu = boot_long_mode(vm, store_program([(addr + 10, 0x99), (addr + 3 * P, 0x98)]))
    slot = vm.add_memory_region(addr, 8 * P, log_dirty=True,
                                backing=FileBacking(datafile, offset=4 * P))
    assert vm.read(addr, 1) == b"\x44" and vm.read(addr + 7 * P, 1) == b"\x4b"
    assert isinstance(run_guarded(vcpu), HltExit)
    vm.msync_memory_region(slot, 0, 8 * P)
    assert os.pread(datafile, 1, 4 * P + 10) == b"\x99"
    assert os.pread(datafile, 1, 7 * P) == b"\x98"
    assert vm.get_dirty_log(slot) == bytes([0b1001])    # guest writes are logged as usual
    st = os.fstat(datafile)
    [mapping] = vm.file_mappings()
    assert mapping == FileMapping(slot=slot, guest_addr=addr, offset=0, size=8 * P,
                                  fd_offset=4 * P, writable=True, path=mapping.path,
                                  device=st.st_dev, inode=st.st_ino)
    assert mapping.path == os.readlink(f"/proc/self/fd/{datafile}")
    assert _errno_of(vm.memory_fd, slot) == errno.EINVAL
    # The caller's fd is its own: closing the slot leaves it open, and the file intact.
    vm.write(addr + 5 * P, b"host write")
    vm.remove_memory_region(slot)
    assert os.pread(datafile, 10, 9 * P) == b"host write"
    assert vm.file_mappings() == []


def test_host_read_past_the_end_of_a_truncated_file_is_efault(vm: Vm, datafile: int) -> None:
    """A file cut shorter while mapped (the caller's mistake) makes a host read of the
    part past its end EFAULT (read through the file, it cannot SIGBUS); the part before
    the end still reads."""
    vm.add_memory_region(DATA_SLOT_ADDR, 4 * P, backing=FileBacking(datafile))
    os.ftruncate(datafile, 2 * P)
    assert vm.read(DATA_SLOT_ADDR + P, 2) == b"\x41\x41"
    assert _errno_of(vm.read, DATA_SLOT_ADDR + P, P + 1) == errno.EFAULT
    assert _errno_of(vm.read_into, DATA_SLOT_ADDR + 3 * P, bytearray(1)) == errno.EFAULT


def test_a_slot_too_large_to_map_leaves_no_memfd(vm: Vm) -> None:
    """A slot the host cannot map (2 PiB: past the process's address space, mmap's
    ENOMEM) is refused without leaving its new memfd open."""
    before = fds_and_maps()
    assert _errno_of(vm.add_memory_region, 0, 1 << 51) == errno.ENOMEM
    assert fds_and_maps() == before and vm.memory_regions() == []


def test_a_backing_too_large_to_map_leaves_no_dup(vm: Vm) -> None:
    """The same for a memfd to adopt (sparse, 2 PiB long): refused (ENOMEM), and the Vm's
    dup of it is closed again; the caller's fd stays open."""
    fd = os.memfd_create("kvmd-test-huge", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 51)
        before = fds_and_maps()
        assert _errno_of(vm.add_memory_region, 0, 1 << 51,
                         backing=MemfdBacking(fd)) == errno.ENOMEM
        assert fds_and_maps() == before and vm.memory_regions() == []
        os.fstat(fd)
    finally:
        os.close(fd)


def test_read_only_file_slot(vm: Vm, datafile: int) -> None:
    rofd = os.open(f"/proc/self/fd/{datafile}", os.O_RDONLY)
    try:
        addr = DATA_SLOT_ADDR
        vcpu = boot_long_mode(vm, load_program([addr + P])[:-1]     # (without its hlt)
                              + store_program([(addr, 0x5A)]))
        slot = vm.add_memory_region(addr, 2 * P, backing=FileBacking(rofd, writable=False))
        assert vm.memory_region(slot).read_only
        # A writable mapping of a read-only fd: the kernel's EACCES.
        assert _errno_of(vm.add_memory_region, addr + 4 * P, P,
                         backing=FileBacking(rofd)) == errno.EACCES
        ex = run_guarded(vcpu)
        assert ex == IoExit(is_write=True, port=OUT_PORT, size=1, count=1, data=b"\x41")
        ex = run_guarded(vcpu)
        assert ex == MmioExit(address=addr, length=1, is_write=True, data=b"\x5a")
        assert isinstance(run_guarded(vcpu), HltExit)
        assert os.pread(datafile, 1, 0) == b"\x40"
        # The host cannot write through a read-only mapping either; an empty write is a
        # no-op there as anywhere.
        assert _errno_of(vm.write, addr, b"x") == errno.EACCES
        vm.write(addr, b"")
        assert vm.read(addr, 0) == b""
        assert vm.file_mappings()[0].writable is False
    finally:
        os.close(rofd)


def test_file_backing_refusals_leave_nothing_behind(vm: Vm, datafile: int) -> None:
    r, w = os.pipe()
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    before = fds_and_maps()
    try:
        for backing, err in (
            (FileBacking(datafile, offset=12 * P), errno.EINVAL),   # file ends at 16 pages
            (FileBacking(datafile, offset=1), errno.EINVAL),        # unaligned offset
            (FileBacking(datafile, offset=-P), errno.EINVAL),
            (FileBacking(closed), errno.EBADF),
            (FileBacking(-1), errno.EBADF),
            (FileBacking(r), errno.EINVAL),                         # not a regular file
            (MemfdBacking(datafile, offset=16 * P), errno.EINVAL),
            (MemfdBacking(closed), errno.EBADF),
        ):
            assert _errno_of(vm.add_memory_region, DATA_SLOT_ADDR, 8 * P,
                             backing=backing) == err, backing
        assert _errno_of(vm.add_memory_region, DATA_SLOT_ADDR, 8 * P,
                         backing=datafile) == errno.EINVAL            # not a backing
        # A good mapping over a slot that overlaps another is refused before any mmap.
        vm.add_memory_region(DATA_SLOT_ADDR, 8 * P)
        mid = fds_and_maps()
        assert _errno_of(vm.add_memory_region, DATA_SLOT_ADDR + 4 * P, 8 * P,
                         backing=FileBacking(datafile)) == errno.EEXIST
        assert fds_and_maps() == mid
        assert len(vm.memory_regions()) == 1
        vm.remove_memory_region(0)
        assert fds_and_maps() == before
    finally:
        os.close(r)
        os.close(w)


def test_a_directory_is_not_a_backing_even_when_long_enough(vm: Vm, tmp_path: object) -> None:
    """A directory whose size covers the slot is still not a file to map: EINVAL before any
    mmap (which would say ENODEV), nothing left open."""
    # A directory that reports a page or more (ext4's do; tmpfs's grow by entry).
    candidates = [str(tmp_path), os.path.dirname(__file__), "/", "/usr", "/etc"]
    long_enough = [d for d in candidates if os.stat(d).st_size >= P]
    assert long_enough, f"no directory of at least a page among {candidates}"
    dirfd = os.open(long_enough[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = fds_and_maps()
        assert _errno_of(vm.add_memory_region, DATA_SLOT_ADDR, P,
                         backing=FileBacking(dirfd, writable=False)) == errno.EINVAL
        assert fds_and_maps() == before and vm.memory_regions() == []
    finally:
        os.close(dirfd)


def test_the_vms_dup_of_a_backing_is_close_on_exec(vm: Vm) -> None:
    """The Vm's dup of an adopted memfd is close-on-exec, as the memfds it makes: a child
    the daemon starts does not inherit guest memory."""
    fd = os.memfd_create("kvmd-test-adopt")   # the caller's own may be inheritable
    try:
        os.ftruncate(fd, P)
        slot = vm.add_memory_region(DATA_SLOT_ADDR, P, backing=MemfdBacking(fd))
        assert not os.get_inheritable(vm.memory_fd(slot))
        assert not os.get_inheritable(vm.memory_fd(vm.add_memory_region(0, P)))
    finally:
        os.close(fd)


# -- files mapped over part of a slot ------------------------------------------------------


def test_map_fd_and_unmap_fd_over_part_of_a_slot(vm: Vm, datafile: int) -> None:
    addr = DATA_SLOT_ADDR
    vcpu = boot_long_mode(vm, store_program([(addr + 4 * P + 1, 0x61)]))
    slot = vm.add_memory_region(addr, 16 * P)
    vm.write(addr, b"own memory" * 4096)
    own = vm.read(addr + 4 * P, 2 * P)
    page3 = vm.read(addr + 3 * P, P)
    mapping = vm.map_fd(slot, 4 * P, 2 * P, datafile, fd_offset=8 * P)
    assert (mapping.offset, mapping.size, mapping.fd_offset, mapping.guest_addr) == (
        4 * P, 2 * P, 8 * P, addr + 4 * P)
    assert vm.file_mappings() == [mapping]
    assert vm.read(addr + 4 * P, 1) == b"\x48" and vm.read(addr + 5 * P, 1) == b"\x49"
    assert vm.read(addr + 3 * P, P) == page3                  # only the range changed
    # The overlay is not the slot's own memory: populated ranges leave it out.
    assert vm.populated_ranges(slot) == [(0, 4 * P), (6 * P, 4 * P)]
    assert isinstance(run_guarded(vcpu), HltExit)     # the guest writes through to the file
    removed = vm.unmap_fd(slot, 4 * P, 2 * P)
    assert removed == mapping
    assert os.pread(datafile, 2, 8 * P) == b"\x48\x61"   # msync'ed on removal
    # The slot's own memory is back, as it was.
    assert vm.read(addr + 4 * P, 2 * P) == own
    assert vm.file_mappings() == []
    assert vm.populated_ranges(slot) == [(0, 10 * P)]
    # The guest sees its own memory again too.
    restart(vm, vcpu, load_program([addr + 4 * P + 1]))
    assert guest_reads(vcpu) == own[1:2]
    # Overlays that touch do not overlap: two files side by side, and the page after one
    # is still the slot's own (a discard there is fine).
    first = vm.map_fd(slot, 4 * P, P, datafile)
    second = vm.map_fd(slot, 5 * P, P, datafile, fd_offset=P)
    assert vm.file_mappings() == [first, second]
    vm.discard(addr + 6 * P, P)
    assert vm.read(addr + 6 * P, P) == bytes(P)


def test_ranges_that_end_where_an_overlay_begins_do_not_overlap_it(
        vm: Vm, datafile: int) -> None:
    """A file mapped, or a discard, right below an overlay (ending where it begins) does
    not overlap it; unmap_fd closes the Vm's dup of the file and unmaps it."""
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 8 * P)
    vm.write(DATA_SLOT_ADDR, b"own" * P)
    before = fds_and_maps()
    upper = vm.map_fd(slot, 4 * P, P, datafile)
    lower = vm.map_fd(slot, 3 * P, P, datafile, fd_offset=P)
    assert vm.file_mappings() == [lower, upper]
    assert vm.discard(DATA_SLOT_ADDR + 2 * P, P) == P
    assert vm.read(DATA_SLOT_ADDR + 2 * P, P) == bytes(P)
    vm.unmap_fd(slot, 3 * P, P)
    vm.unmap_fd(slot, 4 * P, P)
    assert fds_and_maps() == before


def test_file_mappings_are_in_guest_address_order(vm: Vm, datafile: int) -> None:
    """file_mappings lists mappings by guest address, not by slot number: a file-backed
    slot added later, below an earlier one, comes first, and overlays sit in between."""
    high = vm.add_memory_region(DATA_SLOT_ADDR + 16 * P, 2 * P,
                                backing=FileBacking(datafile, offset=2 * P))
    low = vm.add_memory_region(DATA_SLOT_ADDR, 2 * P, backing=FileBacking(datafile))
    own = vm.add_memory_region(DATA_SLOT_ADDR + 8 * P, 4 * P)
    vm.map_fd(own, P, P, datafile, fd_offset=4 * P)
    assert (low, high) == (1, 0)
    assert [(m.slot, m.guest_addr) for m in vm.file_mappings()] == [
        (low, DATA_SLOT_ADDR), (own, DATA_SLOT_ADDR + 9 * P), (high, DATA_SLOT_ADDR + 16 * P)]


def test_read_only_map_fd(vm: Vm, datafile: int) -> None:
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 16 * P, read_only=True)
    vm.map_fd(slot, 0, P, datafile, writable=False)
    assert vm.read(DATA_SLOT_ADDR, 1) == b"\x40"
    assert _errno_of(vm.write, DATA_SLOT_ADDR + P - 2, b"abcd") == errno.EACCES
    assert vm.read(DATA_SLOT_ADDR + P, 2) == bytes(2)           # nothing written
    vm.write(DATA_SLOT_ADDR + P, b"ok")                         # the slot's own memory
    vm.unmap_fd(slot, 0, P)
    vm.write(DATA_SLOT_ADDR, b"own")
    assert os.pread(datafile, 3, 0) == b"\x40" * 3


def test_map_fd_refusals_leave_nothing_behind(vm: Vm, datafile: int) -> None:
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 16 * P)
    file_slot = vm.add_memory_region(DATA_SLOT_ADDR + 16 * P, 4 * P,
                                     backing=FileBacking(datafile))
    vm.map_fd(slot, 8 * P, 2 * P, datafile)
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    before = fds_and_maps()
    for args, err in (
        ((slot + 5, 0, P, datafile), errno.ENOENT),          # no such slot
        ((slot, 1, P, datafile), errno.EINVAL),              # unaligned offset
        ((slot, 0, P + 1, datafile), errno.EINVAL),          # unaligned size
        ((slot, 0, 0, datafile), errno.EINVAL),              # empty
        ((slot, 0, P, datafile, 1), errno.EINVAL),           # unaligned file offset
        ((slot, 15 * P, 2 * P, datafile), errno.EINVAL),     # past the slot's end
        ((slot, -P, P, datafile), errno.EINVAL),
        ((slot, 0, 4 * P, datafile, 14 * P), errno.EINVAL),  # past the file's end
        ((slot, 9 * P, P, datafile), errno.EEXIST),          # overlaps the mapped file
        ((slot, 0, P, closed), errno.EBADF),
        ((file_slot, 0, P, datafile), errno.EINVAL),         # a file-backed slot
    ):
        assert _errno_of(vm.map_fd, *args) == err, args
    for args in ((slot, 8 * P, P), (slot, 9 * P, P), (slot, 0, P), (slot + 5, 0, P)):
        assert _errno_of(vm.unmap_fd, *args) == errno.ENOENT, args
    assert fds_and_maps() == before
    assert len(vm.file_mappings()) == 2


# -- adopting a memfd ----------------------------------------------------------------------


def test_adopted_memfd_keeps_its_contents(kvm: Kvm) -> None:
    before = fds_and_maps()
    first = kvm.create_vm()
    slot = first.add_memory_region(DATA_SLOT_ADDR, 1 * MiB)
    first.write(DATA_SLOT_ADDR + 3 * P, b"survives the vm")
    kept = os.dup(first.memory_fd(slot))
    first.close()
    second = kvm.create_vm()
    try:
        vcpu = boot_long_mode(second, load_program([DATA_SLOT_ADDR + 3 * P + i
                                                    for i in range(4)]))
        adopted = second.add_memory_region(DATA_SLOT_ADDR, 1 * MiB,
                                           backing=MemfdBacking(kept))
        assert second.read(DATA_SLOT_ADDR + 3 * P, 15) == b"survives the vm"
        assert guest_reads(vcpu) == b"surv"
        # It is the slot's own memory: a memfd, populated where written, discardable.
        assert second.file_mappings() == []
        assert second.populated_ranges(adopted) == [(3 * P, P)]
        assert os.pread(second.memory_fd(adopted), 3, 3 * P) == b"sur"
        # The Vm holds a dup: the caller's copy may go.
        os.close(kept)
        second.write(DATA_SLOT_ADDR, b"new")
        assert second.discard(DATA_SLOT_ADDR + 3 * P, P) == P
        assert second.read(DATA_SLOT_ADDR + 3 * P, 4) == bytes(4)
        # A memfd shorter than the slot is refused.
        small = os.memfd_create("small")
        os.ftruncate(small, P)
        assert _errno_of(second.add_memory_region, 2 * DATA_SLOT_ADDR, 2 * P,
                         backing=MemfdBacking(small)) == errno.EINVAL
        os.close(small)
    finally:
        second.close()
    assert fds_and_maps() == before


def test_discard_in_a_memfd_adopted_from_an_offset(vm: Vm) -> None:
    """A memfd adopted from an offset: a discard frees the slot's pages where they are in
    the memfd (offset + slot offset), leaving the memfd's pages before the slot alone."""
    fd = os.memfd_create("kvmd-test-adopt", os.MFD_CLOEXEC)
    try:
        os.pwrite(fd, b"".join(bytes([0x60 + i]) * P for i in range(6)), 0)
        slot = vm.add_memory_region(DATA_SLOT_ADDR, 4 * P,
                                    backing=MemfdBacking(fd, offset=2 * P))
        assert vm.read(DATA_SLOT_ADDR, 1) == b"\x62"
        assert vm.populated_ranges(slot) == [(0, 4 * P)]
        assert vm.discard(DATA_SLOT_ADDR, P) == P
        assert vm.read(DATA_SLOT_ADDR, P) == bytes(P)
        assert vm.populated_ranges(slot) == [(P, 3 * P)]
        assert os.pread(fd, 1, 0) + os.pread(fd, 1, P) + os.pread(fd, 1, 3 * P) \
            == b"\x60\x61\x63"
    finally:
        os.close(fd)


def test_close_releases_every_mapping_and_fd(kvm: Kvm, datafile: int) -> None:
    before = fds_and_maps()
    vm = kvm.create_vm()
    vcpu = boot_long_mode(vm, store_program([(DATA_SLOT_ADDR + P, 1)]))
    del vcpu
    a = vm.add_memory_region(DATA_SLOT_ADDR, 16 * P, log_dirty=True)
    vm.add_memory_region(DATA_SLOT_ADDR + 16 * P, 4 * P, backing=FileBacking(datafile))
    vm.add_memory_region(DATA_SLOT_ADDR + 20 * P, 4 * P,
                         backing=FileBacking(datafile, writable=False))
    vm.map_fd(a, 0, 2 * P, datafile)
    vm.map_fd(a, 4 * P, P, datafile, writable=False)
    vm.write(DATA_SLOT_ADDR, b"into the file")   # through the writable overlay
    vm.close()
    assert fds_and_maps() == before
    assert os.pread(datafile, 13, 0) == b"into the file"


def test_guest_write_to_a_read_only_file_over_a_writable_slot(vm: Vm, datafile: int) -> None:
    # The slot is writable for KVM but the host mapping of the file is not. With hardware
    # virtualization KVM cannot get a writable page for the guest's store and KVM_RUN
    # fails (EFAULT). On PVM the store is emulated, the emulator finds the page unwritable
    # and treats it as MMIO: an MmioExit, as for a KVM_MEM_READONLY slot. Either way the
    # file is unchanged; a read-only file belongs in a read-only slot.
    vcpu = boot_long_mode(vm, store_program([(DATA_SLOT_ADDR, 0x5A)]))
    slot = vm.add_memory_region(DATA_SLOT_ADDR, 4 * P)
    vm.map_fd(slot, 0, P, datafile, writable=False)
    if ON_PVM:
        ex = run_guarded(vcpu)
        assert ex == MmioExit(address=DATA_SLOT_ADDR, length=1, is_write=True, data=b"\x5a")
    else:
        assert _errno_of(run_guarded, vcpu) == errno.EFAULT
    assert os.pread(datafile, 1, 0) == b"\x40"
