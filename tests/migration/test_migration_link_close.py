"""Closing the source's link (kvmd.migration.transport.GrpcTransport.close: a cancel, or the
migration ending) wakes a send blocked on the target's data socket at once: the data
socket is closed too, not left to its timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from migration_support import fake_target

from kvmd.core.errors import Aborted, DomainError, InvalidState
from kvmd.migration.precopy import MigrationOptions
from kvmd.migration.transport import GrpcTransport
from kvmd_proto import vmm_pb2 as pb

FRAME = bytes(1 << 20)


def test_closing_the_link_wakes_a_send_blocked_on_the_data_socket() -> None:
    # The target's data socket: connections wait in its backlog, and nothing is read.
    data = socket.socket()
    data.bind(("127.0.0.1", 0))
    data.listen(1)
    release = threading.Event()

    def receive(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        pb.MigrationMessage.FromString(next(requests))  # the start
        yield pb.MigrationReply(accepted=pb.MigrationAccepted(
            vm_id="v", data_port=data.getsockname()[1], data_secret=b"s" * 32)
        ).SerializeToString()
        release.wait(60)

    server, address = fake_target(receive)
    # The longest timeout there is: only the close can end the send within the test.
    transport = GrpcTransport(address, "token", None,
                              MigrationOptions(timeout_ms=600_000))
    errors: list[DomainError] = []
    blocked = threading.Event()

    def send() -> None:
        try:
            for _ in range(1000):  # 1 GiB: far more than the socket buffers hold
                blocked.set()
                transport.send([FRAME])
        except DomainError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    try:
        assert transport.start("v") == "v"
        assert transport._data is not None  # the bytes go on the data socket
        sender.start()
        assert blocked.wait(30)
        sent = -1
        while transport._data.sent != sent:  # until the socket buffers are full
            sent = transport._data.sent
            time.sleep(0.5)
        transport.close()
        sender.join(30)
        assert not sender.is_alive(), "the send stayed blocked on the data socket"
        assert len(errors) == 1 and isinstance(errors[0], Aborted), errors
    finally:
        release.set()
        transport.close()
        server.stop(None)
        data.close()


def test_a_target_failing_says_why_though_its_data_socket_broke_first() -> None:
    """The target gives up (it could not build the VM) and closes its data socket a moment
    before the stream carries its reason: the source reports the target's reason, not
    only a broken data link."""
    data = socket.socket()
    data.bind(("127.0.0.1", 0))
    data.listen(1)

    def receive(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        pb.MigrationMessage.FromString(next(requests))  # the start
        yield pb.MigrationReply(accepted=pb.MigrationAccepted(
            vm_id="v", data_port=data.getsockname()[1], data_secret=b"s" * 32)
        ).SerializeToString()
        conn, _ = data.accept()
        conn.recv(1 << 16)  # the secret and the first bytes; the rest stays unread
        conn.close()  # unread bytes: the source gets a reset
        time.sleep(0.05)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the target could not build the VM")

    server, address = fake_target(receive)
    transport = GrpcTransport(address, "token", None,
                              MigrationOptions(timeout_ms=30_000))
    try:
        assert transport.start("v") == "v"
        with pytest.raises(DomainError) as err:
            for _ in range(1000):
                transport.send([FRAME])
        assert isinstance(err.value, InvalidState), err.value
        assert "could not build the VM" in err.value.message
    finally:
        transport.close()
        server.stop(None)
        data.close()
