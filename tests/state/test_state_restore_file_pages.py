"""A snapshot whose memory or zero records lie over the pages of a file mapped into the VM
is corrupt (INVALID_ARGUMENT): a file travels by reference, so no writer puts its pages in
a snapshot, and a refused restore must not have written into (or punched) the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from state_support import NodeFactory, rewrite

from kvmd_proto import vmm_pb2 as pb

P = 4096


def over_the_file(memory: bool) -> Callable[[pb.SnapshotRecord], None]:
    """Move the snapshot's memory record onto slot 1 (all of it rw.img), as data or as a
    zero record."""
    def edit(r: pb.SnapshotRecord) -> None:
        if r.HasField("memory"):
            if memory:
                r.memory.CopyFrom(pb.MemoryData(slot=1, offset=P, data=b"\x99" * P))
            else:
                r.ClearField("memory")
                r.zero.CopyFrom(pb.MemoryZero(slot=1, offset=0, length=8 * P))
    return edit


@pytest.mark.parametrize("memory", [True, False], ids=["data", "zero"])
def test_records_over_a_mapped_file_are_corrupt_and_leave_it_intact(
        node_factory: NodeFactory, tmp_path: Path, memory: bool) -> None:
    images = tmp_path / "images"
    images.mkdir(mode=0o750)
    (images / "rw.img").write_bytes(b"\x11" * (8 * P))
    node = node_factory(images_dir=str(images))
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id="src"))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="src", guest_addr=0, size=16 * P))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="src", guest_addr=16 * P, size=8 * P, file=pb.MemoryFile(name="rw.img")))
    node.write("src", 0, b"\x22" * P)
    data, _ = node.snapshot("src")
    s.vms.DeleteVm(pb.DeleteVmRequest(vm_id="src"))
    with pytest.raises(grpc.RpcError) as err:
        node.restore("dst", rewrite(data, over_the_file(memory)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "lies over memory file 'rw.img'" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert (images / "rw.img").read_bytes() == b"\x11" * (8 * P)
    assert node.vm_ids() == []
    assert node.restore("dst", data).vm_id == "dst"
