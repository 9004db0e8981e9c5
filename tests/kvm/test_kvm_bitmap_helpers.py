"""The C helpers GetDirtyLog and the dirty tracker use on bitmaps and page runs, against
plain Python on the same data (odd lengths, empty input, 64-bit extremes)."""

from __future__ import annotations

import random
import re
from array import array

import pytest

from kvmd.kvm import (
    bitmap_or,
    bitmap_popcount,
    bitmap_runs,
    bitmap_runs_packed,
    max_u64,
    pack_varints,
)


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64, 131072 + 3])
def test_popcount_and_or_match_python(length: int) -> None:
    rng = random.Random(length)
    a, b = rng.randbytes(length), rng.randbytes(length)
    assert bitmap_popcount(a) == int.from_bytes(a, "little").bit_count()
    merged = bitmap_or(a, b)
    assert bytes(merged) == (int.from_bytes(a, "little") | int.from_bytes(b, "little")
                             ).to_bytes(length, "little")
    assert merged is not a and len(merged) == length  # a new bitmap; neither input changes


def test_or_refuses_bitmaps_of_different_sizes() -> None:
    with pytest.raises(ValueError):
        bitmap_or(b"\x01", b"\x01\x02")


@pytest.mark.parametrize("values", [[], [0], [1, 127, 128, 300, 16383, 16384],
                                    [2**64 - 1, 2**63, 2**35, 0]])
def test_pack_varints_and_max(values: list[int]) -> None:
    packed, total = pack_varints(array("Q", values))
    assert packed == b"".join(varint(v) for v in values)
    assert total == sum(values) % 2**64
    assert max_u64(array("Q", values)) == max(values, default=0)


def python_runs(bitmap: bytes) -> list[tuple[int, int]]:
    bits = "".join(f"{byte:08b}"[::-1] for byte in bitmap)  # character i: page i
    return [(run.start(), len(run.group())) for run in re.finditer("1+", bits)]


@pytest.mark.parametrize(("length", "density"), [
    (0, 0.5), (1, 0.5), (7, 0.9), (8, 0.01), (13, 0.5), (4096, 0.01), (4096, 0.97),
    (4096, 1.0)])
def test_packed_runs_match_python(length: int, density: float) -> None:
    rng = random.Random(length * 1000 + int(density * 100))
    bits = sum(1 << i for i in range(length * 8) if rng.random() < density)
    bitmap = bits.to_bytes(length, "little")
    runs = python_runs(bitmap)
    firsts, counts = bitmap_runs(bitmap)
    assert list(zip(firsts, counts, strict=True)) == runs
    expected_firsts = b"".join(varint(first) for first, _ in runs)
    expected_counts = b"".join(varint(count) for _, count in runs)
    packed = bitmap_runs_packed(bitmap, max(len(expected_firsts), len(expected_counts)))
    assert packed == (expected_firsts, expected_counts, sum(c for _, c in runs))


def test_packed_runs_past_their_cap_are_given_up() -> None:
    bitmap = bytes([0b0101_0101]) * 64  # 256 one-page runs, first pages up to 510
    firsts = b"".join(varint(page) for page in range(0, 512, 2))
    assert bitmap_runs_packed(bitmap, len(firsts)) is not None
    assert bitmap_runs_packed(bitmap, len(firsts) - 1) is None
    assert bitmap_runs_packed(bitmap, 0) is None
    assert bitmap_runs_packed(bytes(64), 0) == (b"", b"", 0)


@pytest.mark.parametrize("first", [128, 16384, 1 << 21])
def test_a_run_whose_varint_just_fills_the_cap_is_kept_and_one_byte_less_gives_up(
        first: int) -> None:
    # First pages whose varint is exactly one byte longer than the value below them
    # (128: 2 bytes, 16384: 3, 2^21: 4): the exact size counts near the cap, never past it.
    bitmap = (1 << first).to_bytes(first // 8 + 1, "little")
    size = len(varint(first))
    assert bitmap_runs_packed(bitmap, size) == (varint(first), varint(1), 1)
    assert bitmap_runs_packed(bitmap, size - 1) is None
