"""systemd integration of the daemon itself: the Unix socket (mode 0660, the configured
group, its runtime directory), sd_notify READY/STATUS/STOPPING and watchdog pings through a
real NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from deploy_support import Stubs, kvmd_script, notify_socket
from polling import wait_until

from kvmd.server import Config, Daemon

SOCKET_MODE = 0o660


def require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: these tests run the daemon on real KVM")


@pytest.fixture
def socket_group() -> Iterator[grp.struct_group]:
    """A temporary group made for the test (removed after); an existing unprivileged
    group if groupadd is unavailable."""
    name = f"kvmdt{secrets.token_hex(4)}"
    groupadd, groupdel = shutil.which("groupadd"), shutil.which("groupdel")
    if groupadd and groupdel and os.geteuid() == 0:
        subprocess.run([groupadd, "--system", name], check=True, capture_output=True)
        try:
            yield grp.getgrnam(name)
        finally:
            subprocess.run([groupdel, name], check=False, capture_output=True)
        return
    existing = [g for g in grp.getgrall() if g.gr_name in ("kvm", "disk")]
    if not existing:
        pytest.skip("no groupadd and no kvm/disk group to own the socket")
    yield existing[0]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                        "LISTEN_PID")}
    env.update(extra)
    return env


def can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def unprivileged_python() -> str | None:
    """A Python interpreter that an unprivileged user can run (the venv's may live under
    /root)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", candidate,
                 "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


# -- the socket ----------------------------------------------------------------------------

def test_socket_is_0660_with_the_configured_group_in_a_created_runtime_dir(
        short_dir: Path, socket_group: grp.struct_group) -> None:
    require_kvm()
    runtime = short_dir / "run" / "kvmd"
    path = runtime / "kvmd.sock"
    assert not runtime.exists()
    daemon = Daemon(Config(listen=[f"unix://{path}"], socket_group=socket_group.gr_name))
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        daemon.start()
    finally:
        os.umask(old_umask)
    try:
        assert runtime.is_dir(), "the runtime directory was not created"
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == SOCKET_MODE, oct(stat.S_IMODE(st.st_mode))
        assert st.st_gid == socket_group.gr_gid, (st.st_gid, socket_group)
        stubs = Stubs.of(grpc.insecure_channel(f"unix://{path}"))
        assert stubs.serving()
        assert stubs.list_ids() == set()
        stubs.close()
    finally:
        daemon.stop()
    assert not os.path.lexists(path), "the socket outlived the daemon"


def test_only_group_members_may_connect(short_dir: Path,
                                        socket_group: grp.struct_group) -> None:
    """File permissions do the access control of the Unix socket: an unprivileged user
    in the socket's group connects, the same user outside it is refused."""
    require_kvm()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run a client as another user")
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter an unprivileged user may run")
    short_dir.chmod(0o755)  # traversable by others; the socket's own mode decides
    path = short_dir / "kvmd.sock"
    daemon = Daemon(Config(listen=[f"unix://{path}"], socket_group=socket_group.gr_name))
    daemon.start()
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); print('connected')")
    try:
        def connect_as(gid: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["setpriv", "--reuid=65534", f"--regid={gid}", "--clear-groups", python,
                 "-c", probe, str(path)], capture_output=True, text=True, timeout=30,
                check=False)

        member = connect_as(socket_group.gr_gid)
        assert member.returncode == 0 and "connected" in member.stdout, member.stderr
        outsider = connect_as(65534)
        assert outsider.returncode != 0 and "PermissionError" in outsider.stderr, \
            (outsider.stdout, outsider.stderr)
    finally:
        daemon.stop()


# -- sd_notify and the watchdog ------------------------------------------------------------

def recv_until(sock: socket.socket, predicate: str, timeout: float) -> tuple[str, list[str]]:
    """Read datagrams until one contains the line `predicate`; (that one, all read)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {predicate!r} within {timeout}s; got {seen}")
        sock.settimeout(remaining)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(message)
        if predicate in message.splitlines():
            return message, seen


def test_notify_ready_watchdog_and_stopping(short_dir: Path,
                                            socket_group: grp.struct_group) -> None:
    """The kvmd process under a NOTIFY_SOCKET: READY=1 (with STATUS=) once the gRPC socket
    accepts connections, WATCHDOG=1 at about WATCHDOG_USEC/2, STOPPING=1 and exit 0 on
    SIGTERM."""
    require_kvm()
    path = short_dir / "kvmd.sock"
    log_path = short_dir / "kvmd.log"
    with notify_socket(short_dir) as (notify_path, notify), open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [kvmd_script(), "--listen", f"unix://{path}", "--metrics-listen", "off",
             "--socket-group", socket_group.gr_name],
            env=clean_env(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="200000"),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            ready, early = recv_until(notify, "READY=1", 30)
            # At READY the socket is there, connectable, with its final mode and group.
            assert can_connect(str(path)), "READY=1 before the gRPC socket accepts connections"
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == SOCKET_MODE and st.st_gid == socket_group.gr_gid
            assert any(line.startswith("STATUS=") for line in ready.splitlines()), ready
            assert not any("WATCHDOG=1" in m for m in early[:-1]), early

            pings, start = 0, time.monotonic()
            notify.settimeout(0.2)
            while time.monotonic() - start < 1.2:
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                pings += message.splitlines().count("WATCHDOG=1")
            # 100 ms interval: ~12 expected; only a loose lower bound is asserted.
            assert pings >= 3, f"{pings} WATCHDOG=1 pings in 1.2 s at WATCHDOG_USEC=200000"
            assert proc.poll() is None

            proc.send_signal(signal.SIGTERM)
            recv_until(notify, "STOPPING=1", 5)
            assert proc.wait(timeout=5) == 0, log_path.read_text()
            assert not os.path.lexists(path), "the socket outlived the daemon"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_watchdog_pings_stop_while_the_health_check_fails(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the daemon's own health check (KVM answers) gates the pings, so systemd
    restarts a daemon whose KVM handle broke; pings resume when it recovers."""
    require_kvm()
    with notify_socket(short_dir) as (notify_path, notify):
        monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        daemon = Daemon(Config(listen=[f"unix://{short_dir}/kvmd.sock"]))
        daemon.start()
        try:
            recv_until(notify, "READY=1", 10)
            recv_until(notify, "WATCHDOG=1", 5)
            assert daemon.host is not None
            kvm = daemon.host.kvm

            def broken(*args: object) -> int:
                raise OSError(9, "Bad file descriptor")

            monkeypatch.setattr(kvm, "check_extension", broken)
            time.sleep(0.15)  # let a ping already in flight arrive, then drain
            notify.settimeout(0.01)
            try:
                while True:
                    notify.recv(4096)
            except TimeoutError:
                pass
            silent: list[str] = []
            notify.settimeout(0.1)
            end = time.monotonic() + 0.6  # six intervals
            while time.monotonic() < end:
                try:
                    silent.append(notify.recv(4096).decode())
                except TimeoutError:
                    pass
            assert not any("WATCHDOG=1" in m for m in silent), silent

            monkeypatch.undo()
            monkeypatch.setenv("NOTIFY_SOCKET", notify_path)  # for STOPPING=1 below
            recv_until(notify, "WATCHDOG=1", 5)
        finally:
            daemon.stop()
        recv_until(notify, "STOPPING=1", 5)


def test_watchdog_pid_of_another_process_means_no_pings(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID names the process systemd watches; when it is another one, this
    process must not ping (sd_watchdog_enabled semantics)."""
    require_kvm()
    with notify_socket(short_dir) as (notify_path, notify):
        monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
        monkeypatch.setenv("WATCHDOG_USEC", "100000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
        daemon = Daemon(Config(listen=[f"unix://{short_dir}/kvmd.sock"]))
        daemon.start()
        try:
            recv_until(notify, "READY=1", 10)
            assert daemon.watchdog is None
            with pytest.raises(AssertionError):
                recv_until(notify, "WATCHDOG=1", 0.5)
        finally:
            daemon.stop()
        wait_until(lambda: daemon.stopped.is_set(), 5, "the daemon to stop")
