"""The memory records of a diff or a migration round, built in this process on a real VM:
the right pages, and a walk of the backing per slot, not per run of dirty pages."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import kvmd.kvm.memory
from kvmd.api.snapshots import _data_lead
from kvmd.core.dirty import SNAPSHOT
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


def _streamed(taker: SnapshotTaker) -> tuple[list[list[str]], dict[int, bytes]]:
    """The messages of a streamed snapshot, parsed: the kinds of records each holds, and
    the data of every memory record by offset."""
    reader = SnapshotReader()
    kinds = []
    pages: dict[int, bytes] = {}
    for wire in iter(lambda: taker.pull_message(1 << 20), None):
        records = reader.feed(pb.SnapshotVmResponse.FromString(wire).data)
        kinds.append(["memory" if isinstance(r, MemoryRecord) else r.WhichOneof("record")
                      for r in records])
        pages.update((r.offset, bytes(r.data)) for r in records if isinstance(r, MemoryRecord))
    assert reader.snapshots == 1 and taker.summary is not None
    return kinds, pages


def test_a_streamed_snapshot_sends_a_frame_of_pages_that_fills_a_message_alone(
        vm: ManagedVm) -> None:
    """With a lead (the stream's message header), a frame of guest pages that fills a
    message is sent as it was built; smaller frames are joined behind one lead. The data of
    the messages in order is the snapshot, intact."""
    kinds, pages = _streamed(SnapshotTaker(vm, lead=_data_lead))
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    assert b"".join(pages[k] for k in sorted(pages)) == page * (TOUCHED_PAGES - 1)
    # The first MiB is two short frames (page 7 is zeros), joined with the header and the
    # state; each of the other 15 MiB fills a message alone.
    assert kinds == [["header", "vm", "memory", "memory"], *[["memory"]] * 15, ["trailer"]]


def test_a_streamed_diff_of_scattered_pages_joins_them_into_few_messages(
        vm: ManagedVm) -> None:
    """512 one-page frames go in a few messages of about 1 MiB, not one message each."""
    vm.last_snapshot_id, vm.last_snapshot_layout = "base", vm.save_state().slots
    vm.dirty.add_consumer(SNAPSHOT)
    scattered = list(range(1, TOUCHED_PAGES, 8))
    vm.dirty.put_back(SNAPSHOT, 0, sum(1 << p for p in scattered))
    kinds, pages = _streamed(SnapshotTaker(vm, diff=True, lead=_data_lead))
    assert sorted(pages) == [p * PAGE_SIZE for p in scattered]
    # 512 frames of 4 KiB and a little: three messages of about 1 MiB and the rest
    assert len(kinds) <= 4, [len(k) for k in kinds]
