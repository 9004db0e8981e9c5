"""The target's side (kvmd.migration.incoming) on a real Host, without gRPC: a token opens
one migration, whole and once; what a cancel, an abort or the daemon's stop releases; the
order of a migration stream (data, finish, commit) and what follows a commit."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from guests import SPIN, boot

from kvmd.core.errors import (
    AlreadyExists,
    InvalidArgument,
    InvalidState,
    PermissionDenied,
    Reason,
)
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.migration.incoming import (
    COMMITTED,
    MAX_TTL_SECONDS,
    IncomingMigrations,
)
from kvmd.state.format import FORMAT_VERSION
from kvmd.state.snapshot import SnapshotTaker


@pytest.fixture
def incoming(host: Host) -> Iterator[IncomingMigrations]:
    migrations = IncomingMigrations(host)
    yield migrations
    migrations.close()


def id_is_free(host: Host, vm_id: str) -> bool:
    try:
        host.reserve_id(vm_id, "probe")
    except AlreadyExists:
        return False
    host.release_id(vm_id)
    return True


def snapshot_of_a_vm(host: Host) -> bytes:
    vm = host.create_vm("source", {}, VmOptions())
    boot(vm, SPIN)
    data = b"".join(SnapshotTaker(vm))
    host.delete_vm("source")
    return data


def test_a_token_opens_one_migration_only(incoming: IncomingMigrations) -> None:
    token = incoming.prepare("in", "local").token
    incoming.claim(token, "peer")
    with pytest.raises(PermissionDenied) as err:
        incoming.claim(token, "peer")
    assert err.value.reason == Reason.MIGRATION_TOKEN_INVALID


def test_only_the_whole_token_opens_it(incoming: IncomingMigrations) -> None:
    token = incoming.prepare("in", "local").token
    assert len(token) == 64
    for wrong in ("", token[:32], token[:-1], token + "0", token[:-1] + "x"):
        with pytest.raises(PermissionDenied):
            incoming.claim(wrong, "peer")
    assert incoming.claim(token, "peer").vm_id == "in"  # the wrong ones did not spend it


def test_a_token_expires_when_its_ttl_says(incoming: IncomingMigrations) -> None:
    before = time.time()
    expires = incoming.prepare("in", "local", ttl_seconds=60).expires_unix_ms
    assert int((before + 60) * 1000) <= expires <= (time.time() + 60) * 1000
    assert incoming.prepare("longest", "local", ttl_seconds=MAX_TTL_SECONDS)
    with pytest.raises(InvalidArgument) as err:
        incoming.prepare("too-long", "local", ttl_seconds=MAX_TTL_SECONDS + 1)
    assert err.value.field == "ttl_seconds"


def test_cancelling_a_prepared_migration_frees_its_id(host: Host,
                                                      incoming: IncomingMigrations) -> None:
    token = incoming.prepare("in", "local").token
    assert not id_is_free(host, "in")
    assert incoming.cancel("in")
    assert id_is_free(host, "in")
    with pytest.raises(PermissionDenied):
        incoming.claim(token, "peer")
    assert not incoming.cancel("in")


def test_the_daemon_stopping_voids_tokens_and_frees_their_ids(
        host: Host, incoming: IncomingMigrations) -> None:
    token = incoming.prepare("in", "local").token
    incoming.close()
    assert id_is_free(host, "in")
    with pytest.raises(PermissionDenied):
        incoming.claim(token, "peer")


def test_an_abort_before_the_restore_began_frees_the_id(
        host: Host, incoming: IncomingMigrations) -> None:
    """A source sending a newer snapshot format is refused before anything is built; the
    stream's end then releases the id."""
    migration = incoming.claim(incoming.prepare("in", "local").token, "peer")
    with pytest.raises(InvalidState) as err:
        migration.begin("src", FORMAT_VERSION + 1)
    assert err.value.reason == Reason.SNAPSHOT_INCOMPATIBLE
    migration.abort()
    assert id_is_free(host, "in")


def test_a_migration_stream_goes_data_finish_commit_and_then_stays(
        host: Host, incoming: IncomingMigrations) -> None:
    data = snapshot_of_a_vm(host)
    migration = incoming.claim(incoming.prepare("in", "local").token, "peer")
    migration.begin("source", FORMAT_VERSION)
    migration.feed(data)
    with pytest.raises(InvalidArgument) as err:
        migration.commit()  # before the finish: the VM is not ready
    assert err.value.reason == Reason.STREAM_INVALID
    migration.finish()
    with pytest.raises(InvalidArgument) as err:
        migration.feed(data[:16])  # after the finish: nothing more may change the VM
    assert err.value.reason == Reason.STREAM_INVALID
    vm = migration.commit()
    assert migration.state == COMMITTED
    # Committed: a cancel is too late, and the stream's end keeps the VM.
    assert not incoming.cancel("in")
    assert not migration.cancelled
    migration.abort()  # a no-op once committed
    assert migration.state == COMMITTED
    incoming.ended(migration)
    assert host.get_vm("in") is vm and not vm.closed
    assert incoming.list() == []
