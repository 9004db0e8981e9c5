"""The C helpers GetDirtyLog and the dirty tracker use on bitmaps and page runs, against
plain Python on the same data (odd lengths, empty input, 64-bit extremes)."""

from __future__ import annotations

import random
from array import array

import pytest

from kvmd.kvm import bitmap_or, bitmap_popcount, max_u64, pack_varints


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
