"""Restores that must be refused: each gets its exact status code, and nothing is left
behind (no VM, the id free again, no memory charged, no file descriptor or mapping)."""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import pytest
from state_guests import COUNTER_SOURCE
from state_support import Node, NodeFactory, rewrite

from kvmd.state.format import varint
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def resources() -> tuple[int, int]:
    """This process's open fds, and its guest memory and vCPU mappings (the daemon under
    test is in process; other mappings come and go with pool threads)."""
    with open("/proc/self/maps") as fh:
        maps = sum(1 for line in fh if "memfd:kvmd" in line or "kvm-vcpu" in line)
    return len(os.listdir("/proc/self/fd")), maps


@pytest.fixture
def snapshot(node: Node) -> bytes:
    node.boot("src", COUNTER_SOURCE, irqchip=True)
    node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="src", guest_addr=1 << 20, size=4 << 20, log_dirty=True))
    node.write("src", 1 << 20, b"\x77" * (2 << 20))
    node.start("src")
    node.wait_u32("src", 0x2000, 5)
    data, _ = node.snapshot("src")
    return data


def assert_refused(node: Node, data: bytes, code: grpc.StatusCode, words: str = "",
                   vm_id: str = "new") -> None:
    info = node.stubs.hypervisor.GetInfo(pb.GetInfoRequest())
    before = resources()
    with pytest.raises(grpc.RpcError) as err:
        node.restore(vm_id, data, chunk=64 << 10)
    assert err.value.code() == code, err.value.details()  # type: ignore[attr-defined]
    assert words in (err.value.details() or "")  # type: ignore[attr-defined]
    assert node.healthy()
    assert node.vm_ids() == ["src"]
    after = node.stubs.hypervisor.GetInfo(pb.GetInfoRequest())
    assert after.memory_in_use_bytes == info.memory_in_use_bytes
    assert resources() == before


def test_truncated_anywhere(node: Node, snapshot: bytes) -> None:
    for cut in (0, 1, 10, 200, len(snapshot) // 2, len(snapshot) - 40, len(snapshot) - 1):
        assert_refused(node, snapshot[:cut], INVALID)


def test_bit_flipped_anywhere(node: Node, snapshot: bytes) -> None:
    for pos in (0, 3, 100, 700, len(snapshot) // 3, len(snapshot) // 2,
                len(snapshot) - 50, len(snapshot) - 5):
        bad = bytearray(snapshot)
        bad[pos] ^= 0x10
        assert_refused(node, bytes(bad), INVALID)
    # The id was never taken: the intact snapshot restores under it.
    assert node.restore("new", snapshot).vm_id == "new"


def test_garbage_and_foreign_input(node: Node, snapshot: bytes) -> None:
    assert_refused(node, os.urandom(4096), INVALID)
    assert_refused(node, b"\x00" * 100, INVALID)
    assert_refused(node, varint(1 << 40) + b"x", INVALID, "record")  # refused unbuffered

    def bad_magic(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            r.header.magic = "qemu-vmstate"
    assert_refused(node, rewrite(snapshot, bad_magic), INVALID, "magic")


def test_newer_format_version(node: Node, snapshot: bytes) -> None:
    def newer(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            r.header.format_version = 2
            r.header.kvmd_version = "9.9.9"
    assert_refused(node, rewrite(snapshot, newer), PRECONDITION, "format version 2")


def test_incompatible_host(node: Node, snapshot: bytes) -> None:
    def bigger_xsave(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            r.header.host.xsave_size = 1 << 16
    assert_refused(node, rewrite(snapshot, bigger_xsave), PRECONDITION, "incompatible host")


def test_contents_that_cannot_be_right(node: Node, snapshot: bytes) -> None:
    def outside(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory"):
            r.memory.offset = 64 << 20
    assert_refused(node, rewrite(snapshot, outside), INVALID, "slot")

    def short_lapic(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            r.vm.vcpus[0].lapic = b"\x00" * 100
    assert_refused(node, rewrite(snapshot, short_lapic), INVALID, "LAPIC")

    def no_vm(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            r.ClearField("vm")
            r.zero.CopyFrom(pb.MemoryZero(slot=0, offset=0, length=4096))
    assert_refused(node, rewrite(snapshot, no_vm), INVALID)


def test_memory_past_its_slot_or_not_whole_pages(node: Node, snapshot: bytes) -> None:
    """Each memory record must lie in whole pages of its slot: a record that starts inside
    slot 1 (4 MiB) and runs past its end, or with an unaligned offset or length, is
    refused, whatever its checksum."""
    def past_the_end(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory") and r.memory.slot == 1:
            r.memory.offset = (4 << 20) - 4096  # its 1 MiB of data run 1 MiB - 4 KiB past
    assert_refused(node, rewrite(snapshot, past_the_end), INVALID, "whole pages of slot 1")

    def unaligned_offset(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory") and r.memory.slot == 1:
            r.memory.offset += 1
    assert_refused(node, rewrite(snapshot, unaligned_offset), INVALID, "whole pages")

    def unaligned_length(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory") and r.memory.slot == 1:
            r.memory.data = r.memory.data[:100]
    assert_refused(node, rewrite(snapshot, unaligned_length), INVALID, "whole pages")

    def unaligned_zero(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory") and r.memory.slot == 1:
            r.ClearField("memory")
            r.zero.CopyFrom(pb.MemoryZero(slot=1, offset=0, length=100))
    assert_refused(node, rewrite(snapshot, unaligned_zero), INVALID, "whole pages")


def _second_vm_record(edit: Callable[[pb.SnapshotRecord], None]
                      ) -> Callable[[pb.SnapshotRecord], None]:
    """`edit` applied to the records of the second snapshot of a stream only (a diff)."""
    seen = {"headers": 0}

    def apply(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            seen["headers"] += 1
        if seen["headers"] == 2:
            edit(r)
    return apply


def test_a_diff_must_keep_its_base_layout(node: Node, snapshot: bytes) -> None:
    """A diff whose state has other memory slots than its base is refused: the VM built
    from the base would not be the one the diff describes."""
    diff, _ = node.snapshot("src", diff=True)

    def bigger_slot(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            r.vm.slots[-1].size *= 2
    assert_refused(node, rewrite(snapshot + diff, _second_vm_record(bigger_slot)),
                   PRECONDITION, "other memory slots")


def test_a_stream_may_not_end_on_a_memory_only_round(node: Node, snapshot: bytes) -> None:
    """A memory-only round (of a pre-copy) carries no vCPU or device state: a stream that
    ends on one would give the VM newer memory with older registers."""
    diff, _ = node.snapshot("src", diff=True)

    def memory_only(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            r.header.memory_only = True
    assert_refused(node, rewrite(snapshot + diff, _second_vm_record(memory_only)),
                   INVALID, "memory-only")
    # the same diff, as the state it is, restores
    assert node.restore("new", snapshot + diff).vm_id == "new"


def test_existing_id_and_bad_ids(node: Node, snapshot: bytes) -> None:
    assert_refused(node, snapshot, grpc.StatusCode.ALREADY_EXISTS, vm_id="src")
    assert_refused(node, snapshot, INVALID, vm_id="../etc")
    assert_refused(node, snapshot, INVALID, vm_id="")


def test_over_the_target_limits(node_factory: NodeFactory, node: Node,
                                snapshot: bytes) -> None:
    small = node_factory(max_memory_per_vm_bytes=1 << 20)
    small.boot("src", COUNTER_SOURCE)  # so assert_refused's "only src" holds there too
    assert_refused(small, snapshot, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory")
    few = node_factory(max_vcpus_per_vm=1)
    few.boot("src", COUNTER_SOURCE)

    def two_vcpus(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            extra = r.vm.vcpus.add()
            extra.CopyFrom(r.vm.vcpus[0])
            extra.vcpu_id = 1
    assert_refused(few, rewrite(snapshot, two_vcpus), grpc.StatusCode.RESOURCE_EXHAUSTED,
                   "vcpus")


def test_malformed_requests(node: Node, snapshot: bytes) -> None:
    restore = node.stubs.snapshots.RestoreVm
    cases = [
        [],                                                           # nothing at all
        [pb.RestoreVmRequest(data=snapshot)],                         # no options first
        [pb.RestoreVmRequest(options=pb.RestoreVmOptions(vm_id="a")),
         pb.RestoreVmRequest(options=pb.RestoreVmOptions(vm_id="b"))],  # options twice
    ]
    for requests in cases:
        with pytest.raises(grpc.RpcError) as err:
            restore(iter(requests))
        assert err.value.code() == INVALID  # type: ignore[attr-defined]
    assert node.vm_ids() == ["src"] and node.healthy()
