"""kvmd.systemd's side of systemd's protocols on its own, against real sockets: notify to an
abstract socket, the fd store's barrier, the fds a started daemon takes from LISTEN_*, and
the watchdog's interval."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from kvmd.systemd import barrier, fd_name_valid, fd_store, notify, watchdog_interval


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in the abstract namespace, named by NOTIFY_SOCKET ("@...") as
    systemd does in containers."""
    name = f"kvmd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_notify_reaches_an_abstract_socket(manager: socket.socket) -> None:
    assert notify("READY=1")
    assert manager.recv(4096) == b"READY=1"


def test_fd_store_returns_only_once_the_manager_has_processed_its_messages(
        manager: socket.socket) -> None:
    """FDSTORE for each fd, then BARRIER=1 with a pipe's write end: fd_store waits until the
    manager closes it (it has read everything before), so the daemon may exit right after."""
    got: list[str] = []
    closed = threading.Event()

    def serve() -> None:
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(manager, 4096, 4)
            got.append(msg.decode())
            if msg == b"BARRIER=1":
                time.sleep(0.3)  # a busy manager
                closed.set()
            for fd in fds:
                os.close(fd)
            if msg == b"BARRIER=1":
                return

    reader = threading.Thread(target=serve)
    reader.start()
    r, w = os.pipe()
    try:
        fd_store({"kvmd-mem.0.a": r})
        assert closed.is_set()  # not before the manager let the barrier go
    finally:
        os.close(r)
        os.close(w)
        reader.join(10)
    assert got == ["FDSTORE=1\nFDNAME=kvmd-mem.0.a", "BARRIER=1"]


def test_a_barrier_nobody_answers_times_out(manager: socket.socket) -> None:
    with pytest.raises(OSError, match="did not process the notify messages"):
        barrier(timeout=0.3)  # the manager reads nothing; its queue keeps the fd open


def test_fd_names_are_checked_at_systemds_length_limit() -> None:
    assert fd_name_valid("a" * 255)
    assert not fd_name_valid("a" * 256)


# In a child of its own: LISTEN_FDS numbers fds from 3, which this process may be using.
LISTEN_CHILD = r"""
import fcntl, json, os, sys
r, w = os.pipe()
if r != 3:
    os.dup2(r, 3)
os.set_inheritable(3, True)  # as systemd passes it
pid = os.getpid() if sys.argv[1] == "mine" else os.getppid()
os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS="1", LISTEN_FDNAMES="kvmd-mem.0.a")
from kvmd.systemd import listen_fds
got = listen_fds()
print(json.dumps({"fds": got, "cloexec": bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                  "left": [k for k in os.environ if k.startswith("LISTEN_")]}))
"""


@pytest.mark.parametrize("whose", ["mine", "another process's"])
def test_listen_fds_are_taken_only_when_meant_for_this_process(whose: str) -> None:
    out = subprocess.run([sys.executable, "-c", LISTEN_CHILD, whose.split()[0]],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    result = json.loads(out)
    assert result["left"] == []  # never passed on to children
    if whose == "mine":
        assert result["fds"] == [["kvmd-mem.0.a", 3]]
        assert result["cloexec"]  # guest memory is not inherited by children
    else:
        assert result["fds"] == []  # variables inherited from elsewhere name no fd of ours
        assert not result["cloexec"]


@pytest.mark.parametrize(("usec", "pid", "interval"), [
    ("200000", None, 0.1),            # half what systemd asks: a ping is never late
    ("200000", "mine", 0.1),
    ("200000", "another", None),      # meant for another process
    ("abc", None, None),
    (None, None, None),               # no watchdog
])
def test_the_watchdog_pings_at_half_the_interval_systemd_asks_for(
        monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
        interval: float | None) -> None:
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, {"mine": str(os.getpid()),
                                     "another": str(os.getpid() + 1)}.get(value, value))
    assert watchdog_interval() == interval
