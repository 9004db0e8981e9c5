"""The target's data socket on its own (kvmd.migration.dataplane), over real sockets: what
it refuses besides a wrong secret (test_migration_dataplane has that, through a daemon); and
its traffic keeping the target's stream alive."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

import pytest
from migration_support import Pki

from kvmd.api.migration import _Requests
from kvmd.core.errors import DeadlineExceeded, DomainError, InvalidArgument
from kvmd.migration.dataplane import DataListener, DataSender, client_context, server_context
from kvmd_proto import vmm_pb2 as pb


def test_more_bytes_than_the_finish_counts_are_refused() -> None:
    fed: list[bytes] = []
    listener = DataListener("127.0.0.1", lambda view: fed.append(bytes(view)), None, 30)
    try:
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(listener.secret + b"\x01" * 100)
        time.sleep(0.2)  # all 100 bytes in before the count is checked
        with pytest.raises(InvalidArgument, match="wrote 100 bytes on its data socket, not 60"):
            listener.wait(60, 5)
        listener.wait(100, 5)  # the right count passes
    finally:
        listener.close()


def test_a_tls_data_socket_wants_a_client_certificate(pki: Pki) -> None:
    """The secret alone does not open a TLS data socket: the source must also present a
    certificate the target trusts (mutual TLS, as on the stream)."""
    cert, key = pki.host("target")
    fed: list[bytes] = []
    listener = DataListener("127.0.0.1", lambda view: fed.append(bytes(view)),
                            server_context(cert, key, pki.ca_file), 30)
    try:
        try:
            sender = DataSender("127.0.0.1", listener.port, listener.secret,
                                client_context("", "", pki.ca_file), "localhost", 5)
            sender.send([b"\x02" * 10])
            sender.close()
        except OSError:
            pass  # refused during the handshake, or on the first write after it
        with pytest.raises(DomainError):
            listener.wait(10, 5)
        assert fed == []
    finally:
        listener.close()

    # With its certificate, the same source gets through.
    listener = DataListener("127.0.0.1", lambda view: fed.append(bytes(view)),
                            server_context(cert, key, pki.ca_file), 30)
    try:
        source_cert, source_key = pki.host("source")
        sender = DataSender("127.0.0.1", listener.port, listener.secret,
                            client_context(source_cert, source_key, pki.ca_file), "localhost", 5)
        sender.send([b"\x02" * 10])
        listener.wait(10, 5)
        sender.close()
        assert b"".join(fed) == b"\x02" * 10
    finally:
        listener.close()


class _Silent:
    """A request stream that sends nothing until told, then one message."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    def __aiter__(self) -> _Silent:
        return self

    async def __anext__(self) -> pb.MigrationMessage:
        await self.go.wait()
        return pb.MigrationMessage()


@dataclass
class _Traffic:
    """What the stream's wait reads of a data socket."""

    error: DomainError | None = None
    last_activity: float = field(default_factory=time.monotonic)


@pytest.mark.parametrize("moving", [True, False])
def test_bytes_on_the_data_socket_keep_a_silent_stream_alive(moving: bool) -> None:
    """The source sends pages on its data socket and nothing on the stream meanwhile: that
    is a source alive, not one that went quiet. Without traffic either, the wait ends."""
    idle = 0.5

    async def scenario() -> pb.MigrationMessage | memoryview | None:
        silent, traffic = _Silent(), _Traffic()
        requests = _Requests(silent)

        async def source() -> None:
            for _ in range(int(4 * idle / 0.05)):  # four idle periods of traffic
                if moving:
                    traffic.last_activity = time.monotonic()
                await asyncio.sleep(0.05)
            silent.go.set()

        sending = asyncio.ensure_future(source())
        try:
            return await requests.next(idle, None, traffic)  # type: ignore[arg-type]
        finally:
            sending.cancel()
            requests.close()

    if moving:
        assert asyncio.run(scenario()) == pb.MigrationMessage()
    else:
        with pytest.raises(DeadlineExceeded, match=r"sent nothing for 0\.5 s"):
            asyncio.run(scenario())
