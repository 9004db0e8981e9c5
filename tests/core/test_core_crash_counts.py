"""VM crashes are counted per kind of reason (HostShared.count_crash): the label of the
kvmd_vm_crashes metric is the reason's first word, so addresses and details in a crash
reason never become labels of their own."""

from __future__ import annotations

from guests import boot
from polling import wait_until

from kvmd.core.host import Host
from kvmd.core.vm import VmOptions

UNCLAIMED_OUT = bytes([
    0xBA, 0x34, 0x12,  # mov dx, 0x1234 (no device there)
    0xEE,              # out dx, al: a strict-IO VM crashes here
    0xF4,              # hlt (not reached)
])


def test_a_crash_is_counted_under_its_reasons_first_word(host: Host) -> None:
    """A strict-IO guest writing to an unclaimed port crashes with the reason "unclaimed
    port write at 0x1234": counted once under "unclaimed", the whole reason kept on the
    VM."""
    vm = host.create_vm("strict", {}, VmOptions(strict_io=True))
    boot(vm, UNCLAIMED_OUT)
    vm.start()
    wait_until(lambda: vm.state == "crashed", 10, "the VM to crash")
    assert vm.reason == "unclaimed port write at 0x1234"
    assert host.crashes == {"unclaimed": 1}


def test_crash_kinds_end_at_a_colon_or_a_space(host: Host) -> None:
    """The kind is the reason up to its first colon, then up to its first space; an empty
    reason is "unknown"."""
    for reason in ("shutdown: triple fault", "internal_error: emulation", "unhandled exit HLT",
                   "unclaimed MMIO read at 0xd0000000", "unclaimed port write at 0x80", ""):
        host.shared.count_crash(reason)
    assert host.crashes == {"shutdown": 1, "internal_error": 1, "unhandled": 1,
                            "unclaimed": 2, "unknown": 1}
