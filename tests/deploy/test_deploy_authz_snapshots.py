"""Who may snapshot and restore (mTLS identities, as in test_deploy_authz): snapshots read
guest memory and restores create VMs, so operators act on their own VMs, under their prefix
and within their quota; admins on all; viewers on none. Snapshot files are seen only by
those who may see their VM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, Stubs, TlsDaemon

from kvmd_proto import vmm_pb2 as pb

QUOTA = 2
POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator", "vm_prefix": "a-", "max_vms": QUOTA},
    {"name": "operator-b", "role": "operator", "vm_prefix": "b-"},
    {"name": "viewer-1", "role": "viewer"},
]


@pytest.fixture
def d(tls_daemon: Callable[..., TlsDaemon]) -> TlsDaemon:
    return tls_daemon(policy=POLICY)


def code(call: Callable[[], Any]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return str(err.code().name)  # type: ignore[attr-defined]
    return "OK"


def snap(s: Stubs, vm_id: str, file: str = "") -> bytes:
    out = b""
    for msg in s.snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id=vm_id, file=file),
                                      timeout=RPC_TIMEOUT):
        out += msg.data
    return out


def restore(s: Stubs, vm_id: str, data: bytes = b"", files: tuple[str, ...] = ()) -> pb.Vm:
    requests = [pb.RestoreVmRequest(options=pb.RestoreVmOptions(vm_id=vm_id,
                                                                files=list(files)))]
    if data:
        requests.append(pb.RestoreVmRequest(data=data))
    vm: pb.Vm = s.snapshots.RestoreVm(iter(requests), timeout=RPC_TIMEOUT)
    return vm


def test_operator_snapshots_and_restores_its_own(d: TlsDaemon) -> None:
    a, b = d.tls("operator-a"), d.tls("operator-b")
    a.boot("a-one")
    data = snap(a, "a-one")
    vm = restore(a, "a-two", data)
    assert vm.owner == "operator-a"  # the restorer owns the copy
    # Not another operator's VM, nor a VM outside its prefix, nor beyond its quota.
    b.boot("b-one")
    assert code(lambda: snap(a, "b-one")) == "NOT_FOUND"  # as if it did not exist
    assert code(lambda: restore(a, "b-stolen", data)) == "PERMISSION_DENIED"
    assert code(lambda: restore(a, "a-three", data)) == "RESOURCE_EXHAUSTED"
    # b may restore a's snapshot bytes it holds (it has the data), as its own VM.
    assert restore(b, "b-copy", data).owner == "operator-b"


def test_viewer_may_not_snapshot_restore_or_list(d: TlsDaemon) -> None:
    admin, viewer = d.tls("admin-1"), d.tls("viewer-1")
    admin.boot("adm")
    data = snap(admin, "adm", file="adm-file")
    assert data == b""
    data = snap(admin, "adm")
    for call in (lambda: snap(viewer, "adm"), lambda: restore(viewer, "v-vm", data),
                 lambda: viewer.snapshots.ListSnapshots(pb.ListSnapshotsRequest(),
                                                        timeout=RPC_TIMEOUT),
                 lambda: viewer.snapshots.DeleteSnapshot(
                     pb.DeleteSnapshotRequest(file="adm-file"), timeout=RPC_TIMEOUT)):
        assert code(call) == "PERMISSION_DENIED"


def test_snapshot_files_are_seen_only_by_who_may_see_their_vm(d: TlsDaemon) -> None:
    admin, a, b = d.tls("admin-1"), d.tls("operator-a"), d.tls("operator-b")
    a.boot("a-vm")
    snap(a, "a-vm", file="a-file")
    snap(admin, "a-vm", file="a-by-admin")  # owned by a's VM owner
    admin.boot("adm-vm")
    snap(admin, "adm-vm", file="adm-file")

    def files(s: Stubs) -> set[str]:
        return {i.file for i in s.snapshots.ListSnapshots(pb.ListSnapshotsRequest(),
                                                          timeout=RPC_TIMEOUT).snapshots}
    assert files(admin) == {"a-file", "a-by-admin", "adm-file"}
    assert files(a) == {"a-file", "a-by-admin"}
    assert files(b) == set()
    # Another tenant's file does not exist for b: NOT_FOUND, not PERMISSION_DENIED.
    assert code(lambda: restore(b, "b-x", files=("a-file",))) == "NOT_FOUND"
    assert code(lambda: b.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest(file="a-file"),
                                                   timeout=RPC_TIMEOUT)) == "NOT_FOUND"
    assert restore(a, "a-copy", files=("a-file",)).owner == "operator-a"
    a.snapshots.DeleteSnapshot(pb.DeleteSnapshotRequest(file="a-file"), timeout=RPC_TIMEOUT)
    assert files(admin) == {"a-by-admin", "adm-file"}
