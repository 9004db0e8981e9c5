"""CPUID as kvmd hands it out.

KVM_GET_SUPPORTED_CPUID runs CPUID on the host CPU that asks, and passes that CPU's identity
through: its initial APIC ID in leaf 1 EBX[31:24] and its x2APIC ID in EDX of leaves 0xB
and 0x1F (tests/kvm/test_kvm_system.py shows it). Left as they are, the answer would change
with the CPU the call ran on, and every vCPU given the supported set would claim that host
CPU's APIC ID instead of its own (its in-kernel LAPIC has the vCPU id: a guest sees two IDs
for one CPU). So the supported set is handed out as a template with APIC ID 0, and a vCPU
given it gets its own id there, as Firecracker and Cloud Hypervisor set their vCPUs'.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from kvmd.kvm import CpuidEntry

LEAF_FEATURES = 0x1  # EBX[31:24]: initial APIC ID
LEAVES_TOPOLOGY = (0xB, 0x1F)  # EDX of every sub-leaf: x2APIC ID
XAPIC_ID_SHIFT = 24
XAPIC_ID_MASK = 0xFF


def with_apic_id(entries: Iterable[CpuidEntry], apic_id: int) -> list[CpuidEntry]:
    """`entries` with `apic_id` as the CPU's APIC ID (its low 8 bits in leaf 1, all of it
    in the topology leaves); every other field as given."""
    out = []
    for entry in entries:
        if entry.function == LEAF_FEATURES:
            xapic = (apic_id & XAPIC_ID_MASK) << XAPIC_ID_SHIFT
            entry = replace(entry, ebx=(entry.ebx & ~(XAPIC_ID_MASK << XAPIC_ID_SHIFT)) | xapic)
        elif entry.function in LEAVES_TOPOLOGY:
            entry = replace(entry, edx=apic_id)
        out.append(entry)
    return out
