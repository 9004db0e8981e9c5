"""Guest memory travels sparse (untouched and zero pages are not in a snapshot); a restored
guest learns that its clock stopped."""

from __future__ import annotations

import os
import time

from polling import wait_until
from state_support import Node

from kvmd_proto import vmm_pb2 as pb

MiB, GiB = 1 << 20, 1 << 30


def test_a_4_gib_guest_that_touched_10_mib_snapshots_in_about_10_mib(node: Node) -> None:
    """The issue's example: 4 GiB of guest memory, 10 MiB of it written (random bytes, so
    nothing is skipped as zeros), 1 MiB written with zeros (touched, but zero pages): the
    snapshot carries the 10 MiB and little more, and restores the same bytes."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="big"))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="big", guest_addr=0,
                                                       size=4 * GiB))
    data = os.urandom(10 * MiB)
    node.write("big", 1 * GiB, data[:6 * MiB])  # two runs, far apart
    node.write("big", 3 * GiB + 4096, data[6 * MiB:])
    node.write("big", 2 * GiB, bytes(MiB))  # touched with zeros: not carried either
    snapshot, info = node.snapshot("big")
    assert info.memory_pages == 10 * MiB // 4096, info.memory_pages
    assert 10 * MiB <= len(snapshot) < 10 * MiB + 64 * 1024, len(snapshot)
    node.restore("copy", snapshot)
    assert node.read("copy", 1 * GiB, 6 * MiB) == data[:6 * MiB]
    assert node.read("copy", 3 * GiB + 4096, 4 * MiB) == data[6 * MiB:]
    assert node.read("copy", 2 * GiB, MiB) == bytes(MiB)
    for vm_id in ("big", "copy"):
        s.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))


WATCHDOG_SOURCE = r"""
    .code16
    xor %ax, %ax
    mov %ax, %ds
spin:
    mov 0x501d, %al             # the kvmclock page's flags (0x5000 + 29)
    test $2, %al                # PVCLOCK_GUEST_STOPPED
    jz spin
    incb 0x6000                 # seen: count it, clear it, as a watchdog does
    andb $0xfd, 0x501d
    jmp spin
"""


def test_a_restored_guest_is_told_its_clock_stopped(node: Node) -> None:
    """Saved paused, resumed elsewhere: KVM_KVMCLOCK_CTRL before its first entry, so a
    guest with kvmclock knows time jumped (its soft-lockup watchdog would fire otherwise)."""
    node.boot("clk", WATCHDOG_SOURCE)
    ref = pb.VcpuRef(vm_id="clk", vcpu_id=0)
    node.stubs.vcpus.SetMsrs(pb.SetMsrsRequest(vcpu=ref, msrs=[
        pb.Msr(index=0x4B564D01, value=0x5000 | 1)]))  # MSR_KVM_SYSTEM_TIME_NEW: enabled
    node.start("clk")
    time.sleep(0.2)  # running, never paused: nothing seen
    data, _ = node.snapshot("clk")  # taken paused, before the source's own resume
    node.restore("clk2", data)
    assert node.read("clk2", 0x6000, 1) == b"\x00"
    node.stubs.vms.ResumeVm(pb.VmRef(vm_id="clk2"))
    wait_until(lambda: node.read("clk2", 0x6000, 1) == b"\x01", 10, "the guest to be told")
    for vm_id in ("clk", "clk2"):
        node.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))
