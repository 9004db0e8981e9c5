"""page_runs: the runs of dirty pages in a bitmap, which GetDirtyLog's ranges, diff
snapshots and migration rounds are built from; word-boundary cases against a bit-by-bit
reading of the same bitmap."""

from __future__ import annotations

import random

import pytest

from kvmd.core.dirty import page_runs


def bit_by_bit(bits: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in range(bits.bit_length()):
        if bits >> page & 1:
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((page, 1))
    return runs


@pytest.mark.parametrize("bits", [0, 1, 0b1011, (1 << 64) - 1, 1 << 63, 1 << 64,
                                  ((1 << 64) - 1) << 1, ((1 << 130) - 1) ^ (1 << 64),
                                  (1 << 63) | (1 << 64), ((1 << 200) - 1) << 60])
def test_runs_across_word_boundaries(bits: int) -> None:
    assert page_runs(bits) == bit_by_bit(bits)


def test_random_bitmaps_of_every_density() -> None:
    rng = random.Random(11)
    for _ in range(500):
        pages = rng.choice([3, 64, 65, 128, 191, 700])
        density = rng.random()
        bits = sum(1 << p for p in range(pages) if rng.random() < density)
        assert page_runs(bits) == bit_by_bit(bits)


def test_a_sparse_4_gib_slot_is_its_runs() -> None:
    bits = sum(1 << p for p in range(0, 1 << 20, 100))  # 1% of 4 GiB of pages
    runs = page_runs(bits)
    assert len(runs) == 10486 and runs[:2] == [(0, 1), (100, 1)] and runs[-1] == (1048500, 1)
    assert page_runs((1 << (1 << 20)) - 1) == [(0, 1 << 20)]
