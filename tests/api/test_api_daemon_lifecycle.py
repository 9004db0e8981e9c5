"""The in-process daemon's start-up and shutdown: what it does to the socket path, the
process and health watchers when it starts, fails to start, or stops (twice)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_daemon import address

from kvmd.server import Config, ConfigError, Daemon

# -- start-up: the listeners ----------------------------------------------------------------

def test_a_regular_file_at_the_socket_path_is_refused_and_kept(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A file that is not a socket where the socket should go: the daemon refuses to start
    and leaves the file alone (it replaces stale sockets only)."""
    path = tmp_path / "precious.sock"
    path.write_bytes(b"not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        start_daemon(listen=[f"unix://{path}"])
    assert path.read_bytes() == b"not a socket"


def test_a_failed_start_removes_the_sockets_it_already_bound(
        tmp_path: Path) -> None:
    """The second listener cannot be bound: start() fails, and the first listener's socket,
    already created, is removed by start() itself (not left for a stop() the caller may
    never make)."""
    first, second = tmp_path / "first.sock", tmp_path / "second.sock"
    second.write_bytes(b"in the way")
    daemon = Daemon(Config(listen=[f"unix://{first}", f"unix://{second}"],
                           log_level="warning"))
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            daemon.start()
        assert not first.exists(), "a failed start() left its first socket behind"
    finally:
        daemon.stop()


def test_binding_a_unix_socket_restores_the_process_umask(
        start_daemon: Callable[..., Daemon]) -> None:
    """The socket is bound under a strict umask (born 0660); the process's umask is put back
    afterwards, so files created later by the daemon, or by the program embedding it, get
    their usual modes."""
    before = os.umask(0o022)
    try:
        start_daemon()
        now = os.umask(0o022)
        assert oct(now) == oct(0o022)
    finally:
        os.umask(before)


# -- shutdown ---------------------------------------------------------------------------------

def test_stop_tells_health_watchers_not_serving(start_daemon: Callable[..., Daemon]) -> None:
    """A grpc.health.v1 Watch open when the daemon stops sees NOT_SERVING (load balancers,
    supervisors and kvmd-client's wait_ready learn of the shutdown from it) instead of a
    stream that merely breaks."""
    daemon = start_daemon()
    channel = grpc.insecure_channel(address(daemon))
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=30)
    stopper = threading.Thread(target=daemon.stop)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper.start()
        try:
            status = next(watch).status
        except grpc.RpcError as err:
            status = err.code()  # type: ignore[attr-defined]
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        watch.cancel()
        if stopper.ident is not None:  # started
            stopper.join(15)
        channel.close()
    assert not stopper.is_alive()


def test_a_second_stop_does_nothing(start_daemon: Callable[..., Daemon],
                                    caplog: pytest.LogCaptureFixture) -> None:
    """stop() runs once: a second call (an embedding's cleanup after the signal handler's)
    returns False and neither repeats the shutdown nor logs "kvmd stopped" again."""
    daemon = start_daemon()
    with caplog.at_level(logging.INFO, logger="kvmd"):
        assert daemon.stop() is False
        assert daemon.stop() is False
    assert [r.getMessage() for r in caplog.records].count("kvmd stopped") == 1


# -- the client: retries across restarts, deadlines ------------------------------------------
