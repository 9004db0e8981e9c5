"""Diff snapshots: only the pages dirtied since the previous snapshot, applied on their base;
their size follows the pages dirtied, and base + diff equals a full snapshot of the same
moment."""

from __future__ import annotations

import grpc
import pytest
from state_guests import COUNTER_ADDR, COUNTER_SOURCE, MEM_SIZE
from state_support import Node

from kvmd_proto import vmm_pb2 as pb

PAGE = 4096
BIG = 16 << 20  # a second slot for host-written pages


def code_of(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()  # type: ignore[attr-defined, no-any-return]


def big_vm(node: Node, vm_id: str, log_dirty: bool = True) -> None:
    """A created VM with a 16 MiB slot at 16 MiB full of non-zero pages."""
    node.boot(vm_id, COUNTER_SOURCE)
    node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=BIG, size=BIG, log_dirty=log_dirty))
    node.write(vm_id, BIG, b"\x11" * BIG)


def test_diff_size_follows_the_pages_dirtied(node: Node) -> None:
    big_vm(node, "d")
    full, info = node.snapshot("d")
    assert info.memory_pages >= BIG // PAGE and len(full) > BIG
    for pages in (10, 100, 1000):
        for i in range(pages):
            node.write("d", BIG + i * 3 * PAGE, b"\x22" * 8)
        diff, dinfo = node.snapshot("d", diff=True)
        assert dinfo.diff and dinfo.base_snapshot_id == info.snapshot_id
        assert dinfo.memory_pages == pages
        assert pages * PAGE < len(diff) < pages * PAGE + 64 * 1024
        info = dinfo
    # Nothing dirtied: an empty diff (state only).
    empty, einfo = node.snapshot("d", diff=True)
    assert einfo.memory_pages == 0 and len(empty) < 64 * 1024


def test_base_plus_diff_equals_a_full_snapshot_of_the_same_moment(
        node: Node, other_process: Node) -> None:
    big_vm(node, "m")
    node.write("m", BIG + 7 * PAGE, b"\xff" * PAGE)
    node.start("m")
    node.wait_u32("m", COUNTER_ADDR, 20)
    base, _ = node.snapshot("m")
    node.wait_u32("m", COUNTER_ADDR, node.u32("m", COUNTER_ADDR) + 50)
    node.write("m", BIG + 7 * PAGE, bytes(PAGE))  # non-zero in the base, zero now
    node.write("m", BIG + 9 * PAGE, b"\x99" * 100)
    diff, dinfo = node.snapshot("m", diff=True, leave_paused=True)
    full, finfo = node.snapshot("m", leave_paused=True)  # the same moment: still paused
    assert len(diff) < len(full) / 10
    other_process.restore("from-diff", base + diff)
    other_process.restore("from-full", full)
    for vm_id in ("from-diff", "from-full"):
        assert other_process.read(vm_id, 0, MEM_SIZE) == node.read("m", 0, MEM_SIZE)
        assert other_process.read(vm_id, BIG, BIG) == node.read("m", BIG, BIG)
    assert other_process.read("from-diff", BIG + 7 * PAGE, PAGE) == bytes(PAGE)
    regs = [other_process.stubs.vcpus.GetRegs(pb.VcpuRef(vm_id=v)) for v in
            ("from-diff", "from-full")]
    assert regs[0] == regs[1] == node.stubs.vcpus.GetRegs(pb.VcpuRef(vm_id="m"))
    # A chain: base + diff1 + diff2.
    node.stubs.vms.ResumeVm(pb.VmRef(vm_id="m"))
    node.wait_u32("m", COUNTER_ADDR, node.u32("m", COUNTER_ADDR) + 20)
    diff2, d2 = node.snapshot("m", diff=True, leave_paused=True)
    # diff2 applies on the last snapshot taken (full), not on diff: full + diff2 works...
    assert d2.base_snapshot_id == finfo.snapshot_id != dinfo.snapshot_id
    other_process.restore("chain", full + diff2)
    assert other_process.read("chain", 0, MEM_SIZE) == node.read("m", 0, MEM_SIZE)
    # ...and base + diff + diff2 is refused: diff2's base is `full`.
    with pytest.raises(grpc.RpcError) as err:
        other_process.restore("wrong", base + diff + diff2)
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "wrong base" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert "wrong" not in other_process.vm_ids()


def test_get_dirty_log_does_not_steal_pages_from_diffs(node: Node) -> None:
    node.boot("s", COUNTER_SOURCE)
    node.snapshot("s")
    node.start("s")
    node.wait_u32("s", COUNTER_ADDR, 10)
    node.stubs.vms.PauseVm(pb.VmRef(vm_id="s"))
    # The API's view reads (and resets) the guest-dirtied pages...
    log = list(node.stubs.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id="s", slot=0)))
    assert sum(c.dirty_pages for c in log) > 16
    # ...and the diff still carries them.
    _, info = node.snapshot("s", diff=True)
    assert info.memory_pages > 16


def test_a_slot_without_dirty_logging_is_sent_whole(node: Node) -> None:
    big_vm(node, "n", log_dirty=False)
    node.snapshot("n")
    _, info = node.snapshot("n", diff=True)
    assert info.memory_pages >= BIG // PAGE


def test_diff_refusals(node: Node) -> None:
    node.boot("r", COUNTER_SOURCE)
    with pytest.raises(grpc.RpcError) as err:
        node.snapshot("r", diff=True)
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION  # no snapshot yet
    base, _ = node.snapshot("r")
    node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="r", guest_addr=BIG, size=PAGE, log_dirty=True))
    with pytest.raises(grpc.RpcError) as err:
        node.snapshot("r", diff=True)
    assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION  # slots changed
    assert "full snapshot" in (err.value.details() or "")  # type: ignore[attr-defined]
    _, _full = node.snapshot("r")
    diff, _ = node.snapshot("r", diff=True)
    # A diff alone, or on a base it does not apply on.
    for data in (diff, base + diff):
        with pytest.raises(grpc.RpcError) as err:
            node.restore("x", data)
        assert code_of(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert node.vm_ids() == ["r"]
    assert node.healthy()


def test_a_restored_vm_diffs_against_the_snapshot_it_came_from(
        node: Node, other_process: Node) -> None:
    big_vm(node, "o")
    base, info = node.snapshot("o")
    other_process.restore("o", base)
    other_process.write("o", BIG + 3 * PAGE, b"\x33" * PAGE)
    diff, dinfo = other_process.snapshot("o", diff=True)
    assert dinfo.base_snapshot_id == info.snapshot_id and dinfo.memory_pages == 1
    node.restore("o2", base + diff)
    assert node.read("o2", BIG + 3 * PAGE, PAGE) == b"\x33" * PAGE
