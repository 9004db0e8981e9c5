"""vCPU creation and state: one roundtrip test per get/set ioctl pair, plus refusals and
closed file descriptors. (Running guests is in test_kvm_run.py.)"""

from __future__ import annotations

import dataclasses
import errno
import signal
import struct

import pytest
from guests import long_mode_sregs, open_kvm_fds

from kvmd.kvm import (
    CpuidEntry,
    Fpu,
    Kvm,
    KvmError,
    MpState,
    Regs,
    Vm,
    kick_signal,
)

IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
LAPIC_TPR = 0x80


def _errno_of(call: object, *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.errno


# -- creation ----------------------------------------------------------------------------


def test_create_vcpu(vm: Vm) -> None:
    vm.add_memory_region(0, 0x10000)
    v0 = vm.create_vcpu(0)
    v1 = vm.create_vcpu(1)
    assert (v0.id, v1.id) == (0, 1)
    assert vm.vcpus() == [v0, v1]
    assert not v0.closed and not v0.is_running
    # The architectural reset state: CS:IP = F000:FFF0, CS base 0xFFFF0000.
    assert v0.get_regs().rip == 0xFFF0
    sregs = v0.get_sregs()
    assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF0000)


def test_create_vcpu_twice_is_eexist(vm: Vm) -> None:
    vm.create_vcpu(0)
    assert _errno_of(vm.create_vcpu, 0) == errno.EEXIST


def test_create_vcpu_id_beyond_max(kvm: Kvm, vm: Vm) -> None:
    max_id = kvm.check_extension("KVM_CAP_MAX_VCPU_ID")
    assert _errno_of(vm.create_vcpu, max_id) == errno.EINVAL


def test_closed_vcpu_gives_ebadf(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()  # idempotent
    assert vcpu.closed
    for call, args in ((vcpu.run, ()), (vcpu.get_regs, ()), (vcpu.set_regs, (Regs(),)),
                       (vcpu.get_sregs, ()), (vcpu.get_fpu, ()), (vcpu.get_msrs, ([0x174],)),
                       (vcpu.get_mp_state, ()), (vcpu.get_vcpu_events, ()),
                       (vcpu.set_signal_mask, ([],)), (vcpu.kick, ()),
                       (vcpu.set_immediate_exit, (True,)), (vcpu.complete_io_in, (b"x",)),
                       (vcpu.set_single_step, (True,)), (vcpu.stats, ()), (vcpu.nmi, ()),
                       # kvm_run is unmapped: these must not reach it
                       (vcpu.complete_mmio_read, (b"x",)), (vcpu.complete_msr, (1,)),
                       (vcpu.complete_hyperv, (0,)), (vcpu.set_request_interrupt_window,
                                                      (True,))):
        assert _errno_of(call, *args) == errno.EBADF, call


def test_closing_the_vm_closes_its_vcpus(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert vcpu.closed
    assert _errno_of(vcpu.get_regs) == errno.EBADF
    assert _errno_of(vm.create_vcpu, 1) == errno.EBADF


# -- registers ---------------------------------------------------------------------------


def test_regs_roundtrip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    values = {name: 0x1111_0000_0000_0000 * (i % 15 + 1) + i
              for i, name in enumerate(f.name for f in dataclasses.fields(Regs))}
    values["rflags"] = 0x246   # bit 1 is reserved-one; ZF, PF, IF
    regs = Regs(**values)
    vcpu.set_regs(regs)
    assert vcpu.get_regs() == regs


def test_regs_out_of_range(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.set_regs, Regs(rax=1 << 64)) == errno.EINVAL
    assert _errno_of(vcpu.set_regs, Regs(rbx=-1)) == errno.EINVAL


def test_a_vcpu_whose_run_mapping_fails_closes_its_fd(
        vm: Vm, monkeypatch: pytest.MonkeyPatch) -> None:
    """A vCPU whose kvm_run cannot be mapped (forced: a mapping size of 0) is refused with
    mmap's errno, and its new fd is closed, not left open with nobody holding it."""
    before = open_kvm_fds()
    monkeypatch.setattr(vm, "_vcpu_mmap_size", 0)
    with pytest.raises(KvmError) as exc:
        vm.create_vcpu(0)
    assert (exc.value.errno, exc.value.ioctl) == (errno.EINVAL, "mmap(kvm_run)")
    assert open_kvm_fds() == before and vm.vcpus() == []


def test_sregs_roundtrip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    sregs = long_mode_sregs(vcpu.get_sregs(), cr3=0x9000)
    sregs.idt.base, sregs.idt.limit = 0x7000, 0xFFF
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs() == sregs


def test_sregs_refused(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cr0 = 1 << 31   # paging without protected mode
    assert _errno_of(vcpu.set_sregs, sregs) == errno.EINVAL
    sregs = vcpu.get_sregs()
    sregs.cs.limit = 1 << 32   # does not fit the field
    assert _errno_of(vcpu.set_sregs, sregs) == errno.EINVAL


def test_sregs_interrupt_bitmap_too_short_is_einval(vm: Vm) -> None:
    """The interrupt bitmap has 4 words: fewer is refused (EINVAL), as any other sregs
    value that does not fit, not an IndexError."""
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.interrupt_bitmap = [0, 0]
    assert _errno_of(vcpu.set_sregs, sregs) == errno.EINVAL


def test_fpu_roundtrip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    fpu = Fpu(
        fpr=[bytes([i] * 10) + bytes(6) for i in range(8)],
        fcw=0x27F,
        fsw=0x0800,
        ftwx=0x80,
        last_opcode=0x1D9,
        last_ip=0x1234,
        last_dp=0x5678,
        xmm=[bytes(range(i, i + 16)) for i in range(16)],
        mxcsr=0x1F80 | 0x6000,   # round toward zero
    )
    vcpu.set_fpu(fpu)
    # KVM_GET_FPU/KVM_SET_FPU carry no MXCSR (KVM reads it back as 0); the rest
    # roundtrips.
    assert vcpu.get_fpu() == dataclasses.replace(fpu, mxcsr=0)


def test_fpu_refused(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.set_fpu, Fpu(xmm=[bytes(16)] * 15)) == errno.EINVAL
    assert _errno_of(vcpu.set_fpu, Fpu(fpr=[bytes(15)] * 8)) == errno.EINVAL
    assert _errno_of(vcpu.set_fpu, Fpu(fcw=1 << 16)) == errno.EINVAL


# Leaves whose registers KVM rewrites after KVM_SET_CPUID2: 0xD (XSAVE sizes follow XCR0),
# and, on PVM hosts, 1 and 7 (host features; see test_kvm_pvm_quirks.py).
RUNTIME_LEAVES = {0x1, 0x7, 0xD}
# Leaves KVM_GET_SUPPORTED_CPUID offers that KVM_SET_CPUID2 may drop when they are all zero:
# 0x1D/0x1E (AMX tile information; seen on 6.18, see test_kvm_pvm_quirks.py).
DROPPED_WHEN_EMPTY = {0x1D, 0x1E}


def _empty(e: CpuidEntry) -> bool:
    return not (e.eax or e.ebx or e.ecx or e.edx)


def test_cpuid_roundtrip(kvm: Kvm, vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_cpuid() == []   # a new vCPU has no CPUID table
    supported = kvm.get_supported_cpuid()
    vcpu.set_cpuid(supported)
    got = {(e.function, e.index): e for e in vcpu.get_cpuid()}
    assert set(got) <= {(e.function, e.index) for e in supported}
    dropped = [e for e in supported if (e.function, e.index) not in got]
    assert all(e.function in DROPPED_WHEN_EMPTY and _empty(e) for e in dropped), dropped
    for e in supported:
        if e.function not in RUNTIME_LEAVES and e not in dropped:
            assert got[(e.function, e.index)] == e


def test_cpuid_refused(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.set_cpuid, [CpuidEntry(function=1 << 32)]) == errno.EINVAL


def test_msrs_roundtrip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_msrs([IA32_SYSENTER_CS]) == {IA32_SYSENTER_CS: 0}
    vcpu.set_msrs({IA32_SYSENTER_CS: 0x10, IA32_SYSENTER_ESP: 0x8000,
                   IA32_SYSENTER_EIP: 0xFFFF_8000_0000_1000})
    assert vcpu.get_msrs([IA32_SYSENTER_CS, IA32_SYSENTER_ESP, IA32_SYSENTER_EIP]) == {
        IA32_SYSENTER_CS: 0x10, IA32_SYSENTER_ESP: 0x8000,
        IA32_SYSENTER_EIP: 0xFFFF_8000_0000_1000}


def test_msrs_refused(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.get_msrs, [0xDEADBEEF]) == errno.EINVAL
    assert _errno_of(vcpu.set_msrs, {IA32_SYSENTER_CS: 1, 0xDEADBEEF: 1}) == errno.EINVAL
    assert _errno_of(vcpu.get_msrs, [IA32_SYSENTER_CS] * 257) == errno.E2BIG
    assert _errno_of(vcpu.get_msrs, [1 << 32]) == errno.EINVAL


def test_mp_state_without_irqchip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert vcpu.get_mp_state() == MpState.RUNNABLE
    vcpu.set_mp_state(MpState.RUNNABLE)
    # Without the in-kernel LAPIC only RUNNABLE is accepted.
    assert _errno_of(vcpu.set_mp_state, MpState.HALTED) == errno.EINVAL


def test_mp_state_must_fit_32_bits(vm: Vm) -> None:
    """An mp_state beyond 32 bits is refused (EINVAL), not cut to its low bits (2^32 would
    become RUNNABLE, 0), and the vCPU's state stays."""
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    vcpu.set_mp_state(MpState.HALTED)
    for bad in (1 << 32, (1 << 32) | MpState.RUNNABLE, -1):
        assert _errno_of(vcpu.set_mp_state, bad) == errno.EINVAL, bad
    assert vcpu.get_mp_state() == MpState.HALTED


def test_mp_state_roundtrip(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    for state in (MpState.HALTED, MpState.UNINITIALIZED, MpState.INIT_RECEIVED,
                  MpState.RUNNABLE):
        vcpu.set_mp_state(state)
        assert vcpu.get_mp_state() == state


def test_lapic_roundtrip(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    regs = bytearray(vcpu.get_lapic())
    assert len(regs) == 1024
    struct.pack_into("<I", regs, LAPIC_TPR, 0x20)
    vcpu.set_lapic(bytes(regs))
    assert struct.unpack_from("<I", vcpu.get_lapic(), LAPIC_TPR)[0] == 0x20


def test_lapic_needs_irqchip(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.get_lapic) == errno.EINVAL


def test_lapic_wrong_size(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.set_lapic, bytes(1023)) == errno.EINVAL


def test_vcpu_events_roundtrip(vm: Vm) -> None:
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    events = vcpu.get_vcpu_events()
    assert events.nmi_pending == events.nmi_masked == 0
    events.nmi_pending = 1
    events.nmi_masked = 1
    events.interrupt_shadow = 1
    vcpu.set_vcpu_events(events)
    assert vcpu.get_vcpu_events() == events


@pytest.mark.parametrize("injected", [
    {"interrupt_injected": 1, "interrupt_nr": 0x31},
    {"exception_injected": 1, "exception_nr": 13, "exception_has_error_code": 1,
     "exception_error_code": 0x10},
    {"nmi_injected": 1},
])
def test_an_event_being_injected_roundtrips(vm: Vm, injected: dict[str, int]) -> None:
    # What a vCPU saved in the middle of delivering an event must get back: the vector too.
    vm.create_irq_chip()
    vcpu = vm.create_vcpu(0)
    events = dataclasses.replace(vcpu.get_vcpu_events(), **injected)
    vcpu.set_vcpu_events(events)
    assert vcpu.get_vcpu_events() == events


def test_vcpu_events_refused(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    events = vcpu.get_vcpu_events()
    events.exception_nr = 256
    assert _errno_of(vcpu.set_vcpu_events, events) == errno.EINVAL


# -- signals, capabilities ---------------------------------------------------------------


def test_set_signal_mask(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vcpu.set_signal_mask([signal.SIGRTMIN])
    vcpu.set_signal_mask([signal.SIGUSR1, signal.SIGUSR2])
    vcpu.set_signal_mask([])
    assert _errno_of(vcpu.set_signal_mask, [0]) == errno.EINVAL
    assert _errno_of(vcpu.set_signal_mask, [100]) == errno.EINVAL


def test_kick_signal_is_a_realtime_signal() -> None:
    assert signal.SIGRTMIN <= kick_signal() <= signal.SIGRTMAX


def test_vcpu_enable_cap_unsupported(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    assert _errno_of(vcpu.enable_cap, "KVM_CAP_HYPERV_SYNIC") == errno.EINVAL
    assert _errno_of(vcpu.enable_cap, 0x7FFF_FFFF) == errno.EINVAL
    assert _errno_of(vcpu.enable_cap, "KVM_CAP_HLT", (1, 2, 3, 4, 5)) == errno.EINVAL
