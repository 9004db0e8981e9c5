"""data_field_view: bulk writes are read straight out of the wire when the message is
exactly one `bytes data` field; anything else is left to protobuf (None)."""

from __future__ import annotations

import pytest

from kvmd.api.base import data_field_view
from kvmd.state.format import read_varint, varint
from kvmd_proto import vmm_pb2 as pb

DATA_TAG = pb.GuestMemoryChunk.DATA_FIELD_NUMBER << 3 | 2


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 1 << 20])
def test_a_data_only_message_is_viewed_without_a_copy(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = pb.GuestMemoryChunk(data=data).SerializeToString()
    view = data_field_view(wire, DATA_TAG) if wire else None
    if size == 0:  # protobuf writes nothing for empty bytes
        assert wire == b"" and view is None
        return
    assert view is not None and view.obj is wire and bytes(view) == data


@pytest.mark.parametrize("wire", [
    pb.GuestMemoryChunk(guest_addr=4096, data=b"ab").SerializeToString(),  # another field
    bytes([DATA_TAG]) + varint(3) + b"ab",          # shorter than its length
    bytes([DATA_TAG]) + varint(1) + b"ab",          # bytes after the field
    bytes([DATA_TAG]) + b"\x80\x80",                # ends inside the length
    bytes([DATA_TAG]) + b"\xff" * 10 + b"\x01",     # a length past 64 bits
    b"\x08\x01",                                    # another tag
])
def test_anything_else_is_left_to_protobuf(wire: bytes) -> None:
    assert data_field_view(wire, DATA_TAG) is None


def test_read_varint_round_trips_and_refuses_overlong() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        assert read_varint(b"x" + varint(value), 1) == (value, 1 + len(varint(value)))
    assert read_varint(b"\x80", 0) is None
    with pytest.raises(ValueError):
        read_varint(b"\xff" * 10 + b"\x01", 0)
