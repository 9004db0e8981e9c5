"""A diff needs a base: SnapshotVm(diff) of a VM never snapshotted is refused up front
(FAILED_PRECONDITION, "take a full snapshot first"), even for a VM without memory slots,
whose (empty) layout cannot tell that no snapshot was taken."""

from __future__ import annotations

import grpc
import pytest
from state_support import Node

from kvmd_proto import vmm_pb2 as pb


@pytest.mark.parametrize("slots", [0, 1])
def test_a_diff_of_a_vm_never_snapshotted_is_refused(node: Node, slots: int) -> None:
    node.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="d"))
    if slots:
        node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id="d", guest_addr=0, size=1 << 20, log_dirty=True))
    with pytest.raises(grpc.RpcError) as err:
        node.snapshot("d", diff=True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "no snapshot to diff against" in (err.value.details() or "")  # type: ignore[attr-defined]
    _, full = node.snapshot("d")
    _, diff = node.snapshot("d", diff=True)  # with a base, it is a diff on it
    assert diff.diff and diff.base_snapshot_id == full.snapshot_id
