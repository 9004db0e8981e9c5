"""The client side of a hand-over, against an in-process daemon whose API gate the test
closes and opens (what a hand-over does): calls refused during it are retried (any call:
the daemon did nothing), idempotent ones also on a broken connection; a client fails at
once where no daemon is; consoles resume at their offset; the Handover service is for
admins; StreamConsole's offsets."""

from __future__ import annotations

import grp
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmd.handover import leave_placeholder
from kvmd.server import Config, Daemon, leave_placeholder_socket
from kvmd_client.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from kvmd_client.kvmd_client import KvmdClient
from kvmd_proto import vmm_pb2 as pb


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(Config(listen=[f"unix://{tmp_path}/kvmd.sock"], log_level="warning"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def address(d: Daemon) -> str:
    return d.cfg.listen[0]


def reopen_later(d: Daemon, seconds: float) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        d.gate.open()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_calls_refused_during_a_handover_are_retried(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20) as c:
        c.create_vm("before")
        daemon.gate.close()
        reopen_later(daemon, 0.5)
        started = time.monotonic()
        c.create_vm("during")  # not idempotent, but refused unexecuted: retried once open
        assert time.monotonic() - started >= 0.4
        assert [v.vm_id for v in c.list_vms()] == ["before", "during"]
        daemon.gate.close()
        reopen_later(daemon, 0.3)
        assert c.get_vm("during").vm_id == "during"


def test_without_retries_the_refusal_shows(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20, retry_timeout=0) as c:
        c.create_vm("v")
        daemon.gate.close()
        try:
            with pytest.raises(UnavailableError, match="handing over"):
                c.get_vm("v")
        finally:
            daemon.gate.open()


def test_retries_end_with_the_retry_timeout(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20, retry_timeout=0.5) as c:
        daemon.gate.close()
        try:
            started = time.monotonic()
            with pytest.raises(UnavailableError):
                c.list_vms()
            assert time.monotonic() - started < 5
        finally:
            daemon.gate.open()


def test_no_daemon_is_not_waited_for(tmp_path: Path) -> None:
    """No socket, and no daemon ever answered: only gRPC's own retries (about 3 s,
    kvmd_client.channel.RETRY_POLICY), not retry_timeout (60 s here)."""
    with KvmdClient(f"unix://{tmp_path}/nobody.sock", timeout=20, retry_timeout=60) as c:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            c.list_vms()
        assert time.monotonic() - started < 10


def test_a_placeholder_socket_is_waited_for(tmp_path: Path) -> None:
    """A stopped daemon that kept its VMs leaves a socket nobody listens on: clients wait
    (within retry_timeout) for the next one rather than fail."""
    path = tmp_path / "kvmd.sock"
    leave_placeholder(str(path))
    d = Daemon(Config(listen=[f"unix://{path}"], log_level="warning"))
    starter = threading.Timer(1.0, d.start)
    starter.start()
    try:
        with KvmdClient(f"unix://{path}", timeout=30, retry_timeout=30) as c:
            assert c.list_vms() == []
    finally:
        starter.join()
        d.stop()


def test_a_placeholder_answers_the_sockets_group_with_a_refusal(tmp_path: Path) -> None:
    """The placeholder is of the socket's mode, 0660: a client of the socket's group
    connecting meanwhile is refused (ECONNREFUSED: it waits) rather than denied (EACCES:
    it would give up). The daemon keeps no descriptor of it."""
    path = tmp_path / "kvmd.sock"
    held = len([n for n in os.listdir("/proc/self/fd")])
    leave_placeholder(str(path))
    assert len([n for n in os.listdir("/proc/self/fd")]) == held  # its socket is closed
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, \
            pytest.raises(ConnectionRefusedError):
        sock.connect(str(path))


def test_a_placeholder_has_the_sockets_group(tmp_path: Path) -> None:
    """The placeholder takes the daemon's socket_group, as its socket had: that group's
    clients are refused (and wait), not denied (and give up), also when the daemon's own
    group is another (root, say)."""
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getegid())
    path = tmp_path / "kvmd.sock"
    leave_placeholder_socket(str(path), group.gr_name)
    assert os.stat(path).st_gid == group.gr_gid
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    other = tmp_path / "other.sock"
    leave_placeholder_socket(str(other), "no-such-group-here")  # left, the daemon's group
    assert stat.S_ISSOCK(os.stat(other).st_mode) and os.stat(other).st_gid == os.getegid()


def test_a_console_resumes_at_its_offset(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20) as c:
        c.create_vm("con")
        vm = daemon.host.get_vm("con")  # type: ignore[union-attr]
        vm.console.output(b"hello ")
        stream = c.stream_console("con", backlog=True)
        first = stream.next(10)
        assert first is not None and (first.data, first.offset) == (b"hello ", 0)
        assert stream.next_offset == 6
        vm.console.output(b"world\n")
        second = stream.next(10)
        assert second is not None and (second.data, second.offset) == (b"world\n", 6)
        stream.cancel()
        # Re-opened from an offset: exactly the rest, with its offset.
        again = c.stream_console("con", from_offset=8)
        item = again.next(10)
        assert item is not None and (item.data, item.offset) == (b"rld\n", 8)
        again.cancel()


def test_a_console_that_fell_behind_is_resumed_not_ended(daemon: Daemon) -> None:
    """A reader so far behind that the daemon dropped output for it is ended "lagged": the
    client opens it again from its offset and the output goes on."""
    with KvmdClient(address(daemon), timeout=20) as c:
        c.create_vm("flood")
        vm = daemon.host.get_vm("flood")  # type: ignore[union-attr]
        stream = c.stream_console("flood", backlog=True)
        vm.console.output(b"start")
        assert stream.next(10) is not None
        for _ in range(1024):  # 16 MiB while the client reads nothing
            vm.console.output(b"x" * (16 << 10))
        vm.console.output(b"END")
        deadline = time.monotonic() + 30
        seen = b""
        while not seen.endswith(b"END"):
            assert time.monotonic() < deadline, "the output after the flood never came"
            item = stream.next(10)
            assert item is not None, "the console stream ended"
            seen = (seen + item.data)[-3:]
        assert stream.reopened >= 1
        stream.cancel()


def test_a_watch_whose_daemon_never_comes_back_gives_up_at_the_retry_timeout(
        daemon: Daemon) -> None:
    """Streams ended for a hand-over and the API kept closed: the watch re-opens (refused)
    until retry_timeout, then fails UNAVAILABLE; it does not retry for ever."""
    with KvmdClient(address(daemon), timeout=20, retry_timeout=0.5) as c:
        c.create_vm("gone")
        watch = c.watch_vm("gone", include_current=True)
        assert watch.next(10) is not None
        outcome: list[BaseException | None] = []

        def read() -> None:
            try:
                watch.next(None)
                outcome.append(None)  # returned: an event, or the stream ended
            except BaseException as exc:
                outcome.append(exc)

        daemon.gate.close()
        daemon.end_streams()
        reader = threading.Thread(target=read, daemon=True)
        try:
            reader.start()
            reader.join(15)
            assert not reader.is_alive(), "the watch kept retrying past its retry_timeout"
            assert isinstance(outcome[0], UnavailableError), outcome
        finally:
            watch.cancel()
            daemon.reopen_streams()
            daemon.gate.open()


def test_stream_console_offsets_are_clamped_to_the_backlog(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20) as c:
        c._vms.CreateVm(pb.CreateVmRequest(  # the client has no console_buffer_bytes
            vm_id="small", options=pb.VmOptions(console_buffer_bytes=8)))
        vm = daemon.host.get_vm("small")  # type: ignore[union-attr]
        vm.console.output(b"0123456789abcdef")  # the backlog keeps the last 8 bytes
        item = c.stream_console("small", from_offset=2).next(10)
        assert item is not None and (item.data, item.offset) == (b"89abcdef", 8)  # a gap
        item = c.stream_console("small", from_offset=1000).next(10)  # ahead: from the start
        assert item is not None and item.offset == 8
        assert c.console_backlog("small") == b"89abcdef"


def test_handover_service_is_for_admins(tmp_path: Path) -> None:
    policy = {"identities": [{"name": "local", "role": "operator"}]}
    d = Daemon(Config(listen=[f"unix://{tmp_path}/op.sock"], log_level="warning",
                      authorization=policy))
    d.start()
    try:
        with KvmdClient(f"unix://{tmp_path}/op.sock", timeout=20) as c:
            with pytest.raises(PermissionDeniedError):
                c.list_stranded_vms()
            with pytest.raises(PermissionDeniedError):
                c.retry_stranded_vm("x")
            with pytest.raises(PermissionDeniedError):
                c.handover_report()
    finally:
        d.stop()


def test_handover_service_refusals(daemon: Daemon) -> None:
    with KvmdClient(address(daemon), timeout=20) as c:
        assert c.list_stranded_vms() == [] and c.handover_report().mode == ""
        with pytest.raises(NotFoundError):
            c.retry_stranded_vm("nothing")
        with pytest.raises(NotFoundError):
            c.delete_stranded_vm("nothing")
        with pytest.raises(InvalidArgumentError):
            c.delete_stranded_vm("../x")
        assert c.health() == "SERVING"


def test_kvmctl_rides_out_a_handover(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    from kvmd_client import kvmctl

    daemon.gate.close()
    reopen_later(daemon, 0.5)
    assert kvmctl.main(["--address", address(daemon), "vm", "create", "k1"]) == 0
    daemon.gate.close()
    try:
        assert kvmctl.main(["--address", address(daemon), "--retry-timeout", "0",
                            "vm", "list"]) == 3  # unreachable, without retries
    finally:
        daemon.gate.open()
    capsys.readouterr()
    assert kvmctl.main(["--address", address(daemon), "handover", "report"]) == 0
    assert kvmctl.main(["--address", address(daemon), "handover", "stranded"]) == 0
    out = capsys.readouterr().out
    assert "did not take VMs over" in out and "No stranded VMs." in out
