"""The snapshot files' guarantees (kvmd.state.store): a private directory, never half-written,
never mixed, never a link followed, listed in order with their sizes, failures mapped to
what a caller can act on, and a diff chain that only follows snapshots actually stored."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from state_guests import COUNTER_SOURCE
from state_support import Node, rewrite

from kvmd.core.errors import AlreadyExists, NotFound, Reason, ResourceExhausted
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.state.snapshot import SnapshotTaker, restore_bytes
from kvmd.state.store import SnapshotStore
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
P = 4096



def test_the_snapshot_directory_is_private(node: Node) -> None:
    """<state-dir>/snapshots is created 0700: the files in it hold guest memory."""
    assert node.state_dir is not None
    mode = stat.S_IMODE(os.stat(node.state_dir / "snapshots").st_mode)
    assert mode == 0o700


def test_a_refused_existing_name_leaves_the_diff_chain_alone(node: Node) -> None:
    """Snapshotting to a name that exists is refused before the VM is saved: the next diff
    is still based on the last snapshot actually stored, and base + diff restores the
    pages written since."""
    node.boot("c", COUNTER_SOURCE)
    _, base = node.snapshot("c", file="base")
    node.write("c", 0x30000, b"\x42" * P)
    with pytest.raises(grpc.RpcError) as err:
        node.snapshot("c", file="base")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    _, diff = node.snapshot("c", file="d1", diff=True)
    assert diff.base_snapshot_id == base.snapshot_id
    node.restore("c2", files=("base", "d1"))
    assert node.read("c2", 0x30000, P) == b"\x42" * P


def test_a_name_taken_while_writing_is_already_exists(tmp_path: Path) -> None:
    """If the name is taken between the check and the link (another writer), the write is
    ALREADY_EXISTS, the other file is untouched and no temporary file is left."""
    store = SnapshotStore(str(tmp_path))

    def chunks() -> Iterator[bytes]:
        yield b"mine"
        Path(store.dir, "n").write_bytes(b"theirs")
        yield b" too"
    with pytest.raises(AlreadyExists):
        store.write("n", chunks())
    assert Path(store.dir, "n").read_bytes() == b"theirs"
    assert os.listdir(store.dir) == ["n"]


def test_two_writers_of_one_name_never_mix_their_bytes(tmp_path: Path) -> None:
    """Two writes of the same name at once (the second starting while the first is
    writing): the file that ends up under the name is exactly one writer's bytes."""
    store = SnapshotStore(str(tmp_path))
    outcomes = []

    def inner() -> Iterator[bytes]:
        yield b"B" * 10

    def outer() -> Iterator[bytes]:
        yield b"A" * 100
        try:
            store.write("n", inner())
            outcomes.append("inner written")
        except Exception as exc:  # refused: the outer write goes on
            outcomes.append(type(exc).__name__)
        yield b"A" * 100
    try:
        store.write("n", outer())
        outcomes.append("outer written")
    except AlreadyExists:
        outcomes.append("outer refused")
    assert Path(store.dir, "n").read_bytes() in (b"A" * 200, b"B" * 10), outcomes
    assert os.listdir(store.dir) == ["n"]


def test_a_symlink_in_the_snapshot_directory_is_not_followed(node: Node,
                                                            tmp_path: Path) -> None:
    """A symlink under a snapshot's name is not a snapshot file: RestoreVm from it is
    refused (the daemon never reads a file outside its directory through a link)."""
    assert node.state_dir is not None
    node.boot("l", COUNTER_SOURCE)
    data, _ = node.snapshot("l")
    outside = tmp_path / "outside.snap"
    outside.write_bytes(data)
    os.symlink(outside, node.state_dir / "snapshots" / "link")
    with pytest.raises(grpc.RpcError) as err:
        node.restore("l2", files=("link",))
    assert err.value.code() == INVALID  # type: ignore[attr-defined]
    assert "not a regular file" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert node.vm_ids() == ["l"] and node.healthy()


def test_list_snapshots_is_sorted_with_sizes_and_guest_memory(node: Node) -> None:
    """ListSnapshots lists files by name, each with its size on disk and the guest memory
    of all its slots."""
    assert node.state_dir is not None
    node.boot("g", COUNTER_SOURCE)
    node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="g", guest_addr=1 << 20, size=64 * P))
    names = ["m3", "b0", "z9", "a1", "k5", "c2", "y7", "d4"]
    for name in names:
        node.snapshot("g", file=name)
    listed = node.stubs.snapshots.ListSnapshots(pb.ListSnapshotsRequest()).snapshots
    assert [s.file for s in listed] == sorted(names)
    for s in listed:
        assert s.size_bytes == os.path.getsize(node.state_dir / "snapshots" / s.file)
        assert s.guest_memory_bytes == 0x40000 + 64 * P


def test_a_newer_format_file_does_not_break_the_listing(node: Node) -> None:
    """A file of a newer snapshot format in the directory is left out of ListSnapshots;
    the other files are still listed."""
    assert node.state_dir is not None
    node.boot("n", COUNTER_SOURCE)
    data, _ = node.snapshot("n")
    node.snapshot("n", file="good")

    def newer(r: pb.SnapshotRecord) -> None:
        if r.HasField("header"):
            r.header.format_version = 2
    newer_data = rewrite(data, newer)
    (node.state_dir / "snapshots" / "newer").write_bytes(newer_data)
    listed = node.stubs.snapshots.ListSnapshots(pb.ListSnapshotsRequest()).snapshots
    assert [s.file for s in listed] == ["good"]
    # Restored from the file or from a stream, it is refused alike: FAILED_PRECONDITION.
    for source in ({"files": ("newer",)}, {"data": newer_data}):
        with pytest.raises(grpc.RpcError) as err:
            node.restore("n2", **source)  # type: ignore[arg-type]
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "format version 2" in (err.value.details() or "")  # type: ignore[attr-defined]


def test_a_full_state_directory_is_resource_exhausted_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails for want of space (ENOSPC, or EDQUOT over a quota) is
    ResourceExhausted / HOST_EXHAUSTED, not a kernel error, and leaves no file behind. (The
    file system's refusal is injected into os.write: a full disk cannot be had here without
    mounting one.)"""
    store = SnapshotStore(str(tmp_path))
    for code in (errno.ENOSPC, errno.EDQUOT):
        def refuse(fd: int, data: bytes, code: int = code) -> int:
            raise OSError(code, os.strerror(code))
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", refuse)
            with pytest.raises(ResourceExhausted) as err:
                store.write("full", iter([b"x" * 100]))
        assert err.value.reason == Reason.HOST_EXHAUSTED
        assert os.listdir(store.dir) == []


def test_a_failure_producing_the_bytes_is_not_a_write_error(tmp_path: Path) -> None:
    """An error raised while the snapshot's bytes are produced (reading the guest, say)
    reaches the caller as it is, not as "cannot write" or "the state directory is full",
    and leaves no file behind."""
    store = SnapshotStore(str(tmp_path))

    def chunks() -> Iterator[bytes]:
        yield b"x" * 100
        raise OSError(errno.ENOSPC, "raised by the producer")
    with pytest.raises(OSError, match="raised by the producer"):
        store.write("n", chunks())
    assert os.listdir(store.dir) == []


def test_a_leftover_temporary_file_blocks_no_name(tmp_path: Path) -> None:
    """A file named as a temporary file of an earlier kvmd (which wrote to
    .<name>.<pid>.tmp and could leave one behind if killed mid-write, under this very pid
    after a restart in a container) does not stop a snapshot of that name."""
    store = SnapshotStore(str(tmp_path))
    Path(store.dir, f".n.{os.getpid()}.tmp").write_bytes(b"left by a crash")
    assert store.write("n", iter([b"fresh"])) == 5
    assert Path(store.dir, "n").read_bytes() == b"fresh"


def test_a_snapshot_kept_nowhere_is_no_base_for_diffs(host: Host, tmp_path: Path) -> None:
    """A file snapshot whose name is taken just before the link (ALREADY_EXISTS) was never
    stored: the VM's next diff stays based on the last snapshot actually kept and still
    holds the pages written before the failed one (base + diff restores them)."""
    store = SnapshotStore(str(tmp_path))
    vm = host.create_vm("d", {}, VmOptions())
    vm.add_memory_region(0, 16 * P, False, True)
    base = b"".join(SnapshotTaker(vm))
    vm.write_memory(3 * P, b"\x33" * P)
    taker = SnapshotTaker(vm, confirm=True)

    def then_taken() -> Iterator[bytes]:
        yield from taker
        Path(store.dir, "late").write_bytes(b"another writer's")
    try:
        with pytest.raises(AlreadyExists):
            store.write("late", then_taken())
    finally:
        taker.close()
    diff = b"".join(SnapshotTaker(vm, diff=True))
    restored = restore_bytes(host, "r", "local", iter([base, diff]))
    assert restored.read_memory(3 * P, P) == b"\x33" * P


def test_deleting_a_file_that_is_gone_is_not_found(tmp_path: Path) -> None:
    """SnapshotStore.delete of a name with no file (deleted meanwhile by another call):
    NotFound, not a kernel error."""
    store = SnapshotStore(str(tmp_path))
    with pytest.raises(NotFound):
        store.delete("gone")


def test_a_taker_awaiting_confirmation_counts_only_once_confirmed(host: Host) -> None:
    """A taker made with `confirm` (the API's, for files and streams): a complete snapshot
    closed unconfirmed (its client gone before the last message) is no diff base and its
    pages stay owed; confirmed, the next diff follows it and holds only newer pages."""
    vm = host.create_vm("t", {}, VmOptions())
    vm.add_memory_region(0, 16 * P, False, True)
    first = SnapshotTaker(vm)
    base = b"".join(first)
    vm.write_memory(2 * P, b"\x22" * P)
    lost = SnapshotTaker(vm, confirm=True)
    b"".join(lost)
    lost.close()
    assert vm.last_snapshot_id == first.snapshot_id
    kept = SnapshotTaker(vm, diff=True, confirm=True)
    diff = b"".join(kept)
    kept.confirm()
    kept.close()  # after confirm(): changes nothing
    assert vm.last_snapshot_id == kept.snapshot_id
    restored = restore_bytes(host, "r", "local", iter([base, diff]))
    assert restored.read_memory(2 * P, P) == b"\x22" * P
    assert kept.summary is not None and kept.summary.memory_pages >= 1
    vm.write_memory(5 * P, b"\x55" * P)
    after = SnapshotTaker(vm, diff=True)
    b"".join(after)
    assert after.summary is not None and after.summary.base_snapshot_id == kept.snapshot_id
    assert after.summary.memory_pages == 1
