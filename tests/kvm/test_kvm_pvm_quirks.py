"""Where this host's /dev/kvm differs from the kernel documentation.

The machines this project runs on expose KVM through "PVM" (the kvm_pvm module: software
nested virtualization inside a microVM). The full ioctl API is there, but guest code does
not run on hardware virtualization: every guest instruction, in every mode, goes through
KVM's x86 instruction emulator. Each test below shows one consequence. On a PVM host it
asserts what PVM does; elsewhere it asserts what the documentation (or hardware) says, so
the suite stays honest on a bare-metal KVM host too.
"""

from __future__ import annotations

import errno
import struct

import pytest
from guests import (
    CODE_ADDR,
    DEBUG_PORT,
    HLT,
    ON_PVM,
    boot_long_mode,
    boot_real_mode,
    out_bytes_program,
    real_mode_program,
    run_guarded,
)

from kvmd.kvm import (
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    Kvm,
    KvmError,
    ShutdownExit,
    Vm,
)
from kvmd.kvm._ffi import lib

CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
KVM_HC_MAP_GPA_RANGE = 12
SSE3 = 1 << 0      # CPUID.1:ECX
SSSE3 = 1 << 9
SSE4_2 = 1 << 20


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags |= set(line.partition(":")[2].split())
    return flags


def test_host_is_pvm_when_kvm_pvm_is_loaded(kvm: Kvm) -> None:
    # ON_PVM (the kvm_pvm module is present) decides which branch the tests below take; it
    # must agree with the CPU: KVM on hardware needs VMX or SVM, and PVM is how these hosts
    # have a working /dev/kvm (the fixture opened it: API version 12) without either.
    hardware = _cpu_flags() & {"vmx", "svm"}
    print(f"PVM host: {ON_PVM}; hardware virtualization flags: {sorted(hardware) or 'none'}")
    assert kvm.api_version == 12
    if ON_PVM:
        assert not hardware, f"kvm_pvm is loaded on a CPU with {sorted(hardware)}"
    else:
        assert hardware, "/dev/kvm works without kvm_pvm, VMX or SVM"


def test_io_exits_statistic(vm: Vm) -> None:
    # Documentation: the vCPU statistic io_exits counts exits to handle port IO. On PVM
    # port IO is completed by the instruction emulator and io_exits stays 0, while the
    # exits themselves (and `exits`) are counted.
    vcpu = boot_real_mode(vm, out_bytes_program(b"abc"))
    for _ in range(3):
        assert isinstance(run_guarded(vcpu), IoExit)
    assert isinstance(run_guarded(vcpu), HltExit)
    stats = vcpu.stats().read()
    assert vcpu.exit_counts()["io"] == 3
    assert stats["exits"] >= 4   # type: ignore[operator]
    assert stats["io_exits"] == (0 if ON_PVM else 3)


def test_every_instruction_is_emulated(vm: Vm) -> None:
    # Even 64-bit code: insn_emulation counts each instruction of the guest.
    vcpu = boot_long_mode(vm, bytes([
        0xB8, 0x01, 0x00, 0x00, 0x00,   # mov eax, 1
        0x31, 0xC9,                     # xor ecx, ecx
        0x48, 0xFF, 0xC0,               # inc rax
        0xF4,                           # hlt
    ]))
    assert isinstance(run_guarded(vcpu), HltExit)
    emulated = vcpu.stats().read()["insn_emulation"]
    if ON_PVM:
        assert emulated >= 4   # type: ignore[operator]
    else:
        assert emulated < 4    # type: ignore[operator]


def test_sse_instruction_is_an_emulation_failure(vm: Vm) -> None:
    # With SSE enabled (CR4.OSFXSR), `addps` runs on hardware. KVM's emulator has no SSE
    # arithmetic, so on PVM it ends in KVM_EXIT_INTERNAL_ERROR (emulation). Test guests
    # must stay with integer instructions.
    vcpu = boot_long_mode(vm, bytes([
        0x0F, 0x58, 0xC1,   # addps xmm0, xmm1
        0xF4,               # hlt
    ]))
    sregs = vcpu.get_sregs()
    sregs.cr0 = (sregs.cr0 | CR0_MP) & ~CR0_EM
    sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT
    vcpu.set_sregs(sregs)
    ex = run_guarded(vcpu)
    if ON_PVM:
        assert isinstance(ex, InternalErrorExit)
        assert ex.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
        assert vcpu.get_regs().rip == CODE_ADDR   # did not execute
    else:
        assert isinstance(ex, HltExit)


def test_long_mode_int3_is_an_emulation_failure(vm: Vm) -> None:
    # int3 with an IDT too short for vector 3 should escalate to a triple fault
    # (KVM_EXIT_SHUTDOWN, as `ud2` does in test_kvm_run.py). KVM's emulator implements
    # software interrupts only in real mode: on PVM this is an emulation failure instead.
    vcpu = boot_long_mode(vm, bytes([
        0xCC,   # int3
        0xF4,   # hlt
    ]))
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = 0, 15   # vector 0 only
    vcpu.set_sregs(sregs)
    ex = run_guarded(vcpu)
    if ON_PVM:
        assert isinstance(ex, InternalErrorExit)
        assert ex.suberror == lib.KVM_INTERNAL_ERROR_EMULATION
    else:
        assert isinstance(ex, ShutdownExit)


def test_real_mode_idt_limit_is_not_enforced(vm: Vm) -> None:
    # In real mode the CPU checks the vector against IDTR.limit (INT n: "IF ((vector << 2)
    # + 3) is not within IDT limit THEN #GP"), so int3 with limit 3 ends in a triple fault.
    # KVM's emulator reads the IVT entry without checking the limit: on PVM the handler
    # runs.
    vcpu = boot_real_mode(vm, real_mode_program(
        [0xCC],   # int3
        HLT,      # hlt
    ))
    handler = CODE_ADDR + 0x100
    vm.write(handler, out_bytes_program(b"3"))
    vm.write(3 * 4, struct.pack("<HH", handler, 0))   # IVT[3] = 0000:handler
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = 0, 3
    vcpu.set_sregs(sregs)
    ex = run_guarded(vcpu)
    if ON_PVM:
        assert ex == IoExit(is_write=True, port=DEBUG_PORT, size=1, count=1, data=b"3")
    else:
        assert isinstance(ex, ShutdownExit)


def test_hypercall_exit_never_happens(vm: Vm) -> None:
    # Documentation: with KVM_CAP_EXIT_HYPERCALL enabled for KVM_HC_MAP_GPA_RANGE, the
    # guest's hypercall exits to userspace as KVM_EXIT_HYPERCALL. On PVM the guest's
    # VMMCALL/VMCALL is retried forever at the same RIP (no exit, `hypercalls` stays 0),
    # until the vCPU is kicked.
    vm.enable_cap("KVM_CAP_EXIT_HYPERCALL", (1 << KVM_HC_MAP_GPA_RANGE,))
    code = bytes([
        0xB8, KVM_HC_MAP_GPA_RANGE, 0, 0, 0,   # mov eax, KVM_HC_MAP_GPA_RANGE
        0xBB, 0x00, 0x10, 0x00, 0x00,          # mov ebx, 0x1000    (gpa)
        0xB9, 0x01, 0x00, 0x00, 0x00,          # mov ecx, 1         (pages)
        0x31, 0xD2,                            # xor edx, edx       (attributes)
        0x0F, 0x01, 0xD9,                      # vmmcall
        0xF4,                                  # hlt
    ])
    vcpu = boot_long_mode(vm, code)
    ex = run_guarded(vcpu, timeout=0.2)
    if ON_PVM:
        assert ex == IntrExit()
        assert vcpu.get_regs().rip == CODE_ADDR + code.index(bytes([0x0F, 0x01, 0xD9]))
        assert vcpu.stats().read()["hypercalls"] == 0
    else:
        assert isinstance(ex, HypercallExit)
        assert ex.nr == KVM_HC_MAP_GPA_RANGE


def test_supported_cpuid_understates_what_the_guest_sees(kvm: Kvm, vm: Vm) -> None:
    # Documentation: KVM_GET_SUPPORTED_CPUID lists the features KVM can expose, and the
    # guest sees what KVM_SET_CPUID2 set. On PVM the supported leaf 1 lacks SSE3, SSSE3,
    # SSE4.2, AVX... yet after KVM_SET_CPUID2 both KVM_GET_CPUID2 and the guest's own CPUID
    # report them (the host's features).
    supported = kvm.get_supported_cpuid()
    leaf1 = next(e for e in supported if e.function == 1)
    vcpu = boot_long_mode(vm, bytes([
        0xB8, 0x01, 0x00, 0x00, 0x00,   # mov eax, 1
        0x31, 0xC9,                     # xor ecx, ecx
        0x0F, 0xA2,                     # cpuid
        0xF4,                           # hlt
    ]))
    vcpu.set_cpuid(supported)
    table = next(e for e in vcpu.get_cpuid() if e.function == 1)
    assert isinstance(run_guarded(vcpu), HltExit)
    seen_ecx = vcpu.get_regs().rcx
    assert seen_ecx == table.ecx
    if ON_PVM:
        assert not leaf1.ecx & SSE3
        assert seen_ecx & (SSE3 | SSSE3 | SSE4_2) == SSE3 | SSSE3 | SSE4_2
    else:
        assert seen_ecx & SSE3 == leaf1.ecx & SSE3


def test_set_cpuid_drops_empty_amx_leaves(kvm: Kvm, vm: Vm) -> None:
    # Documentation: KVM_GET_CPUID2 returns the table KVM_SET_CPUID2 set. On this kernel
    # (6.18) the all-zero AMX leaves 0x1D and 0x1E that KVM_GET_SUPPORTED_CPUID offers are
    # gone from the table afterwards, and nothing else is. A guest reading them sees zeros
    # either way, so a saved CPUID restores to the same guest-visible CPUID.
    supported = kvm.get_supported_cpuid()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(supported)
    kept = {(e.function, e.index) for e in vcpu.get_cpuid()}
    dropped = [e for e in supported if (e.function, e.index) not in kept]
    for e in dropped:
        assert e.function in (0x1D, 0x1E)
        assert (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0)
    # Setting the table read back is a fixed point.
    again = vcpu.get_cpuid()
    vcpu.set_cpuid(again)
    assert {(e.function, e.index) for e in vcpu.get_cpuid()} == kept


def test_run_without_any_memory(vm: Vm) -> None:
    # Not covered by the documentation: with no memory slot at all, KVM_RUN fails with
    # ENOSPC on PVM (with one slot, anywhere, the same vCPU gets an emulation failure at
    # the unbacked reset vector instead; see test_kvm_run.py).
    vcpu = vm.create_vcpu(0)
    if ON_PVM:
        with pytest.raises(KvmError) as exc:
            vcpu.run()
        assert exc.value.errno == errno.ENOSPC
    else:
        try:
            run_guarded(vcpu)
        except KvmError:
            pass
