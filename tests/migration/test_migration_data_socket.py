"""The target's data socket on its own (kvmd.migration.dataplane), over real sockets: what
it refuses besides a wrong secret (test_migration_dataplane has that, through a daemon)."""

from __future__ import annotations

import socket
import time

import pytest
from migration_support import Pki

from kvmd.core.errors import DomainError, InvalidArgument
from kvmd.migration.dataplane import DataListener, DataSender, client_context, server_context


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
