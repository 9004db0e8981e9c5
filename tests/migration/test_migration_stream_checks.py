"""The Migration service's own checks of its calls and of the source's stream, against an
in-process target daemon playing no real source."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from inprocess_daemon import assert_refused, client_of, raw_stubs

from kvmd.migration.incoming import IncomingMigration
from kvmd.server import Daemon
from kvmd_client import KvmdError
from kvmd_client.errors import from_rpc_error
from kvmd_proto import vmm_pb2 as pb

# -- the Migration service ------------------------------------------------------------------

def test_cancel_migration_without_a_vm_id_names_the_missing_field(
        start_daemon: Callable[..., Daemon]) -> None:
    """CancelMigration checks its id as every call acting on a reserved id does: an empty
    vm_id is INVALID_ARGUMENT / FIELD_REQUIRED with a violation of field vm_id."""
    daemon = start_daemon()
    with client_of(daemon) as client:
        err = assert_refused(lambda: client.cancel_migration(""),
                              grpc.StatusCode.INVALID_ARGUMENT, "FIELD_REQUIRED")
        assert [v.field for v in err.field_violations] == ["vm_id"]


def _receive(daemon: Daemon, *after_start: pb.MigrationMessage
             ) -> tuple[list[str], KvmdError | None]:
    """Prepare an incoming migration of "in-1" and play the source's side of its stream:
    the start with the token, then `after_start`. The replies' kinds, and the error that
    ended the stream (None if it ended OK)."""
    stubs = raw_stubs(daemon)
    try:
        token = stubs.migration.PrepareIncomingMigration(
            pb.PrepareIncomingMigrationRequest(vm_id="in-1"), timeout=10).token
        start = pb.MigrationMessage(start=pb.MigrationStart(token=token, source_vm_id="src"))
        replies: list[str] = []
        try:
            for reply in stubs.migration.ReceiveMigration(iter([start, *after_start]),
                                                          timeout=20):
                replies.append(str(reply.WhichOneof("reply")))
        except grpc.RpcError as err:
            return replies, from_rpc_error(err)  # type: ignore[arg-type]
        return replies, None
    finally:
        stubs.close()


def test_a_finish_counting_data_socket_bytes_without_a_data_socket_is_refused(
        start_daemon: Callable[..., Daemon]) -> None:
    """ReceiveMigration: a finish that counts data-socket bytes on a stream that was offered
    no data socket is INVALID_ARGUMENT / STREAM_INVALID, and the reserved id is free again."""
    daemon = start_daemon()
    replies, err = _receive(daemon, pb.MigrationMessage(
        finish=pb.MigrationFinish(data_bytes=4096)))
    assert replies == ["accepted"]
    assert err is not None and (err.code, err.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, "STREAM_INVALID"), str(err)
    with client_of(daemon) as client:
        assert client.create_vm("in-1").vm_id == "in-1"


def test_an_unexpected_message_in_a_migration_stream_is_refused(
        start_daemon: Callable[..., Daemon]) -> None:
    """ReceiveMigration: a second start mid-stream is INVALID_ARGUMENT / STREAM_INVALID
    (not skipped until the stream ends), and the reserved id is free again."""
    daemon = start_daemon()
    token_free = pb.MigrationMessage(start=pb.MigrationStart(token="x" * 64))
    replies, err = _receive(daemon, token_free)
    assert replies == ["accepted"]
    assert err is not None and (err.code, err.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, "STREAM_INVALID"), str(err)
    assert "unexpected start message" in err.message
    with client_of(daemon) as client:
        assert client.create_vm("in-1").vm_id == "in-1"


def test_a_stream_cancelled_during_its_release_is_listed_until_its_id_is_free(
        start_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch) -> None:
    """A source whose stream ends without a commit, then is cancelled while the target
    releases what it holds: the release runs on in the pool, and the migration stays in
    ListMigrations until it is done, so an orchestrator that waits for the listing to empty
    can prepare the id again at once. (The release is slowed so the cancel lands in it; the
    migration was listed as gone while its id was still reserved: ALREADY_EXISTS.)"""
    daemon = start_daemon()
    aborting = threading.Event()
    real_abort = IncomingMigration.abort

    def slow_abort(self: IncomingMigration) -> None:
        aborting.set()
        time.sleep(0.5)
        real_abort(self)

    monkeypatch.setattr(IncomingMigration, "abort", slow_abort)
    stubs = raw_stubs(daemon)
    try:
        token = stubs.migration.PrepareIncomingMigration(
            pb.PrepareIncomingMigrationRequest(vm_id="in-1"), timeout=10).token
        start = pb.MigrationMessage(start=pb.MigrationStart(token=token, source_vm_id="src"))
        accepted = threading.Event()

        def requests() -> Iterator[pb.MigrationMessage]:
            yield start
            accepted.wait(30)  # then the source ends its side: no commit

        call = stubs.migration.ReceiveMigration(requests(), timeout=30)
        assert next(call).WhichOneof("reply") == "accepted"
        accepted.set()
        assert aborting.wait(15), "the target never released the migration"
        call.cancel()
        deadline = time.monotonic() + 15
        while stubs.migration.ListMigrations(pb.ListMigrationsRequest()).migrations:
            assert time.monotonic() < deadline, "the migration stayed listed"
            time.sleep(0.01)
        assert stubs.migration.PrepareIncomingMigration(
            pb.PrepareIncomingMigrationRequest(vm_id="in-1"), timeout=10).token
    finally:
        stubs.close()
