"""Helpers to boot hand-assembled real-mode guests on a ManagedVm."""

from __future__ import annotations

from guests import CODE_ADDR, GUEST_MEM_SIZE, real_mode_sregs

from kvmd.core.vm import ManagedVm
from kvmd.kvm import Regs

DEBUG_EXIT = 0x501


def boot(vm: ManagedVm, code: bytes, vcpus: int = 1) -> None:
    """Memory at 0, the program at CODE_ADDR, vCPUs in real mode at its entry."""
    vm.add_memory_region(0, GUEST_MEM_SIZE, False, False)
    vm.write_memory(CODE_ADDR, code)
    for i in range(vcpus):
        v = vm.create_vcpu(i)
        v.set_sregs(real_mode_sregs(v.get_sregs()))
        v.set_regs(Regs(rip=CODE_ADDR, rflags=2, rsp=0x8000))


def debug_exit_program(code: int) -> bytes:
    return bytes([
        0xBA, DEBUG_EXIT & 0xFF, DEBUG_EXIT >> 8,  # mov dx, 0x501
        0xB0, code,                                # mov al, code
        0xEE,                                      # out dx, al
        0xF4,                                      # hlt (not reached)
    ])


SPIN = bytes([
    0x40,        # inc ax
    0xEB, 0xFD,  # jmp back to inc ax
])
