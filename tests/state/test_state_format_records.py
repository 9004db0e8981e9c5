"""What the snapshot reader takes and hands out, record by record (kvmd.state.format): a
snapshot holds one VM state, a stream may not end between two records of a snapshot,
MemoryData is read in place exactly as protobuf reads it, and a writer refuses a frame of
guest pages read short."""

from __future__ import annotations

import pytest

from kvmd.state.format import (
    FORMAT_VERSION,
    MAGIC,
    CorruptSnapshot,
    MemoryRecord,
    SnapshotReader,
    SnapshotWriter,
    as_message,
    checksum,
    varint,
)
from kvmd_proto import vmm_pb2 as pb

PAGE = 4096


def header() -> pb.SnapshotRecord:
    return pb.SnapshotRecord(header=pb.SnapshotHeader(
        magic=MAGIC, format_version=FORMAT_VERSION, snapshot_id="s1", page_size=PAGE))


def state() -> pb.SnapshotRecord:
    return pb.SnapshotRecord(vm=pb.SavedVm(vm_id="a"))


def snapshot_frames() -> list[bytes]:
    """The frames of a small snapshot, trailer last."""
    w = SnapshotWriter()
    return [w.record(header()), w.record(state()), w.memory(0, 0, b"\x01" * PAGE),
            w.zero(0, PAGE, 2 * PAGE), w.memory(1, 0, b"\x02" * (2 * PAGE)), w.trailer()]


def test_a_second_vm_state_inside_a_snapshot_is_refused() -> None:
    """A snapshot is one VM's state: a vm record among its memory records is out of place
    (a reader would otherwise take the later state for the VM's)."""
    w = SnapshotWriter()
    for body in ([state()], [pb.SnapshotRecord(memory=pb.MemoryData(data=b"\x01" * PAGE)),
                             state()]):
        data = b"".join(w.record(r) for r in [header(), state(), *body])
        with pytest.raises(CorruptSnapshot, match="a vm record where a body record belongs"):
            SnapshotReader().feed(data)


def test_a_stream_ending_between_two_records_of_a_later_snapshot_is_truncated() -> None:
    """A complete snapshot, then a diff cut exactly where one of its records ends (nothing
    of a record is left over): the stream is truncated, the diff not dropped in silence."""
    first = b"".join(snapshot_frames())
    second = snapshot_frames()
    for n in range(1, len(second)):  # the diff's first n records, without its trailer
        reader = SnapshotReader()
        reader.feed(first + b"".join(second[:n]))
        assert reader.snapshots == 1
        with pytest.raises(CorruptSnapshot, match="truncated"):
            reader.finish()
    whole = SnapshotReader()
    whole.feed(first + b"".join(second))
    whole.finish()
    assert whole.snapshots == 2


def framed(*payloads: bytes, pages: int) -> bytes:
    """A snapshot of a header, a state and `payloads` (records as raw bytes, which no
    protobuf writer would produce), with their trailer."""
    frames = [varint(len(p)) + p for p in (header().SerializeToString(),
                                           state().SerializeToString(), *payloads)]
    h = checksum()
    for frame in frames:
        h.update(frame)
    trailer = pb.SnapshotRecord(trailer=pb.SnapshotTrailer(
        records=len(frames), memory_pages=pages, xxh3_128=h.digest())).SerializeToString()
    return b"".join(frames) + varint(len(trailer)) + trailer


def _memory_field(inner: bytes) -> bytes:
    """A SnapshotRecord holding the MemoryData encoded as `inner`."""
    return bytes([(3 << 3) | 2]) + varint(len(inner)) + inner


ONE_PAGE = pb.SnapshotRecord(memory=pb.MemoryData(slot=0, offset=0, data=b"\x01" * PAGE))
ODD_MEMORY = {
    # memory twice in one record: protobuf merges them (slot 2, offset 1 page, the data)
    "merged": ONE_PAGE.SerializeToString()
    + pb.SnapshotRecord(memory=pb.MemoryData(slot=2, offset=PAGE)).SerializeToString(),
    # a slot past 32 bits: protobuf reads the uint32 it holds (slot 1)
    "wide slot": _memory_field(bytes([1 << 3]) + varint((1 << 32) + 1) + bytes([2 << 3])
                               + varint(0) + bytes([(3 << 3) | 2]) + varint(PAGE)
                               + b"\x01" * PAGE),
}


@pytest.mark.parametrize("kind", sorted(ODD_MEMORY))
def test_memory_records_read_in_place_are_what_protobuf_reads(kind: str) -> None:
    """The reader's in-place MemoryData reading gives what protobuf gives for any record
    that starts like one; an encoding the fast path does not expect is protobuf's to
    read."""
    payload = ODD_MEMORY[kind]
    expected = pb.SnapshotRecord.FromString(payload)
    assert len(expected.memory.data) == PAGE
    reader = SnapshotReader()
    records = reader.feed(framed(payload, pages=1))
    reader.finish()
    assert as_message(records[2]) == expected


def test_the_fast_path_reads_plain_memory_records_in_place() -> None:
    """(The counterpart: a record as this daemon writes it is a view, not a copy.)"""
    data = bytearray(framed(ONE_PAGE.SerializeToString(), pages=1))
    (_, _, record, _) = SnapshotReader().feed(data)
    assert isinstance(record, MemoryRecord) and record.data.obj is data


@pytest.mark.parametrize("short", [1, PAGE])
def test_a_memory_frame_read_short_is_refused_by_the_writer(short: int) -> None:
    """`memory_read`'s reader must return the whole frame: fewer bytes than the prefix
    announced would frame the rest of the stream wrongly; refused before it is counted."""
    w = SnapshotWriter()
    with pytest.raises(ValueError, match="a memory frame of"):
        w.memory_read(0, 0, 2 * PAGE, lambda prefix: prefix + b"\x01" * (2 * PAGE - short))
    assert (w.records, w.memory_pages, w.size) == (0, 0, 0)
