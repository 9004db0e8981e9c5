"""Plain values <-> kernel structs shared by more than one fd type (CPUID tables, the
KVM_ENABLE_CAP argument), and the range checks of integers bound for a struct field.

Below `system`, `vm` and `vcpu`: it imports none of them.
"""

from __future__ import annotations

from typing import Any

from kvmd.kvm._ffi import ffi
from kvmd.kvm.errors import invalid
from kvmd.kvm.types import CpuidEntry


def cpuid_entries(c: Any) -> list[CpuidEntry]:
    """The entries of a `struct kvm_cpuid2` the kernel filled in."""
    return [
        CpuidEntry(
            function=int(e.function), index=int(e.index), flags=int(e.flags),
            eax=int(e.eax), ebx=int(e.ebx), ecx=int(e.ecx), edx=int(e.edx),
        )
        for e in (c.entries[i] for i in range(c.nent))
    ]


def cpuid2_struct(entries: list[CpuidEntry], op: str) -> Any:
    """A `struct kvm_cpuid2` holding `entries` (a field out of range is EINVAL for `op`)."""
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    try:
        for i, e in enumerate(entries):
            dst = c.entries[i]
            dst.function, dst.index, dst.flags = e.function, e.index, e.flags
            dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
    except (OverflowError, TypeError) as exc:
        raise invalid(op, str(exc)) from None
    return c


def enable_cap_struct(cap: int, args: tuple[int, ...], flags: int) -> Any:
    """A `struct kvm_enable_cap` (at most four arguments, each an unsigned 64-bit value)."""
    if len(args) > 4:
        raise invalid("KVM_ENABLE_CAP", "at most 4 arguments")
    s = ffi.new("struct kvm_enable_cap *")
    s.cap = u32(cap, "cap")
    s.flags = u32(flags, "flags")
    for i, a in enumerate(args):
        s.args[i] = u64(a, "arg")
    return s


def u64(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise invalid("argument", f"{what} must be an unsigned 64-bit integer")
    return value


def u32(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise invalid("argument", f"{what} must be an unsigned 32-bit integer")
    return value


def exact(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise invalid("argument", f"{what} must be exactly {size} bytes")
    return bytes(data)
