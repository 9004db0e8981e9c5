"""The memory records of a diff or a migration round, built in this process on a real VM:
the right pages, and a walk of the backing per slot, not per run of dirty pages."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import kvmd.kvm.memory
from kvmd.api.snapshots import _data_lead
from kvmd.core.host import Host
from kvmd.core.limits import Limits
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.kvm import PAGE_SIZE
from kvmd.state.format import MemoryRecord, SnapshotReader, SnapshotWriter
from kvmd.state.snapshot import SnapshotTaker, snapshot_frames
from kvmd_proto import vmm_pb2 as pb

MiB = 1 << 20
SLOT_PAGES = 64 * MiB // PAGE_SIZE
TOUCHED_PAGES = 16 * MiB // PAGE_SIZE  # pages 0..4095 hold data; the rest were never touched


@pytest.fixture
def vm() -> Iterator[ManagedVm]:
    host = Host(Limits(max_vms=1))
    try:
        managed = host.create_vm("frames", {}, VmOptions())
        managed.add_memory_region(0, SLOT_PAGES * PAGE_SIZE, False, True)
        page = bytes(range(256)) * (PAGE_SIZE // 256)
        managed.write_memory(0, page * TOUCHED_PAGES)
        managed.write_memory(7 * PAGE_SIZE, bytes(PAGE_SIZE))  # touched, but zeros
        yield managed
    finally:
        host.close()


def _records(vm: ManagedVm, pages: list[int]) -> tuple[dict[int, bytes], set[int]]:
    """The diff of `pages` of slot 0 as this daemon frames it, parsed back: the data of each
    page sent with data, and the pages sent as zeros."""
    bits = 0
    for p in pages:
        bits |= 1 << p
    writer = SnapshotWriter()
    frames = snapshot_frames(writer, vm, vm.save_state(), "diff", "base", {0: bits})
    reader = SnapshotReader()
    data: dict[int, bytes] = {}
    zeros: set[int] = set()
    for frame in frames:
        for record in reader.feed(frame):
            if isinstance(record, MemoryRecord):
                for i in range(len(record.data) // PAGE_SIZE):
                    data[record.offset // PAGE_SIZE + i] = bytes(
                        record.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
            elif record.WhichOneof("record") == "zero":
                first = record.zero.offset // PAGE_SIZE
                zeros.update(range(first, first + record.zero.length // PAGE_SIZE))
    assert reader.snapshots == 1
    return data, zeros


def test_a_diff_sends_data_where_there_is_some_and_zeros_elsewhere(vm: ManagedVm) -> None:
    """Dirty pages holding data go as data, a touched page of zeros and never-touched pages
    as zero records, runs that cross from touched into untouched memory split right."""
    pages = [0, 1, 2, 7, 100, *range(TOUCHED_PAGES - 3, TOUCHED_PAGES + 3), SLOT_PAGES - 1]
    data, zeros = _records(vm, pages)
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    assert data == {p: page for p in pages if p < TOUCHED_PAGES and p != 7}
    assert zeros == {7, *range(TOUCHED_PAGES, TOUCHED_PAGES + 3), SLOT_PAGES - 1}


def test_a_diff_of_scattered_pages_walks_the_backing_once_per_slot(
        vm: ManagedVm, monkeypatch: pytest.MonkeyPatch) -> None:
    """SEEK_HOLE walks every page of data after its offset (1.6 ms from the start of 256
    MiB here): asked once per run of dirty pages, a round of scattered pages in a large
    guest took a second. Asked once per slot, as here, it is one walk."""
    holes = []
    real_lseek = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_HOLE:
            holes.append(pos)
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(kvmd.kvm.memory.os, "lseek", lseek)
    pages = list(range(1, TOUCHED_PAGES, 8))  # 512 runs of one page
    data, zeros = _records(vm, pages)
    assert len(data) == len(pages) and not zeros
    assert holes == [0], holes  # the one populated range, walked once


def test_a_streamed_snapshot_sends_each_frame_of_pages_as_its_own_message(
        vm: ManagedVm) -> None:
    """With a lead (the stream's message header), every frame of guest pages is a whole
    SnapshotVmResponse built as the pages were copied; the other frames are joined behind
    one lead. The data of the messages in order is the snapshot, intact."""
    taker = SnapshotTaker(vm, lead=_data_lead)
    messages = list(iter(lambda: taker.pull_message(1 << 20), None))
    reader = SnapshotReader()
    pages: dict[int, bytes] = {}
    kinds = []
    for wire in messages:
        records = reader.feed(pb.SnapshotVmResponse.FromString(wire).data)
        kinds.append(["memory" if isinstance(r, MemoryRecord) else r.WhichOneof("record")
                      for r in records])
        for r in records:
            if isinstance(r, MemoryRecord):
                pages[r.offset] = bytes(r.data)
    assert reader.snapshots == 1 and taker.summary is not None
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    assert b"".join(pages[k] for k in sorted(pages)) == page * (TOUCHED_PAGES - 1)
    # 16 MiB in 1 MiB records, the first MiB in two (page 7 is zeros): 17, each alone
    assert [k for k in kinds if "memory" in k] == [["memory"]] * 17
    assert kinds[0] == ["header", "vm"] and kinds[-1] == ["trailer"]
