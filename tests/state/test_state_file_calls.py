"""The Snapshots service's calls on state-directory files, in-process: disabled without a
state directory, names checked first, the restore stream's order, and listings that only
show snapshot files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from inprocess_daemon import assert_refused, client_of, raw_stubs

from kvmd.server import Daemon
from kvmd_client.errors import from_rpc_error
from kvmd_proto import vmm_pb2 as pb


def test_snapshot_files_without_a_state_dir_are_a_disabled_feature(
        start_daemon: Callable[..., Daemon]) -> None:
    """A daemon without a state directory refuses every snapshot-file call with
    FAILED_PRECONDITION / FEATURE_DISABLED (streamed snapshots still work)."""
    daemon = start_daemon()  # no state_dir
    with client_of(daemon) as client:
        client.create_vm("v")
        client.add_memory_region("v", 0, 0x10000)
        code, reason = grpc.StatusCode.FAILED_PRECONDITION, "FEATURE_DISABLED"
        assert_refused(client.list_snapshots, code, reason)
        assert_refused(lambda: client.delete_snapshot("s1"), code, reason)
        assert_refused(lambda: client.snapshot_vm_to_state_dir("v", "s1"), code, reason)
        assert_refused(lambda: client.restore_vm("w", files=["s1"]), code, reason)
        data, _ = client.snapshot_vm("v")
        assert data


def test_a_bad_snapshot_file_name_is_refused_before_anything_else(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """SnapshotVm to a file: the name is checked first, before the VM is looked at for the
    snapshot, so a bad name is INVALID_ARGUMENT / FILE_NAME_INVALID even for a diff the VM
    could not give (no full snapshot yet)."""
    daemon = start_daemon(state_dir=str(tmp_path / "state"))
    with client_of(daemon) as client:
        client.create_vm("v")
        client.add_memory_region("v", 0, 0x10000)
        err = assert_refused(lambda: client.snapshot_vm_to_state_dir("v", "../x", diff=True),
                              grpc.StatusCode.INVALID_ARGUMENT, "FILE_NAME_INVALID")
        assert [v.field for v in err.field_violations] == ["file"]


def test_restore_refuses_options_after_the_first_message(
        start_daemon: Callable[..., Daemon]) -> None:
    """RestoreVm: only snapshot data may follow the options; a second options message is
    INVALID_ARGUMENT / STREAM_INVALID on field data, and the half-built VM is released: its
    id is free for the next restore."""
    daemon = start_daemon()
    with client_of(daemon) as client:
        client.create_vm("v")
        client.add_memory_region("v", 0, 0x10000)
        data, _ = client.snapshot_vm("v")
    stubs = raw_stubs(daemon)
    try:
        options = pb.RestoreVmRequest(options=pb.RestoreVmOptions(vm_id="copy"))
        requests = [options, pb.RestoreVmRequest(data=data), options]
        with pytest.raises(grpc.RpcError) as caught:
            stubs.snapshots.RestoreVm(iter(requests), timeout=20)
        err = from_rpc_error(caught.value)  # type: ignore[arg-type]
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "STREAM_INVALID")
        assert [v.field for v in err.field_violations] == ["data"]
        ids = [vm.vm_id for vm in stubs.vms.ListVms(pb.ListVmsRequest(), timeout=10).vms]
        assert ids == ["v"]
    finally:
        stubs.close()
    with client_of(daemon) as client:
        assert client.restore_vm("copy", data).vm_id == "copy"


def test_list_snapshots_skips_files_that_are_not_snapshots(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A stray file in the state directory (valid name, not a snapshot) is not listed and
    does not break ListSnapshots for the real ones."""
    state = tmp_path / "state"
    daemon = start_daemon(state_dir=str(state))
    with client_of(daemon) as client:
        client.create_vm("v")
        client.add_memory_region("v", 0, 0x10000)
        client.snapshot_vm_to_state_dir("v", "good")
        (state / "snapshots" / "junk").write_bytes(b"not a kvmd snapshot at all" * 10)
        assert [s.file for s in client.list_snapshots()] == ["good"]


def test_what_only_looks_like_a_snapshot_file_is_neither_listed_nor_read(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A directory, a symbolic link (to a real snapshot) and a FIFO under valid names in the
    snapshots directory: ListSnapshots shows the real file only (one such entry made it
    fail INTERNAL for every caller), and a restore from any of them is INVALID_ARGUMENT /
    SNAPSHOT_CORRUPT, the FIFO's at once, not after a writer comes."""
    state = tmp_path / "state"
    daemon = start_daemon(state_dir=str(state))
    snapshots = state / "snapshots"
    with client_of(daemon) as client:
        client.create_vm("v")
        client.add_memory_region("v", 0, 0x10000)
        client.snapshot_vm_to_state_dir("v", "good")
        (snapshots / "a-directory").mkdir()
        (snapshots / "a-link").symlink_to(snapshots / "good")
        os.mkfifo(snapshots / "a-fifo")
        assert [s.file for s in client.list_snapshots()] == ["good"]
        for name in ("a-directory", "a-link", "a-fifo"):
            assert_refused(lambda name=name: client.restore_vm("w", files=[name]),
                           grpc.StatusCode.INVALID_ARGUMENT, "SNAPSHOT_CORRUPT")
        assert [vm.vm_id for vm in client.list_vms()] == ["v"]
        assert client.restore_vm("w", files=["good"]).vm_id == "w"
