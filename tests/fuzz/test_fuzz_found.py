"""What the fuzzing work found in the daemon, each pinned by a test (see the commits that
fixed them, or the xfail reason where the fix is not small)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from fuzz_support import CALL_TIMEOUT, FuzzDaemon
from polling import wait_until

from kvmd.api.gen import vmm_pb2 as pb

MESSAGE_LIMIT = 16 << 10
UART, DEBUG_EXIT = 0x3F8, 0x501


@pytest.fixture
def small_messages() -> Iterator[FuzzDaemon]:
    """A daemon whose messages are at most 16 KiB (every limit flag may be set that low)."""
    fz = FuzzDaemon.start(max_message_bytes=MESSAGE_LIMIT)
    try:
        yield fz
        fz.delete_all()
    finally:
        fz.stop()


def print_memory(length: int) -> bytes:
    """Real mode: `rep outsb` of guest memory [0, length) to COM1, then debug-exit 0."""
    return b"".join([
        bytes([0x31, 0xF6]),                                # xor si, si
        bytes([0xB9]) + struct.pack("<H", length),          # mov cx, length
        bytes([0xBA]) + struct.pack("<H", UART),            # mov dx, 0x3f8
        bytes([0xF3, 0x6E]),                                # rep outsb
        bytes([0xBA]) + struct.pack("<H", DEBUG_EXIT),      # mov dx, 0x501
        bytes([0xB0, 0x00, 0xEE]),                          # mov al, 0; out dx, al
    ])


def test_console_backlog_larger_than_a_message_is_streamed_in_chunks(
        small_messages: FuzzDaemon) -> None:
    """StreamConsole sent the whole backlog as one message: once a guest printed more than
    max_message_bytes (a VM's console_buffer_bytes may be up to 4 GiB, the default message
    limit is 16 MiB), its backlog could never be read again: RESOURCE_EXHAUSTED "Sent
    message larger than max", without kvmd's error details. Large payloads go in chunks."""
    fz = small_messages
    length = MESSAGE_LIMIT + 4096
    fz.vms.CreateVm(pb.CreateVmRequest(vm_id="chatty", options=pb.VmOptions(
        console_buffer_bytes=4 * MESSAGE_LIMIT)), timeout=CALL_TIMEOUT)
    fz.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="chatty", guest_addr=0,
                                                        size=0x10000), timeout=CALL_TIMEOUT)
    fz.write("chatty", 0x1000, print_memory(length))
    fz.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id="chatty", vcpu_id=0),
                        timeout=CALL_TIMEOUT)
    fz.real_mode("chatty", 0, 0x1000)
    expected = b"".join(c.data for c in fz.memory.ReadGuestMemory(
        pb.ReadGuestMemoryRequest(vm_id="chatty", guest_addr=0, length=length),
        timeout=CALL_TIMEOUT))
    fz.vms.StartVm(pb.VmRef(vm_id="chatty"), timeout=CALL_TIMEOUT)
    vm = wait_until(lambda: (v := fz.vms.GetVm(pb.GetVmRequest(vm_id="chatty"),
                                               timeout=CALL_TIMEOUT)).state != "running"
                    and v, 60, "the guest to print and exit")
    assert vm.reason == "debug_exit", vm

    chunks = list(fz.vms.StreamConsole(pb.StreamConsoleRequest(
        vm_id="chatty", backlog=True, no_follow=True), timeout=CALL_TIMEOUT))
    assert b"".join(c.data for c in chunks) == expected
    assert all(c.ByteSize() <= MESSAGE_LIMIT for c in chunks)
    fz.assert_healthy()
