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
from pathlib import Path
from typing import Any

import pytest
from polling import wait_until

from kvmd.systemd import (
    Watchdog,
    barrier,
    fd_name_valid,
    fd_store,
    listen_fds,
    notify,
    notify_fds,
    watchdog_interval,
)


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
        held = sorted(os.listdir("/proc/self/fd"))
        fd_store({"kvmd-mem.0.a": r})
        assert closed.is_set()  # not before the manager let the barrier go
        reader.join(10)
        assert sorted(os.listdir("/proc/self/fd")) == held  # the barrier's pipe is closed
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


@pytest.mark.parametrize(("name", "valid"), [
    ("kvmd-mem.0.a b", True), ("~", True), ("", True),  # printable ASCII, space and all
    ("a:b", False),                                     # LISTEN_FDNAMES's separator
    ("a\x7f", False), ("a\x1f", False), ("a\n", False), ("\u00e9", False),
])
def test_fd_names_are_checked_as_systemd_checks_them(name: str, valid: bool) -> None:
    """fd_name_valid is systemd's fdname_is_valid: every printable ASCII character but ':'
    (a name systemd would refuse is never sent: the memfd would be lost)."""
    assert fd_name_valid(name) is valid


def test_fd_store_refuses_a_name_systemd_would_refuse_before_sending_anything(
        manager: socket.socket) -> None:
    """An invalid FDNAME would make systemd drop the fd (and the guest memory with it):
    fd_store raises ValueError instead, and the manager receives nothing."""
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a valid fd store name"):
            fd_store({"kvmd-mem.0.a:b": r})
    finally:
        os.close(r)
        os.close(w)
    manager.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.recv(4096)


def test_notify_without_a_manager_listening_says_so_and_does_not_raise(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A notify socket that is gone (systemd restarted, a stale NOTIFY_SOCKET): notify
    returns False and logs, it never raises into the daemon; notify_fds, whose caller
    stores fds, raises."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("READY=1") is False
    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            notify_fds("FDSTORE=1\nFDNAME=kvmd-mem.0.a", [r])
    finally:
        os.close(r)
        os.close(w)


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


# fds 3 and 5 passed, 4 not open (closed meanwhile); LISTEN_FDNAMES as argv[1] says.
GAPPED_CHILD = r"""
import json, os, sys
r, w = os.pipe()
os.dup2(r, 3)
os.dup2(w, 5)
for fd in {r, w} - {3, 5}:
    os.close(fd)
for fd in (3, 5):
    os.set_inheritable(fd, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3")
if sys.argv[1]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[1]
from kvmd.systemd import listen_fds
print(json.dumps(listen_fds()))
"""


@pytest.mark.parametrize(("names", "expected"), [
    ("kvmd-mem.0.a:kvmd-mem.0.b", [["kvmd-mem.0.a", 3], ["unknown", 5]]),
    ("", [["unknown", 3], ["unknown", 5]]),
])
def test_listen_fds_skips_an_fd_that_is_not_open_and_names_the_unnamed_unknown(
        names: str, expected: list[list[Any]]) -> None:
    """LISTEN_FDS=3 with fd 4 not open, and fewer names than fds or none: the open fds are
    taken (never a crash at start, which would lose every VM), those without a name as
    "unknown" (later closed as no VM's memfd)."""
    out = subprocess.run([sys.executable, "-c", GAPPED_CHILD, names], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out) == expected


@pytest.mark.parametrize("count", ["", "two", "-1", "1 "])
def test_a_listen_fds_that_is_no_count_passes_nothing(monkeypatch: pytest.MonkeyPatch,
                                                      count: str) -> None:
    """LISTEN_FDS that is not a number (even with this process's LISTEN_PID) names no fd:
    nothing is taken, nothing raises, and the variables are still removed."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    monkeypatch.setenv("LISTEN_FDNAMES", "kvmd-mem.0.a")
    assert listen_fds() == []
    assert not [k for k in os.environ if k.startswith("LISTEN_")]


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


def test_a_health_check_that_raises_stops_the_watchdog_pings(manager: socket.socket) -> None:
    """A health check that raises counts as failed: no WATCHDOG=1 after it (systemd then
    restarts the daemon), as after one that returns False."""
    checks: list[int] = []

    def healthy() -> bool:
        checks.append(1)
        if len(checks) > 2:
            raise RuntimeError("the health check itself is broken")
        return True

    dog = Watchdog(0.01, healthy)
    dog.start()
    try:
        wait_until(lambda: len(checks) >= 6, 10, "six health checks")
    finally:
        dog.stop()
    manager.setblocking(False)
    got = []
    while True:
        try:
            got.append(manager.recv(4096))
        except BlockingIOError:
            break
    assert got == [b"WATCHDOG=1"] * 2
