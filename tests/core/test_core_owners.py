"""kvmd.core.owners: one owner per guest address among devices, claims and ioevents."""

from __future__ import annotations

import pytest

from kvmd.core.devices import Console, DebugExit, DeviceBus, Uart16550
from kvmd.core.errors import AlreadyExists
from kvmd.core.owners import CLAIM, DEVICE, IOEVENT, Owned, check_free, ioevent_range
from kvmd.core.remote import ClaimRange, ClaimTable, RemoteHandler
from kvmd.kvm import IoSpace

PIO, MMIO = IoSpace.PIO, IoSpace.MMIO


def bus() -> DeviceBus:
    b = DeviceBus()
    b.add(Uart16550(Console(64)))
    b.add(DebugExit(0x501))
    return b


def check(kind: str, r: ClaimRange, claims: ClaimTable | None = None,
          ioevents: list[Owned] | None = None) -> None:
    check_free(kind, [r], devices=bus(), claims=claims or ClaimTable(),
               ioevents=ioevents or [], resource="vm/t")


def test_ioevents_may_not_take_device_or_claimed_addresses() -> None:
    claims = ClaimTable()
    assert claims.add(RemoteHandler("t", [ClaimRange(MMIO, 0x1000, 0x100)], 1000)) is None
    for r in (ClaimRange(PIO, 0x3FF, 1), ClaimRange(PIO, 0x3F4, 8), ClaimRange(PIO, 0x501, 1),
              ClaimRange(MMIO, 0x10FF, 1), ClaimRange(MMIO, 0xFFC, 8)):
        with pytest.raises(AlreadyExists):
            check(IOEVENT, r, claims)
    for r in (ClaimRange(PIO, 0x3F0, 8), ClaimRange(PIO, 0x400, 1), ClaimRange(MMIO, 0x1100, 4),
              ClaimRange(MMIO, 0x3F8, 1)):  # MMIO 0x3f8 is not COM1
        check(IOEVENT, r, claims)


def test_claims_may_not_take_ioevent_addresses_even_behind_a_shorter_one() -> None:
    # A long ioevent first, then a short one inside it: the nearest by base does not reach
    # 0x106, the long one does.
    events = [Owned(PIO, 0x100, 8, "long"), Owned(PIO, 0x104, 1, "short"),
              Owned(MMIO, 0x106, 1, "other space")]
    with pytest.raises(AlreadyExists, match="long"):
        check(CLAIM, ClaimRange(PIO, 0x106, 1), ioevents=events)
    with pytest.raises(AlreadyExists, match="short"):
        check(CLAIM, ClaimRange(PIO, 0x104, 1), ioevents=events)
    check(CLAIM, ClaimRange(PIO, 0x108, 8), ioevents=events)
    check(CLAIM, ClaimRange(PIO, 0xF8, 8), ioevents=events)
    # Same kind: the caller's rule (claims are disjoint, ioevents follow KVM).
    check(IOEVENT, ClaimRange(PIO, 0x100, 1), ioevents=events)
    check(DEVICE, ClaimRange(PIO, 0x3F8, 8))


def test_an_ioevent_of_any_length_takes_its_address() -> None:
    assert ioevent_range(PIO, 0x80, 0) == ClaimRange(PIO, 0x80, 1)
    assert ioevent_range(MMIO, 0x1000, 8) == ClaimRange(MMIO, 0x1000, 8)
