"""kvmd.core.owners names, in its ALREADY_EXISTS message, the owner that really overlaps the
refused range: never a neighbour that merely ends where the range begins."""

from __future__ import annotations

import pytest

from kvmd.core.devices import DeviceBus
from kvmd.core.errors import AlreadyExists
from kvmd.core.owners import CLAIM, Owned, check_free
from kvmd.core.remote import ClaimRange, ClaimTable
from kvmd.kvm import IoSpace

PIO = IoSpace.PIO


def refusal(r: ClaimRange, ioevents: list[Owned]) -> str:
    with pytest.raises(AlreadyExists) as err:
        check_free(CLAIM, [r], devices=DeviceBus(), claims=ClaimTable(), ioevents=ioevents,
                   resource="vm/t")
    return str(err.value)


def test_the_message_names_the_overlapping_ioevent_not_the_adjacent_one() -> None:
    # "wide" covers 0x100..0x10f; "adjacent" (0x102..0x103) ends where the claim begins.
    events = [Owned(PIO, 0x100, 0x10, "wide"), Owned(PIO, 0x102, 2, "adjacent")]
    text = refusal(ClaimRange(PIO, 0x104, 1), events)
    assert "wide at 0x100+0x10" in text and "adjacent" not in text, text
    text = refusal(ClaimRange(PIO, 0x103, 1), events)  # both overlap: the nearest one
    assert "adjacent at 0x102+0x2" in text, text
