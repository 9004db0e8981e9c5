"""VM-wide ioctls: capabilities on the VM fd, KVM_ENABLE_CAP, devices, clock, TSS and
identity-map addresses, use from another thread, and EBADF once closed."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from guests import boot_real_mode, open_kvm_fds, out_bytes_program, run_guarded

from kvmd.kvm import (
    Datamatch,
    Device,
    EventFd,
    IoEventAddress,
    IoExit,
    Kvm,
    KvmError,
    MsiRoute,
    Vm,
)
from kvmd.kvm._ffi import lib

KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2


def _errno_of(call: object, *args: object) -> int | None:
    with pytest.raises(KvmError) as exc:
        call(*args)  # type: ignore[operator]
    return exc.value.errno


def test_check_vm_capability(kvm: Kvm, vm: Vm) -> None:
    assert vm.check_extension("KVM_CAP_USER_MEMORY") > 0
    assert vm.check_extension("KVM_CAP_IRQFD") > 0
    assert vm.check_extension(0x7FFF_FFFF) == 0
    # Answered per VM where it matters; the slot count is what the Vm enforces.
    assert vm.max_memory_slots == vm.check_extension("KVM_CAP_NR_MEMSLOTS") > 0
    assert kvm.check_extension("KVM_CAP_CHECK_EXTENSION_VM") > 0


def test_send_vm(vm: Vm) -> None:
    # A Vm built in one thread is used from another (crosvm's send_vm).
    result: list[object] = []

    def other() -> None:
        vcpu = boot_real_mode(vm, out_bytes_program(b"t"))
        result.append(run_guarded(vcpu))

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert result == [IoExit(is_write=True, port=0xE9, size=1, count=1, data=b"t")]


def test_two_vms_are_independent(kvm: Kvm) -> None:
    with kvm.create_vm() as a, kvm.create_vm() as b:
        a.add_memory_region(0, 0x1000)
        b.add_memory_region(0, 0x1000)
        a.write(0, b"a")
        b.write(0, b"b")
        assert (a.read(0, 1), b.read(0, 1)) == (b"a", b"b")
        # The kernel's stats id names the process ("kvm-<pid>"), not the VM: both VMs
        # share it, so whoever exports these must label them by VM itself.
        assert a.stats().id == b.stats().id == f"kvm-{os.getpid()}"


def test_enable_cap(vm: Vm) -> None:
    # X86_DISABLE_EXITS may only be enabled before the first vCPU exists.
    assert vm.check_extension("KVM_CAP_X86_DISABLE_EXITS") & KVM_X86_DISABLE_EXITS_PAUSE
    vm.enable_cap("KVM_CAP_X86_DISABLE_EXITS", (KVM_X86_DISABLE_EXITS_PAUSE,))
    vm.create_vcpu(0)
    assert _errno_of(vm.enable_cap, "KVM_CAP_X86_DISABLE_EXITS",
                     (KVM_X86_DISABLE_EXITS_PAUSE,)) == errno.EINVAL


def test_enable_cap_refused(vm: Vm) -> None:
    assert _errno_of(vm.enable_cap, 0x7FFF_FFFF) == errno.EINVAL
    assert _errno_of(vm.enable_cap, "KVM_CAP_NO_SUCH") == errno.EINVAL
    assert _errno_of(vm.enable_cap, "KVM_CAP_HLT", (1, 2, 3, 4, 5)) == errno.EINVAL
    assert _errno_of(vm.enable_cap, "KVM_CAP_HLT", (1 << 64,)) == errno.EINVAL


def test_create_device(vm: Vm) -> None:
    # VFIO may be missing from a kernel (ENODEV); either way the answer is clean.
    try:
        assert vm.create_device(lib.KVM_DEV_TYPE_VFIO, test_only=True) is None
    except KvmError as exc:
        assert exc.errno == errno.ENODEV
        return
    dev = vm.create_device(lib.KVM_DEV_TYPE_VFIO)
    assert isinstance(dev, Device)
    assert dev.type == lib.KVM_DEV_TYPE_VFIO
    assert os.readlink(f"/proc/self/fd/{dev.fileno()}") == "anon_inode:kvm-vfio"
    vm.close()   # the Vm owns the device fd
    with pytest.raises(OSError):
        os.fstat(dev.fd)


def test_create_device_unknown_type(vm: Vm) -> None:
    assert _errno_of(vm.create_device, 9999, True) == errno.ENODEV
    assert _errno_of(vm.create_device, 9999) == errno.ENODEV


def test_clock(vm: Vm) -> None:
    assert vm.get_clock().clock >= 0
    vm.set_clock(10**12)
    now = vm.get_clock().clock
    assert 10**12 <= now < 10**12 + 60 * 10**9


def test_set_tss_address(vm: Vm) -> None:
    vm.set_tss_address(0xFFFB_D000)


def test_set_identity_map_address(vm: Vm) -> None:
    vm.set_identity_map_address(0xFFFB_C000)
    vm.create_vcpu(0)
    # Only before the first vCPU.
    assert _errno_of(vm.set_identity_map_address, 0xFFFB_C000) == errno.EINVAL


def test_closed_vm_gives_ebadf(vm: Vm) -> None:
    ev = EventFd()
    try:
        vm.close()
        vm.close()   # idempotent
        assert vm.closed
        calls = [
            (vm.check_extension, ("KVM_CAP_IRQFD",)),
            (vm.enable_cap, ("KVM_CAP_HLT",)),
            (vm.create_vcpu, (0,)),
            (vm.create_irq_chip, ()),
            (vm.create_pit2, ()),
            (vm.set_irq_line, (4, True)),
            (vm.register_irqfd, (4, ev)),
            (vm.unregister_irqfd, (4, ev)),
            (vm.set_gsi_routing, ([MsiRoute(1, 0xFEE00000, 0x30)],)),
            (vm.signal_msi, (0xFEE00000, 0x30)),
            (vm.register_ioevent, (ev, IoEventAddress.pio(0xF4), Datamatch.u8(1))),
            (vm.create_device, (lib.KVM_DEV_TYPE_VFIO,)),
            (vm.stats, ()),
            (vm.get_clock, ()),
            (vm.set_clock, (0,)),
            (vm.set_tss_address, (0xFFFBD000,)),
        ]
        for call, args in calls:
            assert _errno_of(call, *args) == errno.EBADF, call
    finally:
        ev.close()


def test_vm_context_manager_releases_everything(kvm: Kvm) -> None:
    before = open_kvm_fds()
    with kvm.create_vm() as vm:
        vm.create_irq_chip()
        vm.add_memory_region(0, 0x10000)
        vm.add_memory_region(0x100000, 0x10000, log_dirty=True)
        vcpu = vm.create_vcpu(0)
        vcpu.stats()
        vm.stats()
        vm.create_device(lib.KVM_DEV_TYPE_VFIO)
    assert vm.closed and vcpu.closed
    assert vm.vcpus() == []   # closed with the VM, no longer listed
    assert open_kvm_fds() == before
