"""The snapshot byte format (kvmd.state.format): framing, order and checksum, read back
whatever the chunking."""

from __future__ import annotations

import pytest

from kvmd.core.errors import InvalidArgument, InvalidState
from kvmd.state.format import (
    FORMAT_VERSION,
    MAGIC,
    CorruptSnapshot,
    MemoryRecord,
    SnapshotReader,
    SnapshotWriter,
    as_message,
    varint,
)
from kvmd_proto import vmm_pb2 as pb

PAGE = 4096


def header(**fields: object) -> pb.SnapshotRecord:
    values: dict[str, object] = {"magic": MAGIC, "format_version": FORMAT_VERSION,
                                 "snapshot_id": "s1", "page_size": PAGE}
    values.update(fields)
    return pb.SnapshotRecord(header=pb.SnapshotHeader(**values))  # type: ignore[arg-type]


def small_snapshot() -> bytes:
    w = SnapshotWriter()
    return b"".join([w.record(header()), w.record(pb.SnapshotRecord(vm=pb.SavedVm(vm_id="a"))),
                     w.memory(0, 0, b"\x01" * PAGE), w.zero(0, PAGE, 2 * PAGE),
                     w.memory(1, 8 * PAGE, b"\x02" * (3 * PAGE)), w.trailer()])


def test_varint() -> None:
    assert [varint(v) for v in (0, 1, 127, 128, 300)] == [
        b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02"]


@pytest.mark.parametrize("chunk", [1, 2, 7, 100, 1 << 20])
def test_read_back_whatever_the_chunking(chunk: int) -> None:
    data = small_snapshot()
    reader = SnapshotReader()
    records = []
    for i in range(0, len(data), chunk):
        records += [as_message(r) for r in reader.feed(data[i:i + chunk])]
    reader.finish()
    kinds = [r.WhichOneof("record") for r in records]
    assert kinds == ["header", "vm", "memory", "zero", "memory", "trailer"]
    assert records[4].memory.data == b"\x02" * (3 * PAGE) and records[4].memory.slot == 1
    assert records[-1].trailer.memory_pages == 6 and records[-1].trailer.records == 5
    assert reader.snapshots == 1 and reader.bytes_read == len(data)


def test_read_back_whatever_the_cuts() -> None:
    """Cuts anywhere (inside a length, right after one, inside the data, one byte before a
    frame ends), and several records in the piece that completes a cut one."""
    data = small_snapshot()
    cuts = [*range(0, 300), *range(300, len(data), 97), len(data) - 1]
    for i in cuts:
        for j in (i + 1, i + 5, i + 4200, len(data)):
            reader = SnapshotReader()
            records = []
            for piece in (data[:i], data[i:j], data[j:]):
                records += [as_message(r) for r in reader.feed(piece)]
            reader.finish()
            assert [r.WhichOneof("record") for r in records] == [
                "header", "vm", "memory", "zero", "memory", "trailer"], (i, j)
            assert records[4].memory.data == b"\x02" * (3 * PAGE)


def test_hand_encoded_memory_is_what_protobuf_reads() -> None:
    w = SnapshotWriter()
    frame = w.memory(3, 5 * PAGE, b"xyz" * 10)
    reader = SnapshotReader()
    reader._expect = "body"  # type: ignore[attr-defined]  # a frame out of context
    (record,) = [as_message(r) for r in reader.feed(frame)]
    assert (record.memory.slot, record.memory.offset, record.memory.data) == (
        3, 5 * PAGE, b"xyz" * 10)
    # The reader hands it out in place (a view of the bytes fed), not as a copy.
    reader = SnapshotReader()
    reader._expect = "body"  # type: ignore[attr-defined]
    fed = bytearray(frame)
    (view,) = reader.feed(fed)
    assert isinstance(view, MemoryRecord) and view.data.obj is fed


@pytest.mark.parametrize("records", [
    ["vm"],                     # no header first
    ["header", "memory"],       # memory before the VM's state
    ["header", "vm", "header"],  # a header inside a snapshot
    ["header", "trailer"],      # a trailer before the VM's state
])
def test_records_out_of_order_are_refused(records: list[str]) -> None:
    w = SnapshotWriter()
    made = {"header": lambda: w.record(header()),
            "vm": lambda: w.record(pb.SnapshotRecord(vm=pb.SavedVm())),
            "memory": lambda: w.memory(0, 0, b"\x01" * PAGE),
            "trailer": w.trailer}
    data = b"".join(made[k]() for k in records)
    with pytest.raises(CorruptSnapshot):
        SnapshotReader().feed(data)


def test_header_checks() -> None:
    for bad, error in ((header(magic="x"), CorruptSnapshot),
                       (header(format_version=FORMAT_VERSION + 1), InvalidState),
                       (header(format_version=0), CorruptSnapshot),
                       (header(page_size=2 * PAGE), InvalidState)):
        with pytest.raises(error):
            SnapshotReader().feed(SnapshotWriter().record(bad))
    assert issubclass(CorruptSnapshot, InvalidArgument)


def test_end_of_stream_checks() -> None:
    data = small_snapshot()
    reader = SnapshotReader()
    reader.feed(data[:-3])
    with pytest.raises(CorruptSnapshot, match="truncated"):
        reader.finish()
    with pytest.raises(CorruptSnapshot, match="empty"):
        SnapshotReader().finish()
    two = SnapshotReader()
    two.feed(data + data)
    two.finish()
    assert two.snapshots == 2


def test_a_stream_cut_inside_a_later_snapshot_is_truncated() -> None:
    """A complete snapshot, then the first bytes of a diff: the diff must not be dropped
    in silence."""
    data = small_snapshot()
    for cut in (1, 5, 40):
        reader = SnapshotReader()
        reader.feed(data + data[:cut])
        with pytest.raises(CorruptSnapshot, match="truncated"):
            reader.finish()


def test_an_oversized_length_is_refused_when_it_arrives_in_pieces() -> None:
    """Refused as soon as the length is whole, not buffered up to it."""
    length = varint(1 << 40)
    reader = SnapshotReader()
    reader.feed(length[:1])
    with pytest.raises(CorruptSnapshot, match="a record of"):
        reader.feed(length[1:] + b"x")


@pytest.mark.parametrize("count", ["records", "memory_pages"])
def test_trailer_counts_must_match(count: str) -> None:
    """The trailer's record and page counts are checked as well as its checksum."""
    w = SnapshotWriter()
    data = b"".join([w.record(header()), w.record(pb.SnapshotRecord(vm=pb.SavedVm())),
                     w.memory(0, 0, b"\x01" * PAGE)])
    setattr(w, count, getattr(w, count) + 1)
    with pytest.raises(CorruptSnapshot, match="checksum"):
        SnapshotReader().feed(data + w.trailer())


def test_memory_data_longer_than_its_record_is_refused() -> None:
    """A hand-encoded MemoryData whose data field claims more bytes than its record holds
    is refused, not handed out cut short."""
    data = b"\x05" * 50
    inner = (bytes([1 << 3]) + varint(0) + bytes([2 << 3]) + varint(0)   # slot, offset
             + bytes([(3 << 3) | 2]) + varint(100) + data)                # data: 100 claimed
    payload = bytes([(3 << 3) | 2]) + varint(len(inner)) + inner
    reader = SnapshotReader()
    reader._expect = "body"  # type: ignore[attr-defined]  # a frame out of context
    with pytest.raises(CorruptSnapshot):
        reader.feed(varint(len(payload)) + payload)
