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


@pytest.mark.parametrize("form", [pb.GetDirtyLogRequest.AUTO, pb.GetDirtyLogRequest.BITMAP,
                                  pb.GetDirtyLogRequest.RANGES])
@pytest.mark.parametrize("pages", [[], [0], [3, 4, 5, 100, 2**20 - 1], list(range(0, 4096, 2))])
def test_poll_answer_is_protobufs_own_serialization(form: int, pages: list[int]) -> None:
    total = 1 << 20
    bits = sum(1 << p for p in pages)
    bitmap = bits.to_bytes(total // 8, "little")
    wire = convert.whole_dirty_log(7, bitmap, total, form)
    answer = pb.PollDirtyLogResponse.FromString(wire)
    assert answer.SerializeToString() == wire
    log = answer.log
    assert (log.slot, log.first_page, log.total_pages, log.last) == (7, 0, total, True)
    assert log.dirty_pages == log.total_dirty_pages == len(pages)
    runs = convert.bitmap_runs(bitmap)
    as_runs = (list(runs[0]), list(runs[1]))
    if form == pb.GetDirtyLogRequest.BITMAP:
        assert log.bitmap == bitmap and not log.run_first_pages
    elif form == pb.GetDirtyLogRequest.RANGES:
        assert (list(log.run_first_pages), list(log.run_pages)) == as_runs and not log.bitmap
    else:  # AUTO: whichever is shorter; a sparse log of a 128 KiB bitmap is runs
        assert (list(log.run_first_pages), list(log.run_pages)) == as_runs
        assert not log.bitmap and len(wire) < len(bitmap)


def test_poll_auto_sends_a_dense_log_as_its_bitmap() -> None:
    bitmap = bytes([0b0101_0101]) * 4096  # a one-page run at every other page
    log = pb.PollDirtyLogResponse.FromString(
        convert.whole_dirty_log(1, bitmap, 4096 * 8, pb.GetDirtyLogRequest.AUTO)).log
    assert log.bitmap == bitmap and not log.run_first_pages
    assert log.total_dirty_pages == 4096 * 4


def _pages(chunks: list[pb.DirtyLogChunk]) -> set[int]:
    pages: set[int] = set()
    for c in chunks:
        for i, byte in enumerate(c.bitmap):
            pages.update(c.first_page + i * 8 + b for b in range(8) if byte >> b & 1)
        for first, count in zip(c.run_first_pages, c.run_pages, strict=True):
            pages.update(range(first, first + count))
    return pages


def _streamed(bitmap: bytes, total: int, form: int, chunk_bytes: int = 1 << 20
              ) -> list[pb.DirtyLogChunk]:
    return [pb.DirtyLogChunk.FromString(wire)
            for wire in convert.dirty_log_chunks(5, bitmap, total, form, chunk_bytes)]


def test_both_rpcs_choose_auto_by_the_exact_size_of_the_runs() -> None:
    # 600 one-page runs and one of 200 pages in a 16384-page slot: packed, the runs take
    # 1762 bytes, fewer than the 2048-byte bitmap; sized as if each run were the largest
    # (4 bytes), they would not. Both RPCs must send the runs.
    total = 16384
    pages = [2 * i for i in range(600)] + list(range(2000, 2200))
    bitmap = sum(1 << p for p in pages).to_bytes(total // 8, "little")
    streamed = _streamed(bitmap, total, pb.GetDirtyLogRequest.AUTO)
    polled = pb.PollDirtyLogResponse.FromString(
        convert.whole_dirty_log(5, bitmap, total, pb.GetDirtyLogRequest.AUTO)).log
    assert len(streamed) == 1 and streamed[0] == polled
    assert not polled.bitmap and len(polled.run_first_pages) == 601
    assert _pages([polled]) == set(pages)


@pytest.mark.parametrize("pages", [[], [0], list(range(0, 4096, 2)), list(range(0, 4096, 3)),
                                   [7, *range(100, 900), 2**16 - 1]])
def test_streamed_and_polled_answers_agree_in_every_form(pages: list[int]) -> None:
    total = 1 << 16
    bitmap = sum(1 << p for p in pages).to_bytes(total // 8, "little")
    for form in (pb.GetDirtyLogRequest.AUTO, pb.GetDirtyLogRequest.BITMAP,
                 pb.GetDirtyLogRequest.RANGES):
        polled = pb.PollDirtyLogResponse.FromString(
            convert.whole_dirty_log(5, bitmap, total, form)).log
        assert _streamed(bitmap, total, form) == [polled]
        # In small chunks: the same pages, the same form, counted across the chunks.
        small = _streamed(bitmap, total, form, chunk_bytes=64)
        assert _pages(small) == set(pages) == _pages([polled])
        assert all(bool(c.bitmap) == bool(polled.bitmap) for c in small if c.dirty_pages)
        assert [c.last for c in small] == [False] * (len(small) - 1) + [True]
        assert small[-1].total_dirty_pages == len(pages)
        assert sum(c.dirty_pages for c in small) == len(pages)
