"""Capabilities by name: the one table of KVM_CAP_* numbers and its lookup.

Used by every fd that answers KVM_CHECK_EXTENSION or KVM_ENABLE_CAP (/dev/kvm, a VM, a vCPU),
so it sits below all three and imports none of them.
"""

from __future__ import annotations

from kvmd.kvm._ffi import lib
from kvmd.kvm._names import CAPABILITIES
from kvmd.kvm.errors import invalid

# Capability name ("KVM_CAP_IRQFD") -> number, as compiled from the headers (plus fallbacks).
CAPABILITY_NUMBERS: dict[str, int] = {name: int(getattr(lib, name)) for name in CAPABILITIES}


def capability_number(cap: int | str) -> int:
    """Accept a capability as its number, its full name, or its short name ("irqfd")."""
    if isinstance(cap, int):
        return cap
    name = cap.upper()
    if not name.startswith("KVM_CAP_"):
        name = "KVM_CAP_" + name
    try:
        return CAPABILITY_NUMBERS[name]
    except KeyError:
        raise invalid("KVM_CHECK_EXTENSION", f"unknown capability {cap!r}") from None
