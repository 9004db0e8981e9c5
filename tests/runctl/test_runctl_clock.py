"""A guest with kvmclock learns that the host paused it (KVM_KVMCLOCK_CTRL on resume)."""

from __future__ import annotations

import struct
import time

from runctl_api import Api

from kvmd_proto import vmm_pb2 as pb

MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK_ADDR = 0x5000
PVCLOCK_FLAGS = PVCLOCK_ADDR + 29  # `flags` in struct pvclock_vcpu_time_info
PVCLOCK_GUEST_STOPPED = 1 << 1
MARK = 0x6000  # the guest counts here each time it sees the flag


def watchdog_program() -> bytes:
    """Spin reading the kvmclock flags; on PVCLOCK_GUEST_STOPPED count at MARK and clear
    the bit, as a guest's soft-lockup watchdog does."""
    flags, mark = struct.pack("<H", PVCLOCK_FLAGS), struct.pack("<H", MARK)
    return (b"\x31\xc0\x8e\xd8"                       # xor ax, ax; mov ds, ax
            + b"\xa0" + flags                         # loop: mov al, [flags]
            + b"\xa8" + bytes([PVCLOCK_GUEST_STOPPED])  # test al, STOPPED
            + b"\x74\xf9"                             # jz loop
            + b"\xfe\x06" + mark                      # inc byte [MARK]
            + b"\x80\x26" + flags + bytes([~PVCLOCK_GUEST_STOPPED & 0xFF])  # and [flags], ~
            + b"\xeb\xee")                            # jmp loop


def test_a_paused_guest_is_told_its_clock_stopped(api: Api) -> None:
    api.boot("clock", watchdog_program())
    ref = pb.VcpuRef(vm_id="clock", vcpu_id=0)
    api.vcpus.SetMsrs(pb.SetMsrsRequest(vcpu=ref, msrs=[
        pb.Msr(index=MSR_KVM_SYSTEM_TIME_NEW, value=PVCLOCK_ADDR | 1)]))
    api.start("clock")
    time.sleep(0.3)  # running, never paused: KVM never sets the flag
    assert api.read("clock", MARK, 1) == b"\x00"
    for n in (1, 2):
        api.pause("clock")
        api.vms.ResumeVm(pb.VmRef(vm_id="clock"))
        deadline = time.monotonic() + 10
        while api.read("clock", MARK, 1)[0] < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.read("clock", MARK, 1)[0] == n  # told once per pause
