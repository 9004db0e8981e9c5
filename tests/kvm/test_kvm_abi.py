"""The compiled binding against the known x86_64 KVM ABI.

The cffi module takes its layouts from <linux/kvm.h> at build time; these are the kernel's
published sizes and offsets (as rust-vmm's kvm-bindings layout tests), so a header or build
mix-up shows up here rather than as a corrupted ioctl. No /dev/kvm needed.
"""

from __future__ import annotations

import pytest

from kvmd.kvm._ffi import ffi, lib

SIZES: dict[str, int] = {
    "struct kvm_run": 2352,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_irqfd": 32,
    "struct kvm_ioeventfd": 64,
    "struct kvm_regs": 144,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_msi": 32,
    "struct kvm_enable_cap": 104,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_msr_list": 4,
    "struct kvm_lapic_state": 1024,
    "struct kvm_irq_routing": 8,
    "struct kvm_mp_state": 4,
    "struct kvm_vcpu_events": 64,
    "struct kvm_create_device": 12,
    "struct kvm_pit_config": 64,
    "struct kvm_clock_data": 48,
    "struct kvm_stats_header": 24,
    "struct kvm_stats_desc": 16,
    "struct kvm_debugregs": 128,
    "struct kvm_guest_debug": 72,
}

OFFSETS: dict[str, dict[str, int]] = {
    "struct kvm_run": {"request_interrupt_window": 0, "immediate_exit": 1, "exit_reason": 8,
        "ready_for_interrupt_injection": 12, "if_flag": 13, "flags": 14, "cr8": 16,
        "apic_base": 24},
    "struct kvm_userspace_memory_region": {"slot": 0, "flags": 4, "guest_phys_addr": 8,
        "memory_size": 16, "userspace_addr": 24},
    "struct kvm_irqfd": {"fd": 0, "gsi": 4, "flags": 8, "resamplefd": 12},
    "struct kvm_ioeventfd": {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24},
    "struct kvm_regs": {"rax": 0, "r15": 120, "rip": 128, "rflags": 136},
    "struct kvm_segment": {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15,
        "unusable": 22},
    "struct kvm_dtable": {"limit": 8},
    "struct kvm_sregs": {"cs": 0, "ldt": 168, "gdt": 192, "idt": 208, "cr0": 224, "cr3": 240,
        "cr4": 248, "cr8": 256, "efer": 264, "apic_base": 272, "interrupt_bitmap": 280},
    "struct kvm_fpu": {"fcw": 128, "fsw": 130, "ftwx": 132, "last_opcode": 134, "last_ip": 136,
        "last_dp": 144, "xmm": 152, "mxcsr": 408},
    "struct kvm_msi": {"address_lo": 0, "address_hi": 4, "data": 8, "flags": 12, "devid": 16},
    "struct kvm_enable_cap": {"cap": 0, "flags": 4, "args": 8},
    "struct kvm_cpuid_entry2": {"function": 0, "index": 4, "flags": 8, "eax": 12, "edx": 24},
    "struct kvm_cpuid2": {"entries": 8},
    "struct kvm_msr_entry": {"index": 0, "data": 8},
    "struct kvm_msrs": {"entries": 8},
    "struct kvm_msr_list": {"indices": 4},
    "struct kvm_vcpu_events": {"sipi_vector": 16, "flags": 20},
    "struct kvm_create_device": {"type": 0, "fd": 4, "flags": 8},
    "struct kvm_stats_header": {"flags": 0, "name_size": 4, "num_desc": 8, "id_offset": 12,
        "desc_offset": 16, "data_offset": 20},
    "struct kvm_stats_desc": {"flags": 0, "exponent": 4, "size": 6, "offset": 8,
        "bucket_size": 12},
    "struct kvm_guest_debug": {"control": 0},
    "struct kvm_debugregs": {"dr6": 32, "dr7": 40},
}


@pytest.mark.parametrize(("ctype", "size"), sorted(SIZES.items()))
def test_kernel_struct_size(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize("ctype", sorted(OFFSETS))
def test_kernel_struct_offsets(ctype: str) -> None:
    got = {name: ffi.offsetof(ctype, name) for name in OFFSETS[ctype]}
    assert got == OFFSETS[ctype]


def test_union_bearing_structs_via_c_helpers() -> None:
    # These carry anonymous unions and are only reached through the C helpers.
    assert lib.kvmd_sizeof_dirty_log() == 16
    assert lib.kvmd_sizeof_irq_level() == 8
    # 16 bytes of header and a 32-byte union (__u32 pad[8]). Not 64: only the Xen
    # hypercall/evtchn structs have 64-byte unions.
    assert lib.kvmd_sizeof_irq_routing_entry() == 48
    # The exit union of kvm_run starts at 32 for every exit kind.
    assert lib.kvmd_offsetof_run_io() == 32
    assert lib.kvmd_offsetof_run_mmio() == 32
    assert lib.kvmd_offsetof_run_msr() == 32


def test_array_fields() -> None:
    sregs = ffi.new("struct kvm_sregs *")
    assert len(sregs.interrupt_bitmap) == 4
    fpu = ffi.new("struct kvm_fpu *")
    assert ffi.sizeof(fpu.fpr) == 8 * 16
    assert ffi.sizeof(fpu.xmm) == 16 * 16
    cap = ffi.new("struct kvm_enable_cap *")
    assert len(cap.args) == 4
    lapic = ffi.new("struct kvm_lapic_state *")
    assert ffi.sizeof(lapic.regs) == 1024


def test_flat_kvmd_structs() -> None:
    # struct kvmd_exit: reason, direction, address, size, count, value, subtype, ndata,
    # words[16], data_len, data[4096], padded to 8.
    assert ffi.offsetof("struct kvmd_exit", "address") == 8
    assert ffi.offsetof("struct kvmd_exit", "value") == 24
    assert ffi.offsetof("struct kvmd_exit", "words") == 40
    assert ffi.offsetof("struct kvmd_exit", "data_len") == 168
    assert ffi.offsetof("struct kvmd_exit", "data") == 172
    assert ffi.sizeof("struct kvmd_exit") == 4272
    # struct kvmd_vcpu_events: the fields of kvm_vcpu_events, flattened.
    assert ffi.offsetof("struct kvmd_vcpu_events", "exception_error_code") == 4
    assert ffi.offsetof("struct kvmd_vcpu_events", "sipi_vector") == 16
    assert ffi.offsetof("struct kvmd_vcpu_events", "exception_payload") == 32
    assert ffi.sizeof("struct kvmd_vcpu_events") == 40
    # struct kvmd_route: nine u32.
    assert ffi.sizeof("struct kvmd_route") == 36


def test_constants_match_the_abi() -> None:
    assert lib.KVM_API_VERSION == 12
    assert lib.KVM_MEM_LOG_DIRTY_PAGES == 1
    assert lib.KVM_MEM_READONLY == 2
    assert lib.KVM_IRQFD_FLAG_DEASSIGN == 1
    assert lib.KVM_IRQFD_FLAG_RESAMPLE == 2
    assert lib.KVM_IOEVENTFD_FLAG_DATAMATCH == 1
    assert lib.KVM_IOEVENTFD_FLAG_PIO == 2
    assert lib.KVM_IOEVENTFD_FLAG_DEASSIGN == 4
    assert lib.KVM_EXIT_IO == 2
    assert lib.KVM_EXIT_HLT == 5
    assert lib.KVM_EXIT_MMIO == 6
    assert lib.KVM_EXIT_SHUTDOWN == 8
    assert lib.KVM_EXIT_INTR == 10
    assert lib.KVM_EXIT_INTERNAL_ERROR == 17
    assert lib.KVM_EXIT_X86_RDMSR == 29
    assert lib.KVM_EXIT_MEMORY_FAULT == 39
    # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region): size 32 in bits 16..29.
    assert lib.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert lib.KVM_RUN == 0xAE80
    assert lib.KVM_CREATE_VM == 0xAE01
    assert lib.KVM_GET_REGS == 0x8090AE81
    assert lib.KVM_SET_SREGS == 0x4138AE84
    assert lib.KVM_IRQFD == 0x4020AE76
    assert lib.KVM_IOEVENTFD == 0x4040AE79
    assert lib.KVM_GET_DIRTY_LOG == 0x4010AE42
