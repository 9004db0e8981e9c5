"""Snapshots meet discard and files: a diff snapshot carries a discard (the range restores
as zeros), "pages the guest has" is one notion (a discarded range is not in a full
snapshot), and a VM with files of the images directory mapped is refused with
FAILED_PRECONDITION (files travel by reference, which the format does not carry yet)
rather than saved without them."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from state_support import Node, NodeFactory

from kvmd_proto import vmm_pb2 as pb

P = 4096
SLOT = 64 * P


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir(mode=0o750)
    (root / "disk.img").write_bytes(b"\x40" * (16 * P))
    return root


@pytest.fixture
def gnode(node_factory: NodeFactory, images: Path) -> Node:
    return node_factory(images_dir=str(images))


def vm_with_data(node: Node, vm_id: str) -> None:
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0, size=SLOT,
                                                       log_dirty=True))
    s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
    node.write(vm_id, 0, b"\x5a" * SLOT)


def discard(node: Node, vm_id: str, addr: int, size: int) -> int:
    return int(node.stubs.memory.DiscardGuestMemory(pb.DiscardGuestMemoryRequest(
        vm_id=vm_id, guest_addr=addr, size=size)).released_bytes)


def test_a_diff_snapshot_carries_a_discard(gnode: Node) -> None:
    vm_with_data(gnode, "src")
    full, _ = gnode.snapshot("src")
    assert discard(gnode, "src", 8 * P, 16 * P) == 16 * P
    diff, info = gnode.snapshot("src", diff=True)
    assert info.diff
    restored = gnode.restore("dst", full + diff)
    assert restored.vm_id == "dst"
    assert gnode.read("dst", 8 * P, 16 * P) == bytes(16 * P)
    assert gnode.read("dst", 0, 8 * P) == b"\x5a" * (8 * P)
    assert gnode.read("dst", 24 * P, 8 * P) == b"\x5a" * (8 * P)


def test_a_full_snapshot_leaves_discarded_pages_out(gnode: Node) -> None:
    vm_with_data(gnode, "whole")
    _, before = gnode.snapshot("whole")
    discard(gnode, "whole", 0, 32 * P)
    data, after = gnode.snapshot("whole")
    assert before.memory_pages - after.memory_pages == 32
    gnode.restore("back", data)
    assert gnode.read("back", 0, 32 * P) == bytes(32 * P)
    assert gnode.read("back", 32 * P, P) == b"\x5a" * P


def test_a_vm_with_files_mapped_is_not_snapshotted(gnode: Node) -> None:
    vm_with_data(gnode, "withfile")
    s = gnode.stubs
    s.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="withfile", slot=0, offset=0, size=P, file=pb.MemoryFile(name="disk.img")))
    with pytest.raises(grpc.RpcError) as caught:
        gnode.snapshot("withfile")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "disk.img" in caught.value.details()  # type: ignore[attr-defined]
    assert gnode.healthy() and gnode.state("withfile") == "created"
    file_slot = s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="withfile", guest_addr=0x100000, size=4 * P,
        file=pb.MemoryFile(name="disk.img"))).slot
    s.memory.UnmapGuestMemory(pb.UnmapGuestMemoryRequest(vm_id="withfile", slot=0, offset=0,
                                                         size=P))
    with pytest.raises(grpc.RpcError) as caught:
        gnode.snapshot("withfile")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    s.memory.RemoveMemoryRegion(pb.RemoveMemoryRegionRequest(vm_id="withfile",
                                                             slot=file_slot))
    data, _ = gnode.snapshot("withfile")     # no files left: fine again
    gnode.restore("withfile-copy", data)
    assert gnode.read("withfile-copy", 0, 2) == b"\x5a\x5a"
