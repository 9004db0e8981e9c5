"""The snapshot reader's framing at its limits (kvmd.state.format): a record length that is
not a varint, a length exactly at the record limit, and lengths written in more bytes than
they need, read the same whatever the cuts."""

from __future__ import annotations

import pytest

from kvmd.state.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_RECORD_BYTES,
    CorruptSnapshot,
    SnapshotReader,
    as_message,
    checksum,
    varint,
)
from kvmd_proto import vmm_pb2 as pb

PAGE = 4096


@pytest.mark.parametrize("piece", [1, 3, 64])
def test_a_record_length_running_past_64_bits_is_refused(piece: int) -> None:
    """Eleven bytes that all say "more follows" are no varint: refused as such at once,
    not buffered while more of them arrive."""
    data = b"\x80" * 11 + b"\x01"
    reader = SnapshotReader()
    with pytest.raises(CorruptSnapshot, match="not a varint"):
        for i in range(0, len(data), piece):
            reader.feed(data[i:i + piece])


@pytest.mark.parametrize("split", [False, True])
def test_a_record_of_exactly_the_limit_is_buffered_one_byte_more_is_refused(
        split: bool) -> None:
    """MAX_RECORD_BYTES is the largest record a reader takes (an inclusive limit), whether
    its length arrives whole or in pieces."""
    def feed(data: bytes) -> None:
        reader = SnapshotReader()
        if split:
            reader.feed(data[:1])
            data = data[1:]
        assert reader.feed(data) == []

    feed(varint(MAX_RECORD_BYTES) + b"\x0a")  # the start of a record at the limit: waits
    with pytest.raises(CorruptSnapshot, match=f"a record of {MAX_RECORD_BYTES + 1} bytes"):
        feed(varint(MAX_RECORD_BYTES + 1) + b"\x0a")


def _long_varint(value: int) -> bytes:
    """`value` (< 128) as a varint of two bytes: valid protobuf, longer than it needs."""
    assert value < 0x80
    return bytes([0x80 | value, 0x00])


def _snapshot_with_long_lengths() -> bytes:
    """A snapshot whose records' lengths each take a byte more than they need (a writer
    may do so): header, state, a zero record of 9 bytes, trailer."""
    records = [
        pb.SnapshotRecord(header=pb.SnapshotHeader(magic=MAGIC, format_version=FORMAT_VERSION,
                                                   snapshot_id="s1", page_size=PAGE)),
        pb.SnapshotRecord(vm=pb.SavedVm(vm_id="a")),
        pb.SnapshotRecord(zero=pb.MemoryZero(slot=0, offset=PAGE, length=2 * PAGE)),
    ]
    frames = [_long_varint(len(p)) + p for p in (r.SerializeToString() for r in records)]
    h = checksum()
    for frame in frames:
        h.update(frame)
    trailer = pb.SnapshotRecord(trailer=pb.SnapshotTrailer(
        records=len(frames), memory_pages=2, xxh3_128=h.digest())).SerializeToString()
    return b"".join(frames) + varint(len(trailer)) + trailer


def test_lengths_longer_than_needed_read_the_same_whatever_the_cuts() -> None:
    """A cut inside a two-byte length of a short record: the bytes the reader takes to
    complete the length reach past the record's end, into the next one. Each record is
    still read whole and alone, from every cut."""
    data = _snapshot_with_long_lengths()
    for cut in range(len(data) + 1):
        reader = SnapshotReader()
        records = [as_message(r) for piece in (data[:cut], data[cut:])
                   for r in reader.feed(piece)]
        reader.finish()
        assert [r.WhichOneof("record") for r in records] == [
            "header", "vm", "zero", "trailer"], cut
        assert records[2].zero == pb.MemoryZero(slot=0, offset=PAGE, length=2 * PAGE), cut
        assert records[3].trailer.memory_pages == 2
