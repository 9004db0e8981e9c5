"""Who owns a guest address: one rule for the three kinds of owner of port and MMIO ranges.

- in-daemon devices (the COM1 UART, the debug-exit port), fixed when the VM is made;
- remote claims (HandleExits), which ClaimTable keeps disjoint among themselves;
- ioevents (RegisterIoevent), several of which may share an address with different
  datamatches, as KVM allows (KVM itself refuses two that would match the same write).

A range belongs to one kind of owner. An ioevent over a device's or a claim's address would
take the guest's writes there in the kernel, silently disabling the device or the handler;
a claim over an ioevent's address would never see those writes. So taking an address that
another kind owns is refused (AlreadyExists), whichever came first, and `check_free` is the
one place every path (RegisterIoevent, HandleExits, restores) asks.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from kvmd.core.devices import DeviceBus
from kvmd.core.errors import AlreadyExists
from kvmd.core.remote import ClaimRange, ClaimTable
from kvmd.kvm import IoSpace

DEVICE, CLAIM, IOEVENT = "device", "claim", "ioevent"


@dataclass(frozen=True)
class Owned:
    """An address range and who holds it (for messages)."""

    space: IoSpace
    base: int
    length: int
    what: str

    @property
    def end(self) -> int:
        return self.base + self.length


def ioevent_range(space: IoSpace, address: int, length: int) -> ClaimRange:
    """The addresses an ioevent takes: `length` bytes from `address` (length 0, any
    length, matches writes starting at `address`: one address)."""
    return ClaimRange(space, address, max(1, length))


class _Sorted:
    """Ranges of one space sorted by base, for overlap checks by binary search. Ranges of
    ioevents may overlap each other, so the search keeps the longest end seen so far."""

    def __init__(self, ranges: Iterable[Owned]) -> None:
        self._ranges = sorted(ranges, key=lambda r: r.base)
        self._bases = [r.base for r in self._ranges]
        self._max_end: list[int] = []
        top = -1
        for r in self._ranges:
            top = max(top, r.end)
            self._max_end.append(top)

    def overlapping(self, base: int, end: int) -> Owned | None:
        i = bisect.bisect_left(self._bases, end)  # ranges from i on start at or after `end`
        if i == 0 or self._max_end[i - 1] <= base:
            return None
        for j in range(i - 1, -1, -1):
            r = self._ranges[j]
            if r.end > base:
                return r
            if self._max_end[j] <= base:
                break
        return None


def check_free(kind: str, ranges: Iterable[ClaimRange], *, devices: DeviceBus,
               claims: ClaimTable, ioevents: Iterable[Owned], resource: str) -> None:
    """Raise AlreadyExists if any of `ranges`, wanted by an owner of `kind`, overlaps an
    address an owner of another kind holds. Same-kind overlaps are the caller's rule (claims
    are disjoint, ioevents follow KVM). Call under the VM's lock, with the change it guards."""
    by_space: dict[IoSpace, _Sorted] = {}
    if kind != IOEVENT:
        events = list(ioevents)
        by_space = {space: _Sorted(e for e in events if e.space == space)
                    for space in (IoSpace.PIO, IoSpace.MMIO)}
    for r in ranges:
        clash: Owned | None = None
        if kind != DEVICE and r.space == IoSpace.PIO:
            device = devices.overlapping(r.base, r.length)
            if device is not None:
                clash = Owned(IoSpace.PIO, device.base, device.length,
                              f"the in-daemon {device.name}")
        if clash is None and kind != CLAIM:
            claimed = claims.overlapping(r)
            if claimed is not None:
                clash = Owned(claimed.space, claimed.base, claimed.length,
                              "a remote handler's claim")
        if clash is None and kind != IOEVENT:
            clash = by_space[r.space].overlapping(r.base, r.end)
        if clash is not None:
            raise AlreadyExists(
                f"{r.space.value} {r.base:#x}+{r.length:#x} overlaps {clash.what} at "
                f"{clash.base:#x}+{clash.length:#x}: an address has one owner (device, "
                "claim or ioevents)", resource=resource)
