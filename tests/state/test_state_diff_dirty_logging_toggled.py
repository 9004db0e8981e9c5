"""Diff snapshots across SetDirtyLogging: a slot whose logging was off for a while (host
writes then go unlogged) is sent whole by the next diff, even with logging back on."""

from __future__ import annotations

from state_guests import COUNTER_SOURCE, MEM_SIZE
from state_support import Node

from kvmd_proto import vmm_pb2 as pb

PAGE = 4096


def test_a_slot_unlogged_for_a_while_is_sent_whole_by_the_next_diff(node: Node) -> None:
    """Snapshot, logging off, a host write, logging on, diff: the diff carries every page
    of the slot, and base + diff restores the write."""
    node.boot("t", COUNTER_SOURCE)
    base, info = node.snapshot("t")
    for enabled in (False, True):
        node.stubs.memory.SetDirtyLogging(pb.SetDirtyLoggingRequest(vm_id="t", slot=0,
                                                                    enabled=enabled))
        if not enabled:
            node.write("t", 9 * PAGE, b"\x5a" * 16)
    diff, dinfo = node.snapshot("t", diff=True)
    assert dinfo.base_snapshot_id == info.snapshot_id
    assert dinfo.memory_pages == MEM_SIZE // PAGE
    node.restore("t2", base + diff)
    assert node.read("t2", 9 * PAGE, 16) == b"\x5a" * 16
