"""Guest memory travels sparse: pages never touched and zero pages are not in a snapshot."""

from __future__ import annotations

import os

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
