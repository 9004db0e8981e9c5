"""The target's data socket (kvmd.migration.dataplane.DataListener) over real sockets: its
secret, and how it tells a source that ended early, went silent before its secret, or never
connected from one that is only slow; and that received bytes count as the source being
alive (the stream's idle timeout watches last_activity)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvmd.core.errors import Unavailable
from kvmd.migration.dataplane import DataListener

IDLE = 0.3  # the listener's idle timeout in these tests (the daemon's is much longer)
WAIT = 20  # what the tests' waits allow: far beyond IDLE


@pytest.fixture
def listener() -> Iterator[DataListener]:
    fed: list[bytes] = []
    listener = DataListener("127.0.0.1", lambda view: fed.append(bytes(view)), None, IDLE)
    yield listener
    listener.close()


def test_each_data_socket_has_its_own_32_byte_secret(listener: DataListener) -> None:
    other = DataListener("127.0.0.1", lambda view: None, None, IDLE)
    try:
        assert len(listener.secret) == len(other.secret) == 32
        assert listener.secret != other.secret
    finally:
        other.close()


def test_a_source_that_ends_early_fails_the_wait_at_once(listener: DataListener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        sock.sendall(listener.secret + b"\x01" * 10)
    with pytest.raises(Unavailable, match="ended after 10 of 100 bytes"):
        listener.wait(100, WAIT)


def test_received_bytes_count_as_activity(listener: DataListener) -> None:
    before = listener.last_activity
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        sock.sendall(listener.secret + b"\x01" * 10)
        listener.wait(10, WAIT)
    assert listener.last_activity > before


def test_a_source_may_pause_longer_than_the_idle_timeout_after_its_secret(
        listener: DataListener) -> None:
    """Past the secret the socket blocks: a source that is merely slow (the stream has its
    own idle timeout) is not cut off by the socket's."""
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        sock.sendall(listener.secret)
        time.sleep(3 * IDLE)
        sock.sendall(b"\x01" * 10)
        listener.wait(10, WAIT)
    assert listener.error is None


def test_a_connection_that_never_sends_its_secret_is_dropped(listener: DataListener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port)), \
            pytest.raises(Unavailable, match="data socket broke"):
        listener.wait(1, WAIT)
    assert listener.error is not None


def test_a_source_that_never_connects_ends_the_listener(listener: DataListener) -> None:
    """(It sends on the stream instead.) The one-shot port stops listening after IDLE."""
    with pytest.raises(Unavailable, match="ended after 0 of 1 bytes"):
        listener.wait(1, WAIT)


def test_closing_the_listener_ends_it_while_the_source_is_connected_and_silent() -> None:
    """The target gives up (a cancel, the stream failed) while the source still holds the
    socket open: close() must wake the receiving thread, not wait for the source."""
    listener = DataListener("127.0.0.1", lambda view: None, None, IDLE)
    with socket.create_connection(("127.0.0.1", listener.port)) as sock:
        sock.sendall(listener.secret + b"\x01" * 10)
        listener.wait(10, WAIT)
        time.sleep(0.5)  # the receiving thread back in its blocking read
        closing = threading.Thread(target=listener.close, daemon=True)
        closing.start()
        closing.join(WAIT)
        assert not closing.is_alive(), "close() waits for a silent source"
        assert sock.recv(1) == b""  # and the source sees the socket end
