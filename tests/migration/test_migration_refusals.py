"""Bad input to the migration RPCs: each refused with its exact code and a clear message,
nothing changed (the VM runs on at the source, unmigrated; the target holds nothing it did
not hold before), and both daemons still healthy."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from migration_support import Host, Pki, wait_for

from kvmd.state.format import varint
from kvmd_proto import vmm_pb2 as pb

FAIL = grpc.StatusCode


def refused(call: object, code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()  # type: ignore[operator]
        if hasattr(result, "__iter__"):
            list(result)
    assert err.value.code() == code, err.value
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()
    return err.value


def untouched(a: Host, b: Host, vm_id: str) -> None:
    vm = a.vm(vm_id)
    assert vm.state == "running" and vm.migrating_to == "" and not vm.HasField("exit_code")
    assert vm_id not in b.vm_ids()
    assert a.node.healthy() and b.node.healthy()


def migrate(a: Host, vm_id: str, target: str, token: str, **options: object) -> object:
    return lambda: a.stubs.migration.MigrateVm(pb.MigrateVmRequest(
        vm_id=vm_id, target=target, token=token, options=pb.MigrationOptions(**options)),
        timeout=60)


def test_bad_migrate_requests_change_nothing(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.boot_working_set("r")
    a.node.start("r")
    token = b.prepare("r")
    refused(migrate(a, "r", "127.0.0.1:1", token), FAIL.UNAVAILABLE, "127.0.0.1:1")
    refused(migrate(a, "r", b.target, "not-the-token"), FAIL.INVALID_ARGUMENT,
            "refused the token")
    refused(migrate(a, "r", "nope", token), FAIL.INVALID_ARGUMENT, "not host:port")
    refused(migrate(a, "r", "unix:///run/x.sock", token), FAIL.INVALID_ARGUMENT)
    refused(migrate(a, "r", "", token), FAIL.INVALID_ARGUMENT, "target is required")
    refused(migrate(a, "r", b.target, ""), FAIL.INVALID_ARGUMENT, "token is required")
    refused(migrate(a, "nosuch", b.target, token), FAIL.NOT_FOUND)
    refused(migrate(a, "", b.target, token), FAIL.INVALID_ARGUMENT)
    refused(migrate(a, "r", b.target, token, max_rounds=5000), FAIL.INVALID_ARGUMENT,
            "max_rounds")
    refused(migrate(a, "r", b.target, token, bandwidth_bytes_per_second=10),
            FAIL.INVALID_ARGUMENT, "bandwidth")
    refused(migrate(a, "r", b.target, token, max_downtime_ms=70_000), FAIL.INVALID_ARGUMENT)
    untouched(a, b, "r")
    # The token survived all of that (a wrong token is not this one): it still works.
    a.migrate("r", b, token)
    assert b.vm("r").state == "running"
    # ... once.
    a2 = "r2"
    a.boot_working_set(a2)
    a.node.start(a2)
    refused(migrate(a, a2, b.target, token), FAIL.INVALID_ARGUMENT, "already used")
    untouched(a, b, a2)


def test_a_vm_migrating_refuses_a_second_migration_and_changes_to_its_layout(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.boot_working_set("busy")
    a.node.start("busy")
    call = a.stubs.migration.MigrateVm(pb.MigrateVmRequest(
        vm_id="busy", target=b.target, token=b.prepare("busy"),
        options=pb.MigrationOptions(bandwidth_bytes_per_second=1 << 20)), timeout=60)
    first = next(iter(call))
    assert first.phase in (pb.MigrationProgress.CONNECTING, pb.MigrationProgress.COPYING)
    wait_for(lambda: a.vm("busy").migrating_to == b.target, 10, "the migration to start")
    assert a.metrics()[("kvmd_migrations_in_progress", ())] == 1
    refused(migrate(a, "busy", b.target, "x"), FAIL.FAILED_PRECONDITION, "already migrating")
    refused(lambda: a.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id="busy")),
            FAIL.FAILED_PRECONDITION, "migrates to", "cancel the migration")
    refused(lambda: a.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="busy", guest_addr=1 << 30, size=1 << 20)), FAIL.FAILED_PRECONDITION)
    refused(lambda: a.stubs.memory.SetDirtyLogging(pb.SetDirtyLoggingRequest(
        vm_id="busy", slot=0, enabled=False)), FAIL.FAILED_PRECONDITION)
    refused(lambda: a.stubs.snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id="busy")),
            FAIL.FAILED_PRECONDITION, "migrates to")
    info = [m for m in a.migrations() if m.vm_id == "busy"]
    assert info and info[0].direction == "outgoing" and info[0].peer == b.target
    incoming = b.migrations()
    assert [(m.vm_id, m.direction) for m in incoming] == [("busy", "incoming")]
    call.cancel()
    wait_for(lambda: a.vm("busy").migrating_to == "", 15, "the cancel")
    assert a.metrics()[("kvmd_migrations_in_progress", ())] == 0
    untouched(a, b, "busy")


def test_bad_prepare_and_cancel_requests(hosts: tuple[Host, Host]) -> None:
    _a, b = hosts
    b.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="taken"))
    prepare = b.stubs.migration.PrepareIncomingMigration
    refused(lambda: prepare(pb.PrepareIncomingMigrationRequest(vm_id="taken")),
            FAIL.ALREADY_EXISTS)
    refused(lambda: prepare(pb.PrepareIncomingMigrationRequest(vm_id="")),
            FAIL.INVALID_ARGUMENT, "vm_id is required")
    refused(lambda: prepare(pb.PrepareIncomingMigrationRequest(vm_id="bad id!")),
            FAIL.INVALID_ARGUMENT)
    refused(lambda: prepare(pb.PrepareIncomingMigrationRequest(vm_id="t", ttl_seconds=4000)),
            FAIL.INVALID_ARGUMENT, "ttl_seconds")
    b.prepare("t")
    refused(lambda: prepare(pb.PrepareIncomingMigrationRequest(vm_id="t")),
            FAIL.ALREADY_EXISTS)  # the prepared id is reserved
    refused(lambda: b.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="t")), FAIL.ALREADY_EXISTS)
    cancel = b.stubs.migration.CancelMigration
    cancel(pb.CancelMigrationRequest(vm_id="t"))  # voids the token, frees the id
    b.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="t"))
    refused(lambda: cancel(pb.CancelMigrationRequest(vm_id="t")), FAIL.NOT_FOUND,
            "no migration in progress")
    refused(lambda: cancel(pb.CancelMigrationRequest(vm_id="")), FAIL.INVALID_ARGUMENT)
    assert b.node.healthy()


def test_tokens_are_hex_so_a_command_line_never_reads_one_as_an_option(
        hosts: tuple[Host, Host]) -> None:
    """A token is 32 random bytes in hex: one starting with '-' (as a base64url token does
    once in 64) made `kvmctl vm migrate --token T` fail as a missing argument."""
    _a, b = hosts
    prepare = b.stubs.migration.PrepareIncomingMigration
    cancel = b.stubs.migration.CancelMigration
    for i in range(8):
        token = prepare(pb.PrepareIncomingMigrationRequest(vm_id=f"hex{i}")).token
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
        cancel(pb.CancelMigrationRequest(vm_id=f"hex{i}"))


def test_an_unused_token_expires_and_frees_the_id(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    token = b.prepare("soon", ttl_seconds=1)
    assert b.migrations()[0].expires_unix_ms > time.time() * 1000
    wait_for(lambda: not b.migrations(), 10, "the token to expire")
    b.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="soon"))
    b.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id="soon"))
    a.boot_working_set("soon")
    a.node.start("soon")
    refused(migrate(a, "soon", b.target, token), FAIL.INVALID_ARGUMENT, "expired")
    untouched(a, b, "soon")


def _raw_stream(b: Host, messages: list[bytes]) -> Iterator[pb.MigrationReply]:
    method = b.stubs.channel.stream_stream(
        "/kvmd.v1.Migration/ReceiveMigration", request_serializer=lambda m: m,
        response_deserializer=pb.MigrationReply.FromString)
    return method(iter(messages), timeout=30)  # type: ignore[no-any-return]


def test_a_stream_to_receive_migration_is_checked_message_by_message(
        hosts: tuple[Host, Host]) -> None:
    _a, b = hosts
    start = pb.MigrationMessage(start=pb.MigrationStart(token="x", format_version=1))
    data = pb.MigrationMessage(data=b"\x07garbage").SerializeToString()
    refused(lambda: _raw_stream(b, [data]), FAIL.INVALID_ARGUMENT, "starts with its token")
    refused(lambda: _raw_stream(b, [start.SerializeToString()]), FAIL.PERMISSION_DENIED,
            "token is unknown")
    refused(lambda: _raw_stream(b, []), FAIL.INVALID_ARGUMENT)
    # A good token, then bytes that are not a snapshot: refused, and nothing is left.
    good = pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("g"),
                                                       format_version=1))
    refused(lambda: _raw_stream(b, [good.SerializeToString(), data]), FAIL.INVALID_ARGUMENT,
            "snapshot")
    wait_for(lambda: not b.migrations(), 10, "the target to drop it")
    assert b.vm_ids() == []
    # A newer format than the target reads: FAILED_PRECONDITION.
    newer = pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("g"),
                                                        format_version=99))
    refused(lambda: _raw_stream(b, [newer.SerializeToString()]), FAIL.FAILED_PRECONDITION,
            "format 99")
    # Commit before anything was sent; a stream that ends after the last round without
    # the final state.
    early = pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("g"),
                                                        format_version=1))
    commit = pb.MigrationMessage(commit=pb.MigrationCommit()).SerializeToString()
    refused(lambda: _raw_stream(b, [early.SerializeToString(), commit]),
            FAIL.INVALID_ARGUMENT, "before the VM is ready")
    header_only = pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("g"),
                                                              format_version=1))
    frame = pb.SnapshotRecord(header=pb.SnapshotHeader(magic="kvmd-snapshot")).SerializeToString()
    partial = pb.MigrationMessage(data=varint(len(frame)) + frame).SerializeToString()
    finish = pb.MigrationMessage(finish=pb.MigrationFinish()).SerializeToString()
    refused(lambda: _raw_stream(b, [header_only.SerializeToString(), partial, finish]),
            FAIL.INVALID_ARGUMENT)
    # A source that goes quiet after its token: nothing kept (ABORTED for its stream).
    quiet = pb.MigrationMessage(start=pb.MigrationStart(token=b.prepare("g"),
                                                        format_version=1))
    refused(lambda: _raw_stream(b, [quiet.SerializeToString()]), FAIL.ABORTED,
            "nothing was kept")
    wait_for(lambda: not b.migrations(), 10, "the target to drop them")
    assert b.vm_ids() == [] and b.node.healthy()


def test_a_target_with_a_certificate_from_another_ca_is_refused(
        hosts: tuple[Host, Host], pki: Pki, tmp_path: Path) -> None:
    a, _b = hosts
    stranger = Host(tmp_path / "stranger", pki, "kvmd-stranger", untrusted=True)
    try:
        token = stranger.prepare("w")
        a.boot_working_set("w")
        a.node.start("w")
        err = refused(migrate(a, "w", stranger.target, token), FAIL.UNAVAILABLE,
                      stranger.target)
        assert "TLS" in err.details() or "handshake" in err.details().lower(), err.details()
        untouched(a, stranger, "w")
        assert [m.vm_id for m in stranger.migrations()] == ["w"]  # its token unused
    finally:
        stranger.stop()


def test_plain_tcp_goes_to_loopback_targets_only(tmp_path: Path) -> None:
    plain = Host(tmp_path / "plain", None, "kvmd-plain")
    try:
        plain.boot_working_set("p")
        plain.node.start("p")
        refused(migrate(plain, "p", "192.0.2.1:5000", "t"), FAIL.FAILED_PRECONDITION,
                "plain TCP", "migration TLS")
        vm = plain.vm("p")
        assert vm.state == "running" and vm.migrating_to == ""
    finally:
        plain.stop()
