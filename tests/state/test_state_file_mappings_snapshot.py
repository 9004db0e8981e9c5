"""Snapshots of a VM with a file mapped over part of a slot: the pages right beside the
file are the VM's own and go in a diff like any other; a file mapping that carries no
digest is corrupt (INVALID_ARGUMENT), not a file that changed (FAILED_PRECONDITION)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from state_support import Node, NodeFactory, rewrite

from kvmd_proto import vmm_pb2 as pb

P = 4096


@pytest.fixture
def gnode(node_factory: NodeFactory, tmp_path: Path) -> Node:
    images = tmp_path / "images"
    images.mkdir(mode=0o750)
    (images / "disk.img").write_bytes(b"\x40" * (16 * P))
    return node_factory(images_dir=str(images))


def vm_with_a_file(node: Node, vm_id: str) -> None:
    """A 16-page slot, dirty-logged, with disk.img mapped over its pages 2-5."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0,
                                                       size=16 * P, log_dirty=True))
    s.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id=vm_id, slot=0, offset=2 * P, size=4 * P, file=pb.MemoryFile(name="disk.img")))


def test_the_pages_beside_a_mapped_file_go_in_a_diff(gnode: Node) -> None:
    """Pages 1 and 6 touch the file's pages 2-5 on either side: both are the VM's own
    memory, dirtied after the base, so both are in the diff and restore from it."""
    vm_with_a_file(gnode, "src")
    full, _ = gnode.snapshot("src")
    gnode.write("src", 1 * P, b"\x61" * P)
    gnode.write("src", 6 * P, b"\x66" * P)
    diff, info = gnode.snapshot("src", diff=True)
    assert info.memory_pages == 2
    gnode.restore("dst", full + diff)
    assert gnode.read("dst", 1 * P, P) == b"\x61" * P
    assert gnode.read("dst", 2 * P, 4 * P) == b"\x40" * (4 * P)
    assert gnode.read("dst", 6 * P, P) == b"\x66" * P


def test_a_file_mapping_without_its_digest_is_refused_as_corrupt(gnode: Node) -> None:
    vm_with_a_file(gnode, "src")
    data, _ = gnode.snapshot("src")

    def no_digest(r: pb.SnapshotRecord) -> None:
        if r.HasField("vm"):
            assert len(r.vm.files) == 1 and r.vm.files[0].xxh3_128
            r.vm.files[0].xxh3_128 = b""
    with pytest.raises(grpc.RpcError) as err:
        gnode.restore("dst", rewrite(data, no_digest))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "has no digest" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert gnode.vm_ids() == ["src"]
    assert gnode.restore("dst", data).vm_id == "dst"  # the intact snapshot restores


def test_a_diff_mapping_its_file_elsewhere_than_its_base_is_refused(gnode: Node) -> None:
    """The VM is built, files mapped, from the base: a diff whose state maps its file from
    another offset of it describes another VM (FAILED_PRECONDITION)."""
    vm_with_a_file(gnode, "src")
    full, _ = gnode.snapshot("src")
    diff, _ = gnode.snapshot("src", diff=True)
    seen = {"headers": 0}

    def moved_in_the_diff(r: pb.SnapshotRecord) -> None:
        seen["headers"] += r.HasField("header")
        if seen["headers"] == 2 and r.HasField("vm"):
            r.vm.files[0].file_offset = P
    with pytest.raises(grpc.RpcError) as err:
        gnode.restore("dst", rewrite(full + diff, moved_in_the_diff))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "other memory slots or files than its base" in (
        err.value.details() or "")  # type: ignore[attr-defined]
    assert gnode.vm_ids() == ["src"]
    assert gnode.restore("dst", full + diff).vm_id == "dst"
