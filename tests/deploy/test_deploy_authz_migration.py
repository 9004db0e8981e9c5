"""Who may migrate (mTLS identities, as in test_deploy_authz): preparing an incoming VM is
creating one (operators under their prefix, and the VM is theirs), migrating or cancelling
acts on the VM (its owner, or an admin), viewers only list. The daemons' own stream is
authorized by its one-time token, whoever presents it; a VM moved between two daemons
keeps the owner that prepared it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, Stubs, TlsDaemon

from kvmd_proto import vmm_pb2 as pb

POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator", "vm_prefix": "a-"},
    {"name": "operator-b", "role": "operator", "vm_prefix": "b-"},
    {"name": "viewer-1", "role": "viewer"},
]


def code(call: Callable[[], Any]) -> str:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    except grpc.RpcError as err:
        return str(err.code().name)  # type: ignore[attr-defined]
    return "OK"


def prepare(s: Stubs, vm_id: str) -> pb.IncomingMigration:
    return s.migration.PrepareIncomingMigration(
        pb.PrepareIncomingMigrationRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)


def migrate(s: Stubs, vm_id: str, target: str, token: str) -> list[pb.MigrationProgress]:
    return list(s.migration.MigrateVm(pb.MigrateVmRequest(vm_id=vm_id, target=target,
                                                          token=token), timeout=60))


def cancel(s: Stubs, vm_id: str) -> None:
    s.migration.CancelMigration(pb.CancelMigrationRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)


def listed(s: Stubs) -> set[str]:
    return {m.vm_id for m in s.migration.ListMigrations(pb.ListMigrationsRequest(),
                                                        timeout=RPC_TIMEOUT).migrations}


@pytest.fixture
def pair(tls_daemon: Callable[..., TlsDaemon]) -> tuple[TlsDaemon, TlsDaemon]:
    return tls_daemon(policy=POLICY), tls_daemon(policy=POLICY)


def test_operators_migrate_their_own_vms_and_keep_them(
        pair: tuple[TlsDaemon, TlsDaemon]) -> None:
    src, dst = pair
    a_src, a_dst, b_dst = src.tls("operator-a"), dst.tls("operator-a"), dst.tls("operator-b")
    a_src.boot("a-vm")
    # Preparing creates: only under the caller's prefix.
    assert code(lambda: prepare(a_dst, "b-vm")) == "PERMISSION_DENIED"
    incoming = prepare(a_dst, "a-vm")
    # Another operator neither sees nor cancels it (for it the id does not exist); the
    # owner sees it.
    assert listed(b_dst) == set() and listed(a_dst) == {"a-vm"}
    assert code(lambda: cancel(b_dst, "a-vm")) == "NOT_FOUND"
    # The source daemon presents its own certificate (no role on the target): the token
    # is what authorizes its stream.
    progress = migrate(a_src, "a-vm", dst.target, incoming.token)
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    assert a_dst.get_vm("a-vm").owner == "operator-a"
    assert a_src.list_ids() == set()


def test_others_may_not_migrate_or_cancel_a_vm(pair: tuple[TlsDaemon, TlsDaemon]) -> None:
    src, dst = pair
    a_src, b_src, viewer = src.tls("operator-a"), src.tls("operator-b"), src.tls("viewer-1")
    a_src.boot("a-mine")
    token = prepare(dst.tls("admin-1"), "a-mine").token
    # Another operator's VM does not exist for b; a viewer sees it, but may not act.
    assert code(lambda: migrate(b_src, "a-mine", dst.target, token)) == "NOT_FOUND"
    assert code(lambda: migrate(viewer, "a-mine", dst.target, token)) == "PERMISSION_DENIED"
    assert code(lambda: cancel(b_src, "a-mine")) == "NOT_FOUND"
    assert code(lambda: cancel(viewer, "a-mine")) == "PERMISSION_DENIED"
    assert code(lambda: prepare(dst.tls("viewer-1"), "v-x")) == "PERMISSION_DENIED"
    assert code(lambda: listed(viewer)) == "OK"
    assert a_src.get_vm("a-mine").migrating_to == ""
    # The admin may; the VM keeps its owner on the target (the token's preparer: admin).
    progress = migrate(src.tls("admin-1"), "a-mine", dst.target, token)
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    assert dst.tls("admin-1").get_vm("a-mine").owner == "admin-1"


def test_the_daemons_stream_needs_a_token_not_a_role(
        pair: tuple[TlsDaemon, TlsDaemon]) -> None:
    _src, dst = pair
    stranger = dst.tls("stranger")  # a valid certificate, no role
    method = stranger.channel.stream_stream(
        "/kvmd.v1.Migration/ReceiveMigration",
        request_serializer=pb.MigrationMessage.SerializeToString,
        response_deserializer=pb.MigrationReply.FromString)
    start = pb.MigrationMessage(start=pb.MigrationStart(token="guess", format_version=1))
    assert code(lambda: method(iter([start]), timeout=RPC_TIMEOUT)) == "PERMISSION_DENIED"
    # Everything else stays closed to it.
    assert code(lambda: prepare(stranger, "s-x")) == "PERMISSION_DENIED"
    assert code(lambda: listed(stranger)) == "PERMISSION_DENIED"


def test_an_outgoing_migration_is_listed_only_to_who_may_see_its_vm(
        pair: tuple[TlsDaemon, TlsDaemon]) -> None:
    """On the source, a migration under way is listed to its VM's owner and the admin only:
    another operator sees nothing of it (for it the VM does not exist)."""
    src, dst = pair
    owner, other, admin = src.tls("operator-a"), src.tls("operator-b"), src.tls("admin-1")
    owner.boot("a-vm")
    owner.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="a-vm", guest_addr=1 << 20, size=1 << 20), timeout=RPC_TIMEOUT)
    owner.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
        vm_id="a-vm", guest_addr=1 << 20, data=b"\x5a" * (1 << 20))]), timeout=RPC_TIMEOUT)
    token = prepare(dst.tls("operator-a"), "a-vm").token
    progress = owner.migration.MigrateVm(pb.MigrateVmRequest(
        vm_id="a-vm", target=dst.target, token=token,
        options=pb.MigrationOptions(bandwidth_bytes_per_second=64 << 10)), timeout=60)
    try:
        next(progress)  # under way, and slow: 64 KiB/s
        assert listed(other) == set()
        assert listed(owner) == listed(admin) == {"a-vm"}
    finally:
        progress.cancel()


def test_an_operator_cancels_its_own_prepared_migration(
        pair: tuple[TlsDaemon, TlsDaemon]) -> None:
    """The operator who prepared an incoming migration may cancel it (its id is reserved,
    not yet a VM): the token is voided and nothing is listed any more."""
    _src, dst = pair
    owner = dst.tls("operator-a")
    prepare(owner, "a-in")
    assert listed(owner) == {"a-in"}
    cancel(owner, "a-in")
    assert listed(owner) == set()
