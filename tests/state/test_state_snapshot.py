"""Snapshot and restore of running guests, restored in another daemon process: nothing but
the snapshot's bytes travels, and the guest carries on as if it had not been moved."""

from __future__ import annotations

import time

import grpc
from polling import wait_until
from state_guests import (
    COUNTER_ADDR,
    COUNTER_SOURCE,
    MEM_SIZE,
    PAGES,
    PAGES_BASE,
    PIT_SOURCE,
    counter_numbers,
)
from state_support import Node

from kvmd_proto import vmm_pb2 as pb


def follow_console(node: Node, vm_id: str, until: int, timeout: float = 30) -> bytes:
    """The VM's console from its backlog on, until `until` numbers were printed."""
    out = b""
    stream = node.stubs.vms.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, backlog=True),
                                          timeout=timeout)
    try:
        for msg in stream:
            out += msg.data
            if len(counter_numbers(out)) >= until:
                break
    finally:
        stream.cancel()
    return out


def test_running_counter_guest_continues_in_another_daemon_process(
        node: Node, other_process: Node) -> None:
    # The guest prints 1, 2, 3... on COM1 and copies its counter into 16 pages; it is
    # snapshotted while running, at an arbitrary moment, and keeps running here.
    node.boot("src", COUNTER_SOURCE)
    node.start("src")
    node.wait_u32("src", COUNTER_ADDR, 200)
    data, info = node.snapshot("src")
    assert node.state("src") == "running"
    assert info.memory_pages > 0 and info.size_bytes == len(data) and not info.diff

    restored = other_process.restore("dst", data)
    assert restored.state == "paused" and restored.labels == {"test": "state"}
    # The restored console backlog is the source's output up to the snapshot; the VM then
    # continues it, number after number, with none lost or repeated.
    backlog = other_process.console("dst")
    assert counter_numbers(backlog) == list(range(1, len(counter_numbers(backlog)) + 1))
    other_process.stubs.vms.ResumeVm(pb.VmRef(vm_id="dst"))
    text = follow_console(other_process, "dst", len(counter_numbers(backlog)) + 300)
    numbers = counter_numbers(text)
    assert numbers == list(range(1, len(numbers) + 1)), numbers[-20:]
    # The source printed the same sequence: both forks share the prefix up to the snapshot.
    source_numbers = counter_numbers(node.console("src"))
    shared = min(len(source_numbers), len(counter_numbers(backlog)))
    assert source_numbers[:shared] == numbers[:shared]


def test_memory_and_registers_match_after_restore(node: Node, other_process: Node) -> None:
    node.boot("src", COUNTER_SOURCE)
    node.start("src")
    node.wait_u32("src", COUNTER_ADDR, 50)
    data, _info = node.snapshot("src", leave_paused=True)
    assert node.state("src") == "paused"
    other_process.restore("dst", data)
    assert other_process.read("dst", 0, MEM_SIZE) == node.read("src", 0, MEM_SIZE)
    counter = node.u32("src", COUNTER_ADDR)
    assert all(other_process.u32("dst", PAGES_BASE + i * 0x1000) in (counter, counter - 1)
               for i in range(PAGES))
    for call in ("GetRegs", "GetSregs", "GetFpu", "GetMpState", "GetVcpuEvents"):
        ref = pb.VcpuRef(vm_id="src", vcpu_id=0)
        there = pb.VcpuRef(vm_id="dst", vcpu_id=0)
        assert getattr(other_process.stubs.vcpus, call)(there) == \
            getattr(node.stubs.vcpus, call)(ref), call
    # Both resumed, both print the same next numbers.
    for n, vm in ((node, "src"), (other_process, "dst")):
        n.stubs.vms.ResumeVm(pb.VmRef(vm_id=vm))
    a = counter_numbers(follow_console(node, "src", counter + 50))
    b = counter_numbers(follow_console(other_process, "dst", counter + 50))
    assert a[:counter + 50] == b[:counter + 50] == list(range(1, counter + 51))


def test_pit_guest_keeps_ticking_after_restore_in_another_daemon(
        node: Node, other_process: Node) -> None:
    # IRQ0 from the in-kernel PIT through the in-kernel PIC; the handler counts ticks.
    node.boot("tick", PIT_SOURCE, irqchip=True, pit=True)
    node.start("tick")
    node.wait_u32("tick", COUNTER_ADDR, 30)
    data, _ = node.snapshot("tick", leave_paused=True)
    at_snapshot = node.u32("tick", COUNTER_ADDR)
    vm = other_process.restore("tick", data, start=True)
    assert vm.state == "running"
    # The count resumes from the snapshot's value and keeps rising.
    first = other_process.u32("tick", COUNTER_ADDR)
    assert first >= at_snapshot
    other_process.wait_u32("tick", COUNTER_ADDR, first + 30)
    assert other_process.state("tick") == "running"


def test_snapshot_of_a_vm_that_is_paused_stays_paused(node: Node) -> None:
    node.boot("p", COUNTER_SOURCE)
    node.start("p")
    node.wait_u32("p", COUNTER_ADDR, 5)
    node.stubs.vms.PauseVm(pb.VmRef(vm_id="p"))
    node.snapshot("p")
    assert node.state("p") == "paused"
    # and a created (never started) VM restores as created: no vCPU thread.
    node.boot("c", COUNTER_SOURCE)
    data, _ = node.snapshot("c")
    assert node.restore("c2", data).vcpu_states[0] == "created"


def test_client_gone_mid_snapshot_leaves_the_vm_running(node: Node) -> None:
    node.boot("g", COUNTER_SOURCE, mem_size=8 << 20)
    node.write("g", 0x100000, b"\x5a" * (6 << 20))  # enough pages for several messages
    node.start("g")
    stream = node.stubs.snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id="g",
                                                                  chunk_size=64 << 10))
    assert next(stream).WhichOneof("payload") == "data"
    stream.cancel()
    wait_until(lambda: node.state("g") == "running", 10, "the VM to run again")
    before = node.u32("g", COUNTER_ADDR)
    node.wait_u32("g", COUNTER_ADDR, before)
    # and it can be snapshotted again (nothing was left held).
    _, info = node.snapshot("g")
    assert info.memory_pages >= (6 << 20) // 4096


def test_run_control_is_refused_while_a_snapshot_holds_the_vm(node: Node) -> None:
    # More data than grpc's flow-control windows and the socket buffer hold together (they
    # grow to several MiB): the snapshot cannot end before the client reads on.
    node.boot("h", COUNTER_SOURCE, mem_size=64 << 20)
    node.write("h", 0x100000, b"\x5a" * (48 << 20))
    node.start("h")
    stream = node.stubs.snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id="h",
                                                                  chunk_size=64 << 10))
    assert next(stream).WhichOneof("payload") == "data"  # held paused now
    try:
        for call in (node.stubs.vms.PauseVm, node.stubs.vms.ResumeVm, node.stubs.vms.StopVm):
            try:
                call(pb.VmRef(vm_id="h"))
                raise AssertionError(f"{call} was not refused")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "snapshot" in (err.details() or "")
    finally:
        for _ in stream:
            pass
    time.sleep(0.05)
    assert node.state("h") == "running"
