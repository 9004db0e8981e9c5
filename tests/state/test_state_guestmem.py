"""Snapshots meet discard and files: a diff snapshot carries a discard (the range restores
as zeros), "pages the guest has" is one notion (a discarded range is not in a full
snapshot), and files of the images directory mapped into a VM travel by reference: their
pages are not in the snapshot, the restore maps the same names again and refuses a file
whose bytes differ from what the VM saw."""

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


def vm_with_files(node: Node, vm_id: str) -> None:
    """Slot 0: the VM's own memory (0x5a, dirty-logged) with disk.img mapped over its pages
    2-5; slot 1: rw.img as a whole, writable."""
    s = node.stubs
    s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0, size=SLOT,
                                                       log_dirty=True))
    node.write(vm_id, 0, b"\x5a" * SLOT)
    s.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id=vm_id, slot=0, offset=2 * P, size=4 * P, file=pb.MemoryFile(name="disk.img")))
    s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=SLOT, size=8 * P, file=pb.MemoryFile(name="rw.img")))
    s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))


def files_of(node: Node, vm_id: str) -> list[tuple[int, int, str]]:
    regions = node.stubs.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id))
    out = []
    for r in regions.regions:
        if r.file.name:
            out.append((r.slot, 0, r.file.name))
        out += [(r.slot, m.offset, m.file.name) for m in r.mappings]
    return out


def test_files_travel_by_reference(gnode: Node, images: Path) -> None:
    (images / "rw.img").write_bytes(b"\x11" * (8 * P))
    vm_with_files(gnode, "src")
    gnode.write("src", SLOT + P, b"written by the host into rw.img")
    data, info = gnode.snapshot("src")
    # The files' pages are not in it: slot 0 less the 4 mapped pages, nothing of slot 1.
    assert info.memory_pages == SLOT // P - 4
    # A writable file holds what the VM wrote once it is saved.
    assert (images / "rw.img").read_bytes()[P:P + 31] == b"written by the host into rw.img"
    gnode.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id="src"))
    gnode.restore("dst", data)
    assert files_of(gnode, "dst") == [(0, 2 * P, "disk.img"), (1, 0, "rw.img")]
    assert gnode.read("dst", 2 * P, 4 * P) == b"\x40" * (4 * P)
    assert gnode.read("dst", 0, 2 * P) == b"\x5a" * (2 * P)
    assert gnode.read("dst", SLOT + P, 31) == b"written by the host into rw.img"


def test_a_restore_refuses_a_file_that_changed_and_leaves_nothing(gnode: Node,
                                                                   images: Path) -> None:
    (images / "rw.img").write_bytes(b"\x11" * (8 * P))
    vm_with_files(gnode, "src")
    data, _ = gnode.snapshot("src")
    gnode.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id="src"))
    disk = images / "disk.img"
    original = disk.read_bytes()
    disk.write_bytes(original[:3 * P] + b"\x41" + original[3 * P + 1:])
    with pytest.raises(grpc.RpcError) as caught:
        gnode.restore("dst", data)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "disk.img" in caught.value.details()  # type: ignore[attr-defined]
    assert "differ" in caught.value.details()  # type: ignore[attr-defined]
    assert gnode.vm_ids() == []
    disk.write_bytes(original)
    (images / "rw.img").unlink()
    with pytest.raises(grpc.RpcError) as caught:
        gnode.restore("dst", data)
    assert "rw.img" in caught.value.details()  # type: ignore[attr-defined]
    assert gnode.vm_ids() == []
    assert gnode.healthy()


def test_a_diff_snapshot_leaves_file_pages_out(gnode: Node, images: Path) -> None:
    (images / "rw.img").write_bytes(b"\x11" * (8 * P))
    vm_with_files(gnode, "src")
    full, _ = gnode.snapshot("src")
    gnode.write("src", SLOT, b"\x22" * P)          # into the file: by reference
    gnode.write("src", 0, b"\x33" * P)             # the VM's own memory: in the diff
    diff, info = gnode.snapshot("src", diff=True)
    assert info.memory_pages == 1
    gnode.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id="src"))
    gnode.restore("dst", full + diff)
    assert gnode.read("dst", 0, P) == b"\x33" * P
    assert gnode.read("dst", SLOT, P) == b"\x22" * P
