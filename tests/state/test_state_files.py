"""Snapshot files in the daemon's state directory: names, never paths; never replaced;
readable only by the daemon; listed, restored and deleted."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from state_guests import COUNTER_ADDR, COUNTER_SOURCE
from state_support import Node, NodeFactory

from kvmd_proto import vmm_pb2 as pb


def code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()  # type: ignore[attr-defined, no-any-return]


def test_snapshot_to_file_list_restore_delete(node: Node) -> None:
    assert node.state_dir is not None
    node.boot("f", COUNTER_SOURCE)
    node.start("f")
    node.wait_u32("f", COUNTER_ADDR, 5)
    data, info = node.snapshot("f", file="f-base")
    assert data == b"" and info.file == "f-base" and info.size_bytes > 0
    path = node.state_dir / "snapshots" / "f-base"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.getsize(path) == info.size_bytes
    node.write("f", 0x30000, b"\x42" * 4096)
    _, _dinfo = node.snapshot("f", file="f-diff", diff=True, leave_paused=True)
    listed = {s.file: s for s in node.stubs.snapshots.ListSnapshots(
        pb.ListSnapshotsRequest()).snapshots}
    assert set(listed) == {"f-base", "f-diff"}
    assert listed["f-base"].vm_id == "f" and listed["f-base"].owner == "local"
    assert listed["f-diff"].diff and listed["f-diff"].base_snapshot_id == info.snapshot_id
    vm = node.restore("g", files=("f-base", "f-diff"))
    assert vm.vm_id == "g"
    assert node.read("g", 0x30000, 4096) == b"\x42" * 4096
    assert node.read("g", 0, 0x40000) == node.read("f", 0, 0x40000)
    node.stubs.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest(file="f-base"))
    assert not path.exists()
    with pytest.raises(grpc.RpcError) as err:
        node.stubs.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest(file="f-base"))
    assert code(err) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        node.restore("h", files=("f-base",))
    assert code(err) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "/etc/passwd", "x" * 65,
                                  "bad name"])
def test_file_names_are_names_not_paths(node: Node, name: str) -> None:
    node.boot("n", COUNTER_SOURCE)
    for call in (lambda: node.snapshot("n", file=name),
                 lambda: node.restore("m", files=(name,)),
                 lambda: node.stubs.snapshots.DeleteSnapshot(
                     pb.DeleteSnapshotRequest(file=name))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert node.state("n") == "created" and node.vm_ids() == ["n"]
    # An empty name: SnapshotVm streams instead; a restore or delete of it is refused.
    for call in (lambda: node.restore("m", files=("",)),
                 lambda: node.stubs.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest())):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_existing_file_is_never_replaced(node: Node) -> None:
    assert node.state_dir is not None
    node.boot("e", COUNTER_SOURCE)
    node.start("e")
    _, _first = node.snapshot("e", file="once")
    before = (node.state_dir / "snapshots" / "once").read_bytes()
    with pytest.raises(grpc.RpcError) as err:
        node.snapshot("e", file="once")
    assert code(err) == grpc.StatusCode.ALREADY_EXISTS
    assert (node.state_dir / "snapshots" / "once").read_bytes() == before
    assert node.state("e") == "running"
    assert not [n for n in os.listdir(node.state_dir / "snapshots") if n.startswith(".")]


def test_without_a_state_directory(node_factory: NodeFactory) -> None:
    bare = node_factory(state_dir="")
    bare.boot("b", COUNTER_SOURCE)
    for call in (lambda: bare.snapshot("b", file="x"),
                 lambda: bare.restore("c", files=("x",)),
                 lambda: bare.stubs.snapshots.ListSnapshots(pb.ListSnapshotsRequest())):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
    data, _ = bare.snapshot("b")  # streaming needs no state directory
    assert bare.restore("c", data).vm_id == "c"
