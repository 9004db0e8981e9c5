"""Memory service: slots, streamed guest memory reads/writes, dirty logs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from api_support import GRPC_NATIVE, DaemonFactory, RunningDaemon

from kvmd_proto import vmm_pb2 as pb

MiB = 1 << 20
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def vm(api: RunningDaemon) -> str:
    api.create_vm("mem")
    return "mem"


def _regions(api: RunningDaemon, vm_id: str) -> list[tuple[int, int, int, bool, bool]]:
    resp = api.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id))
    return [(r.slot, r.guest_addr, r.size, r.read_only, r.log_dirty) for r in resp.regions]


# -- slots -----------------------------------------------------------------------------


def test_add_list_remove_regions(api: RunningDaemon, vm: str) -> None:
    r0 = api.add_memory(vm, 0x100000, 0x20000)
    r1 = api.add_memory(vm, 0, 0x10000, read_only=True)
    r2 = api.add_memory(vm, 0x200000, 0x1000, log_dirty=True)
    assert (r0.slot, r0.guest_addr, r0.size, r0.read_only, r0.log_dirty) == (
        0, 0x100000, 0x20000, False, False)
    assert (r1.slot, r1.read_only) == (1, True)
    assert (r2.slot, r2.log_dirty) == (2, True)
    # Listed by guest address.
    assert _regions(api, vm) == [(1, 0, 0x10000, True, False),
                                 (0, 0x100000, 0x20000, False, False),
                                 (2, 0x200000, 0x1000, False, True)]

    removed = api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=0))
    assert (removed.region.slot, removed.region.guest_addr, removed.region.size) == (
        0, 0x100000, 0x20000)
    assert [r[0] for r in _regions(api, vm)] == [1, 2]
    # The lowest free slot number is reused first.
    assert api.add_memory(vm, 0x300000, 0x1000).slot == 0
    assert api.add_memory(vm, 0x400000, 0x1000).slot == 3


def test_size_is_rounded_up_to_pages(api: RunningDaemon, vm: str) -> None:
    region = api.add_memory(vm, 0, 100)
    assert region.size == 4096
    assert api.vms.GetVm(pb.GetVmRequest(vm_id=vm)).memory_bytes == 4096


def test_removed_region_frees_its_range_and_budget(api: RunningDaemon, vm: str) -> None:
    region = api.add_memory(vm, 0, 0x10000)
    api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=region.slot))
    assert _regions(api, vm) == []
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == 0
    api.add_memory(vm, 0x8000, 0x10000)  # overlaps where the old one was: fine now


def test_new_region_is_zeroed(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    api.write(vm, 0, b"\xff" * 0x10000)
    api.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=0))
    api.add_memory(vm, 0, 0x10000)
    assert api.read(vm, 0, 0x10000) == bytes(0x10000)


def test_add_region_bad_inputs(api: RunningDaemon, vm: str) -> None:
    add = api.add_memory
    api.add_memory(vm, 0x100000, 0x10000)
    api.assert_code(lambda: add("nope", 0, 0x1000), NOT_FOUND)
    api.assert_code(lambda: add(vm, 0x1001, 0x1000), INVALID)          # unaligned address
    api.assert_code(lambda: add(vm, 0x800, 0x1000), INVALID)           # half a page
    api.assert_code(lambda: add(vm, 0, 0), INVALID)                    # zero size
    api.assert_code(lambda: add(vm, 0x100000, 0x1000), EXISTS)         # same start
    api.assert_code(lambda: add(vm, 0x10F000, 0x2000), EXISTS)         # overlaps the end
    api.assert_code(lambda: add(vm, 0xFF000, 0x2000), EXISTS)          # overlaps the start
    api.assert_code(lambda: add(vm, 0x0, 0x200000), EXISTS)            # covers it
    api.assert_code(lambda: add(vm, 0x104000, 0x1000), EXISTS)         # inside it
    api.assert_code(lambda: add(vm, 1 << 63, 0x1000), INVALID)         # beyond guest phys
    api.assert_code(lambda: add(vm, (1 << 52) - 0x1000, 0x2000), INVALID)  # crosses 2^52
    assert _regions(api, vm) == [(0, 0x100000, 0x10000, False, False)]


def test_add_region_absurd_size(api: RunningDaemon, vm: str) -> None:
    # 2^62 bytes: more than the per-VM limit (64 GiB by default) -> a limit error, checked
    # before anything is allocated. (Were the limit higher, the binding refuses it as past
    # the 2^52 guest physical address space: INVALID_ARGUMENT.)
    api.assert_code(lambda: api.add_memory(vm, 0, 1 << 62), EXHAUSTED)
    api.assert_code(lambda: api.add_memory(vm, 0, (1 << 64) - 1), EXHAUSTED)
    assert _regions(api, vm) == []
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == 0


def test_add_region_absurd_size_under_a_huge_limit(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_memory_per_vm_bytes=1 << 63, max_memory_total_bytes=1 << 63)
    api.create_vm("big")
    api.assert_code(lambda: api.add_memory("big", 0, 1 << 62), INVALID)
    assert api.hypervisor.GetInfo(pb.GetInfoRequest()).memory_in_use_bytes == 0


def test_remove_and_list_bad_inputs(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x1000)
    remove = api.memory.RemoveMemoryRegion
    api.assert_code(lambda: remove(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=1)), NOT_FOUND)
    api.assert_code(lambda: remove(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=2**32 - 1)),
                    NOT_FOUND)
    api.assert_code(lambda: remove(pb.RemoveMemoryRegionRequest(vm_id="nope", slot=0)),
                    NOT_FOUND)
    api.assert_code(lambda: api.memory.ListMemoryRegions(
        pb.ListMemoryRegionsRequest(vm_id="nope")), NOT_FOUND)
    remove(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=0))
    api.assert_code(lambda: remove(pb.RemoveMemoryRegionRequest(vm_id=vm, slot=0)), NOT_FOUND)


# -- guest memory contents -------------------------------------------------------------


def test_write_read_small(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    assert api.write(vm, 0x1234, b"hello, guest") == 12
    assert api.read(vm, 0x1234, 12) == b"hello, guest"
    assert api.read(vm, 0x1230, 4) == bytes(4)


def test_write_multi_chunk_contiguous(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    data = os.urandom(10_000)
    assert api.write(vm, 0x100, data, chunk=777) == len(data)  # 13 uneven chunks
    assert api.read(vm, 0x100, len(data)) == data


def test_write_and_read_12_mib_streamed(api: RunningDaemon, vm: str) -> None:
    size = 12 * MiB
    api.add_memory(vm, 0x1000000, 16 * MiB)
    data = os.urandom(size)
    assert api.write(vm, 0x1000000 + 0x800, data, chunk=MiB) == size

    chunks = list(api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id=vm, guest_addr=0x1000000 + 0x800, length=size)))
    assert len(chunks) == 12  # default chunk: 1 MiB
    assert all(len(c.data) == MiB for c in chunks)
    assert [c.guest_addr for c in chunks] == [0x1000800 + i * MiB for i in range(12)]
    assert b"".join(c.data for c in chunks) == data


def test_single_write_message_above_grpc_default_limit(api: RunningDaemon, vm: str) -> None:
    # 6 MiB in one message: above grpc's 4 MiB default, below the daemon's 16 MiB limit.
    api.add_memory(vm, 0, 8 * MiB)
    data = os.urandom(6 * MiB)
    assert api.write(vm, 0, data, chunk=len(data)) == len(data)
    assert api.read(vm, 0, len(data), chunk_size=3 * MiB) == data


def test_read_chunk_size(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    data = os.urandom(1000)
    api.write(vm, 0x2000, data)
    chunks = list(api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id=vm, guest_addr=0x2000, length=1000, chunk_size=300)))
    assert [len(c.data) for c in chunks] == [300, 300, 300, 100]
    assert [c.guest_addr for c in chunks] == [0x2000, 0x212C, 0x2258, 0x2384]
    assert b"".join(c.data for c in chunks) == data


def test_read_chunk_size_is_capped_by_message_limit(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_message_bytes=MiB)
    api.create_vm("cap")
    api.add_memory("cap", 0, 4 * MiB)
    chunks = list(api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="cap", guest_addr=0, length=3 * MiB, chunk_size=64 * MiB)))
    assert all(len(c.data) < MiB for c in chunks)
    assert sum(len(c.data) for c in chunks) == 3 * MiB


def test_read_zero_length(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x1000)
    assert list(api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id=vm, guest_addr=0x10, length=0))) == []


def test_read_write_across_adjacent_slots(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    api.add_memory(vm, 0x10000, 0x10000)
    data = os.urandom(0x2000)
    api.write(vm, 0xF000, data)
    assert api.read(vm, 0xF000, 0x2000) == data


def test_read_write_outside_guest_memory(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    api.add_memory(vm, 0x20000, 0x10000)  # a hole at 0x10000-0x1ffff

    def read(addr: int, length: int) -> bytes:
        return api.read(vm, addr, length)

    def write(addr: int, data: bytes) -> int:
        return api.write(vm, addr, data)

    for addr, length in [(0x10000, 1),             # in the hole
                         (0xFFFF, 2),              # runs off the end into the hole
                         (0x8000, 0x20000),        # spans the hole
                         (0x2FFFF, 2),             # runs off the last slot
                         (0x100000, 16),           # far away
                         ((1 << 64) - 1, 2),       # wraps around 2^64
                         (0, 1 << 62)]:            # absurd length
        api.assert_code(lambda a=addr, n=length: read(a, n), INVALID)  # type: ignore[misc]
    for addr, length in [(0x10000, 1), (0xFFFF, 2), (0x8000, 0x20000), (0x2FFFF, 2),
                         ((1 << 64) - 1, 2)]:
        api.assert_code(lambda a=addr, n=length: write(a, b"\xee" * n), INVALID)  # type: ignore[misc]
    # Nothing was written by the refused writes.
    assert read(0xFFFF, 1) == b"\x00"
    assert read(0x20000, 1) == b"\x00"


def test_read_write_without_memory_or_vm(api: RunningDaemon, vm: str) -> None:
    api.assert_code(lambda: api.read(vm, 0, 1), INVALID)
    api.assert_code(lambda: api.write(vm, 0, b"x"), INVALID)
    api.assert_code(lambda: api.read("nope", 0, 1), NOT_FOUND)
    api.assert_code(lambda: api.write("nope", 0, b"x"), NOT_FOUND)


def test_write_stream_bad_inputs(api: RunningDaemon, vm: str) -> None:
    api.add_memory(vm, 0, 0x10000)
    api.create_vm("other")
    api.add_memory("other", 0, 0x10000)
    write = api.memory.WriteGuestMemory

    api.assert_code(lambda: write(iter([])), INVALID)  # no first message
    api.assert_code(lambda: write(iter([pb.WriteGuestMemoryRequest(data=b"x")])), INVALID)

    def two_vms() -> Iterator[pb.WriteGuestMemoryRequest]:
        yield pb.WriteGuestMemoryRequest(vm_id=vm, guest_addr=0, data=b"a")
        yield pb.WriteGuestMemoryRequest(vm_id="other", data=b"b")
    api.assert_code(lambda: write(two_vms()), INVALID)
    assert api.read("other", 0, 1) == b"\x00"


def test_write_and_read_12_mib_over_a_small_message_limit(
        daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_message_bytes=2 * MiB)
    api.create_vm("small")
    api.add_memory("small", 0, 16 * MiB)
    data = os.urandom(12 * MiB)
    assert api.write("small", 0, data, chunk=MiB) == len(data)
    assert api.read("small", 0, len(data)) == data


def test_oversized_message_is_resource_exhausted(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_message_bytes=MiB)
    api.create_vm("big")
    api.add_memory("big", 0, 4 * MiB)
    api.assert_code(lambda: api.write("big", 0, bytes(2 * MiB), chunk=2 * MiB), EXHAUSTED,
                    details=GRPC_NATIVE)
    api.assert_code(lambda: api.create_vm("huge", labels={"k": "v" * (2 * MiB)}), EXHAUSTED,
                    details=GRPC_NATIVE)
    api.assert_code(lambda: api.vms.GetVm(pb.GetVmRequest(vm_id="x" * (2 * MiB))), EXHAUSTED,
                    details=GRPC_NATIVE)
    assert api.read("big", 0, 16) == bytes(16)  # nothing was written
    assert [v.vm_id for v in api.vms.ListVms(pb.ListVmsRequest()).vms] == ["big"]


# -- dirty log ---------------------------------------------------------------------------


def test_dirty_log_of_untouched_slot(api: RunningDaemon, vm: str) -> None:
    region = api.add_memory(vm, 0, 64 * MiB, log_dirty=True)
    api.write(vm, 0, b"host writes do not count" * 100)
    chunks = api.dirty_log(vm, region.slot)
    assert len(chunks) == 1
    (c,) = chunks
    assert (c.slot, c.first_page, c.total_pages, c.dirty_pages, c.last,
            c.total_dirty_pages) == (region.slot, 0, 16384, 0, True, 0)
    assert c.bitmap == bytes(2048)
    # AUTO: no dirty page is shorter as the (empty) list of ranges than as 2048 zero bytes.
    (auto,) = api.dirty_log(vm, region.slot, form=pb.GetDirtyLogRequest.AUTO)
    assert auto.bitmap == b"" and list(auto.run_first_pages) == [] and auto.last


def test_dirty_log_chunks(api: RunningDaemon, vm: str) -> None:
    region = api.add_memory(vm, 0, 64 * MiB, log_dirty=True)
    chunks = api.dirty_log(vm, region.slot, chunk_size=500)
    assert [len(c.bitmap) for c in chunks] == [500, 500, 500, 500, 48]
    assert [c.first_page for c in chunks] == [0, 4000, 8000, 12000, 16000]
    assert [c.last for c in chunks] == [False] * 4 + [True]
    assert all(c.total_pages == 16384 for c in chunks)


def test_dirty_log_bitmap_of_odd_sized_slot(api: RunningDaemon, vm: str) -> None:
    # 13 pages: the bitmap is rounded up to whole bytes.
    region = api.add_memory(vm, 0, 13 * 4096, log_dirty=True)
    (c,) = api.dirty_log(vm, region.slot)
    assert (c.total_pages, len(c.bitmap)) == (13, 2)


def test_dirty_log_bad_inputs(api: RunningDaemon, vm: str) -> None:
    plain = api.add_memory(vm, 0, 0x10000)
    api.assert_code(lambda: api.dirty_log(vm, 5), NOT_FOUND)
    api.assert_code(lambda: api.dirty_log("nope", 0), NOT_FOUND)
    api.assert_code(lambda: api.dirty_log(vm, plain.slot), INVALID)  # not dirty-logged
