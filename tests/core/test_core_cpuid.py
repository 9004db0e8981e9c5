"""CPUID as the core hands it out: the supported set as a template (APIC ID 0 whichever
host CPU asked), and each vCPU given it with its own APIC ID (kvmd.core.cpuid)."""

from __future__ import annotations

import os

from pinning import on_cpu

from kvmd.core.cpuid import with_apic_id
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.kvm import CpuidEntry


def apic_ids(entries: list[CpuidEntry]) -> tuple[int, list[int]]:
    """(leaf 1's initial APIC ID, the x2APIC IDs of the topology leaves' sub-leaves)."""
    leaf1 = next(e for e in entries if e.function == 1)
    return leaf1.ebx >> 24, [e.edx for e in entries if e.function in (0xB, 0x1F)]


def test_with_apic_id_writes_only_the_apic_id_fields() -> None:
    entries = [CpuidEntry(function=0, eax=0x1F, ebx=1, ecx=2, edx=3),
               CpuidEntry(function=1, eax=0x806F8, ebx=0x07_020800, ecx=5, edx=6),
               CpuidEntry(function=0xB, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=7),
               CpuidEntry(function=0xB, index=1, flags=1, eax=4, ebx=4, ecx=0x201, edx=7),
               CpuidEntry(function=0x1F, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=7)]
    out = with_apic_id(entries, 300)
    assert out[0] == entries[0]
    # The xAPIC field holds 8 bits; the x2APIC one all of it.
    assert out[1] == CpuidEntry(function=1, eax=0x806F8, ebx=0x2C_020800, ecx=5, edx=6)
    assert [e.edx for e in out[2:]] == [300, 300, 300]
    assert [(e.eax, e.ebx, e.ecx) for e in out[2:]] == [(e.eax, e.ebx, e.ecx)
                                                         for e in entries[2:]]
    assert entries[1].ebx == 0x07_020800  # the input is left alone


def test_the_supported_set_is_the_same_from_every_cpu(host: Host) -> None:
    answers = []
    for cpu in sorted(os.sched_getaffinity(0)):
        with on_cpu(cpu):
            answers.append(host.supported_cpuid())
            assert apic_ids(answers[-1])[0] == 0
            assert set(apic_ids(answers[-1])[1]) <= {0}
    assert all(answer == answers[0] for answer in answers)


def test_each_vcpu_given_the_supported_set_has_its_own_apic_id(host: Host) -> None:
    vm = host.create_vm("ids", {}, VmOptions())
    vcpus = [vm.create_vcpu(i) for i in (0, 1)]
    # From the last CPU, whose own APIC ID is not 0: what KVM would pass through.
    with on_cpu(max(os.sched_getaffinity(0))):
        supported = host.supported_cpuid()
        for vcpu in vcpus:
            vcpu.set_supported_cpuid(supported)
    for vcpu in vcpus:
        leaf1, x2apic = apic_ids(vcpu.get_cpuid())
        assert leaf1 == vcpu.id
        assert x2apic and set(x2apic) == {vcpu.id}
    host.delete_vm("ids")
