"""The kernel's binary statistics (KVM_GET_STATS_FD) for a VM and a vCPU.

Names are whatever the running kernel offers; these tests assert on the ones kvmd exports
(and that every descriptor decodes), then check the vCPU counters against exits a real
guest made.
"""

from __future__ import annotations

import errno
import os

import pytest
from guests import ON_PVM, boot_real_mode, mmio_write_read_program, run_guarded

from kvmd.kvm import HltExit, KvmError, StatDescriptor, Vm
from kvmd.kvm.stats import _DESC, _parse_descriptors

VM_STATS = {"remote_tlb_flush", "mmu_shadow_zapped", "mmu_cache_miss", "pages_4k",
            "pages_2m", "max_mmu_page_hash_collisions"}
VCPU_STATS = {"exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "signal_exits",
              "irq_injections", "nmi_injections", "insn_emulation", "halt_wakeup",
              "halt_wait_ns", "halt_poll_success_hist", "blocking"}
KINDS = {"cumulative", "instant", "peak", "linear_hist", "log_hist"}
UNITS = {"none", "bytes", "seconds", "cycles", "boolean"}


def _check_descriptors(descs: tuple[StatDescriptor, ...]) -> None:
    names = [d.name for d in descs]
    assert len(names) == len(set(names))
    for d in descs:
        assert d.kind in KINDS, d
        assert d.unit in UNITS, d
        assert d.base in (2, 10)
        assert d.size >= 1
        assert (d.size > 1) == d.kind.endswith("hist"), d
        assert d.offset % 8 == 0


def test_vm_stats(vm: Vm) -> None:
    stats = vm.stats()
    assert stats.id == f"kvm-{os.getpid()}"
    _check_descriptors(stats.descriptors)
    values = stats.read()
    assert set(values) == {d.name for d in stats.descriptors}
    assert set(values) >= VM_STATS
    assert all(isinstance(values[name], int) for name in VM_STATS)
    assert vm.stats() is stats   # one reader (and fd) per VM


def test_vcpu_stats(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    stats = vcpu.stats()
    assert stats.id == f"kvm-{os.getpid()}/vcpu-0"
    _check_descriptors(stats.descriptors)
    values = stats.read()
    assert set(values) >= VCPU_STATS
    assert values["exits"] == 0
    hist = values["halt_poll_success_hist"]
    assert isinstance(hist, tuple) and len(hist) == 32 and not any(hist)
    seconds = {d.name: d for d in stats.descriptors}["halt_wait_ns"]
    assert (seconds.unit, seconds.exponent) == ("seconds", -9)


def test_vcpu_stats_count_guest_exits(vm: Vm) -> None:
    # Two MMIO exits (a write and a read), then a HLT exit.
    vcpu = boot_real_mode(vm, mmio_write_read_program(0x5A))
    before = vcpu.stats().read()
    run_guarded(vcpu)
    run_guarded(vcpu)
    vcpu.complete_mmio_read(b"\x01")
    assert isinstance(run_guarded(vcpu), HltExit)
    after = vcpu.stats().read()
    delta = {k: int(after[k]) - int(before[k])  # type: ignore[call-overload]
             for k in ("exits", "mmio_exits", "halt_exits")}
    assert delta["mmio_exits"] == 2
    assert delta["halt_exits"] == 1
    assert delta["exits"] >= 3
    if ON_PVM:
        # Every instruction of this guest went through the instruction emulator.
        assert after["insn_emulation"] >= 7  # type: ignore[operator]


def test_stats_closed_with_their_owner(vm: Vm) -> None:
    vcpu = vm.create_vcpu(0)
    vm_stats, vcpu_stats = vm.stats(), vcpu.stats()
    fds = (vm_stats.fileno(), vcpu_stats.fileno())
    vm.close()
    for reader in (vm_stats, vcpu_stats):
        with pytest.raises(KvmError) as exc:
            reader.read()
        assert exc.value.errno == errno.EBADF
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_descriptor_flags_decode_kind_unit_and_base() -> None:
    # No statistic of this kernel has a power-of-two base; a synthetic descriptor block
    # checks the decoding a future one (bytes in KiB, say) would need.
    name_size = 16
    # linux/kvm.h: KVM_STATS_TYPE_PEAK (2), KVM_STATS_UNIT_BYTES (1 << 4), KVM_STATS_BASE_POW2
    # (1 << 8).
    flags = 2 | 1 << 4 | 1 << 8
    raw = _DESC.pack(flags, 10, 1, 8, 0) + b"cache_peak".ljust(name_size, b"\0")
    [desc] = _parse_descriptors(raw, _DESC.size + name_size, 1)
    assert (desc.name, desc.kind, desc.unit, desc.base, desc.exponent) == (
        "cache_peak", "peak", "bytes", 2, 10)
