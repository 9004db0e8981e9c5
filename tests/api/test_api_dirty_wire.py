"""GetDirtyLog's runs go out serialized by the daemon (packed in C), not by protobuf: the
bytes must be exactly protobuf's own serialization of the same chunk, and the server's
serializer must pass them on untouched while still serializing messages."""

from __future__ import annotations

from array import array

import pytest

from kvmd.api import convert
from kvmd.api.interceptors import serialized_as_is
from kvmd_proto import vmm_pb2 as pb


@pytest.mark.parametrize(("firsts", "counts", "before", "last"), [
    ([], [], 0, True),
    ([0, 100, 2**40], [1, 300, 2**33], 7, True),
    ([3], [1], 0, False),
])
def test_runs_chunk_is_protobufs_own_serialization(firsts: list[int], counts: list[int],
                                                   before: int, last: bool) -> None:
    wire, dirty = convert.dirty_runs_chunk(3, 1 << 20, array("Q", firsts),
                                           array("Q", counts), before, last)
    expected = pb.DirtyLogChunk(slot=3, total_pages=1 << 20, last=last,
                                dirty_pages=sum(counts),
                                total_dirty_pages=before + sum(counts) if last else 0,
                                run_first_pages=firsts, run_pages=counts)
    assert dirty == sum(counts)
    assert wire == expected.SerializeToString()
    assert pb.DirtyLogChunk.FromString(wire) == expected


def test_serializer_passes_bytes_and_serializes_messages() -> None:
    serialize = serialized_as_is(pb.DirtyLogChunk.SerializeToString)
    assert serialize is not None
    msg = pb.DirtyLogChunk(slot=1, last=True)
    assert serialize(msg) == msg.SerializeToString()
    assert serialize(b"\x08\x01") == b"\x08\x01"
    assert serialized_as_is(None) is None
