"""The KVM state calls a snapshot needs, on the real /dev/kvm. So far: the MSR batch limit
(KVM_GET_MSRS/KVM_SET_MSRS take at most 255 entries per call).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from kvmd.kvm import (
    MAX_MSRS_PER_CALL,
    KvmError,
    Vcpu,
    Vm,
)
from kvmd.kvm._ffi import ffi, ioctl

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176


def _errno_of(call: Callable[..., object], *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)
    return exc.value.errno


# -- MSRs to save ------------------------------------------------------------------------


def _raw_get_msrs(vcpu: Vcpu, indices: list[int]) -> int:
    m = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
    for i, index in enumerate(indices):
        m.entries[i].index = index
    return ioctl(vcpu.fileno(), "KVM_GET_MSRS", m)


def test_kernel_msr_batch_limit_is_255(vm: Vm) -> None:
    # arch/x86/kvm/x86.c msr_io(): nmsrs >= MAX_IO_MSRS (256) is E2BIG. rust-vmm's
    # KVM_MAX_MSR_ENTRIES (256) is one too many; so was this binding's old limit.
    vcpu = vm.create_vcpu(0)
    assert MAX_MSRS_PER_CALL == 255
    assert _raw_get_msrs(vcpu, [MSR_IA32_SYSENTER_CS] * 255) == 255
    with pytest.raises(KvmError) as exc:
        _raw_get_msrs(vcpu, [MSR_IA32_SYSENTER_CS] * 256)
    assert exc.value.errno == errno.E2BIG


def test_binding_msr_batch_limit_matches_the_kernel(vm: Vm) -> None:
    # 255 goes through; 256 is refused with the kernel's errno before reaching it.
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS] * 255) == {MSR_IA32_SYSENTER_CS: 0}
    assert _errno_of(vcpu.get_msrs, [MSR_IA32_SYSENTER_CS] * 256) == errno.E2BIG
    assert _errno_of(vcpu.set_msrs, {0x1000 + i: 0 for i in range(256)}) == errno.E2BIG


def test_get_msrs_stops_at_the_first_refused(vm: Vm) -> None:
    # KVM_GET_MSRS returns how many entries it read: it stops at the first it refuses.
    vcpu = vm.create_vcpu(0)
    indices = [MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, 0xDEADBEEF, MSR_IA32_SYSENTER_EIP]
    assert _raw_get_msrs(vcpu, indices) == 2
