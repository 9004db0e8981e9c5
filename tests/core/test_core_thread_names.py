"""The names the daemon's threads show the kernel (top -H, ps -L, /proc/PID/task/TID/comm):
a vCPU thread says which VM and vCPU it runs, within the kernel's 15 bytes."""

from __future__ import annotations

import os

from core_guests import SPIN
from guests import boot
from polling import wait_until

from kvmd.core.host import Host
from kvmd.core.vcpu import native_name
from kvmd.core.vm import VmOptions


def kernel_names() -> set[str]:
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.add(f.read().strip())
        except OSError:  # ended meanwhile
            continue
    return names


def test_a_running_vcpu_thread_is_named_after_its_vm_and_number(host: Host) -> None:
    vm = host.create_vm("named", {}, VmOptions())
    boot(vm, SPIN)
    vm.vcpu(0).start()
    try:
        wait_until(lambda: "named/0" in kernel_names(), 10, "the vCPU thread's name")
    finally:
        vm.stop()


def test_a_long_vm_id_is_cut_so_the_vcpu_number_stays() -> None:
    assert native_name("vm", 3) == "vm/3"
    assert native_name("a-very-long-vm-identifier", 12) == "a-very-long-/12"
    assert len(native_name("x" * 40, 255).encode()) == 15
    # a multi-byte character cut in half is dropped, not left as a broken byte
    assert native_name("é" * 10, 1) == "é" * 6 + "/1"
