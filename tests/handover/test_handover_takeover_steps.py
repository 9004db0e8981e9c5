"""`kvmd --take-over` between in-process daemons (real /dev/kvm, the real hand-over socket):
what the old daemon refuses and how it rolls back when the new one fails, what the new one
refuses to commit, what travels (crash counts, a stranded VM's earlier reason), and what
each side lets go of (memory of a VM deleted later, a stranded VM's id)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from guests import boot as boot_core
from handover_support import boot, memfd_descriptors, wait_until
from inprocess_daemon import client_of

from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.handover import Channel, Handover, HandoverError, socket_path
from kvmd.server import Config, Daemon
from kvmd.state import handover as carry

UNCLAIMED_OUT = bytes([
    0xBA, 0x34, 0x12,  # mov dx, 0x1234 (no device there)
    0xEE,              # out dx, al: a strict-IO VM crashes here
    0xF4,              # hlt (not reached)
])


@pytest.fixture
def old(start_daemon: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    """The running daemon, on tmp_path/kvmd.sock (its hand-over socket beside it)."""
    return start_daemon(listen=[f"unix://{tmp_path}/kvmd.sock"],
                        runtime_dir=str(tmp_path / "run-old"))


@pytest.fixture
def take_over(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon with --take-over on the same socket (Config fields as keywords); each
    is stopped after the test, started or not."""
    started: list[Daemon] = []

    def start(**config: Any) -> Daemon:
        config.setdefault("log_level", "warning")
        daemon = Daemon(Config(listen=[f"unix://{tmp_path}/kvmd.sock"],
                               runtime_dir=str(tmp_path / f"run-{len(started)}"), **config),
                        take_over=True)
        started.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in reversed(started):
        daemon.stop()


def took_over(old: Daemon, take_over: Callable[..., Daemon], **config: Any) -> Daemon:
    """Take over from `old` (Config fields as keywords) and stop `old` once it has let go
    of its VMs: the new daemon, serving them."""
    new = take_over(**config)
    assert old.exit_requested.wait(10)
    old.stop()
    return new


def hand_over_socket(daemon: Daemon) -> str:
    return socket_path(daemon.cfg.listen[0].removeprefix("unix://"))


def fake_new_daemon(daemon: Daemon, version: int = 1) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(hand_over_socket(daemon))
    chan = Channel(sock)
    chan.send_json({"op": "hello", "version": version, "kvmd_version": "fake", "pid": 0})
    return chan


def memfd_inodes() -> set[int]:
    """Inodes of the memfds this process holds open."""
    return set(memfd_descriptors())


def test_the_handover_socket_is_for_the_daemons_user_only(old: Daemon) -> None:
    """The hand-over socket (it gives every VM away) is a socket of mode 0600."""
    mode = os.stat(hand_over_socket(old)).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


# Run as another user: connect to the hand-over socket by its name in the working directory,
# send a hello, print (hex) the head of the daemon's answer, or nothing when it closes.
OTHER_USER_HELLO = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
hello = json.dumps({"op": "hello", "version": 1, "kvmd_version": "x", "pid": 0}).encode()
got = b""
try:  # a refusing daemon may close before the hello is sent
    s.sendall(struct.pack(">IB", len(hello), ord("J")) + hello)
    s.settimeout(20)
    while len(got) < 5 and (chunk := s.recv(4096)):  # a frame's head, or the close
        got += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print(got.hex())
"""


def test_a_peer_of_another_user_is_refused_even_when_it_can_reach_the_socket(
        old: Daemon) -> None:
    """The socket's mode keeps other users out; behind it, the peer's credentials are
    checked too: a hello from another user (the socket opened to everyone here) is answered
    with nothing, and nothing stops or pauses."""
    c = client_of(old)
    boot(c, "v1")
    path = Path(hand_over_socket(old))
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)
    nobody = 65534
    done = subprocess.run(["/usr/bin/python3", "-I", "-c", OTHER_USER_HELLO, path.name],
                          cwd=path.parent, user=nobody, group=nobody, extra_groups=[],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", "the other user's hello was answered"
    assert c.get_vm("v1").state == "running" and not old.exit_requested.is_set()
    c.close()


def test_a_hello_of_another_protocol_version_is_refused_before_anything_stops(
        old: Daemon) -> None:
    """A new daemon speaking another hand-over protocol is refused with the versions
    named; the old daemon never closed its API nor paused its VMs."""
    c = client_of(old)
    boot(c, "v1", irqs=True)
    chan = fake_new_daemon(old, version=2)
    try:
        kind, message, fds = chan.recv(10)
    finally:
        chan.close()
    assert (kind, message, fds) == ("J", {"op": "refused", "reason": "hand-over protocol 2, "
                                          "this daemon speaks 1"}, [])
    assert c.get_vm("v1").state == "running" and not old.exit_requested.is_set()
    c.close()


def receive_and_abort(daemon: Daemon) -> list[str]:
    """Be a new daemon that takes everything the old one sends (closing the fds), then
    aborts; the names of the fds it got."""
    names: list[str] = []
    chan = fake_new_daemon(daemon)
    try:
        chan.expect("accepted", 10)
        chan.expect("manifest", 30)
        while True:
            kind, message, fds = chan.recv(30)
            for fd in fds:
                os.close(fd)
            if kind == "F":
                names.extend(message)
            if kind == "J" and message["op"] == "sent":
                break
        chan.send_json({"op": "abort", "reason": "the test says no"})
    finally:
        chan.close()
    return names


def test_a_failed_take_over_leaves_a_vm_the_user_paused_paused(old: Daemon) -> None:
    """The new daemon aborts after receiving everything: the old one runs again the VMs
    that were running, and leaves the one its user had paused paused; the hand-over's hold
    on them is gone (their user may pause and resume them again)."""
    c = client_of(old)
    boot(c, "running", irqs=True)
    boot(c, "paused", irqs=True)
    c.pause_vm("paused")
    receive_and_abort(old)
    # The API opens again only once the VMs were resumed.
    wait_until(lambda: c.get_vm("running").state == "running", 30, "the old daemon to serve")
    assert c.get_vm("paused").state == "paused"
    assert not old.exit_requested.is_set()
    c.resume_vm("paused")
    c.pause_vm("running")
    assert (c.get_vm("paused").state, c.get_vm("running").state) == ("running", "paused")
    c.close()


def test_a_new_daemon_that_restores_nothing_does_not_take_over(
        old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """If not one VM can be restored in the new daemon (its per-VM memory limit is below
    the VM's), it fails with the reason and never commits: the old daemon keeps its VM
    running and serves on."""
    c = client_of(old)
    boot(c, "big", irqs=True)  # 256 KiB of guest memory
    with pytest.raises(HandoverError, match=r"no VM could be restored.*big"):
        take_over(max_memory_per_vm_bytes=1 << 16)
    wait_until(lambda: c.get_vm("big").state == "running", 30, "the old daemon to serve")
    assert not old.exit_requested.is_set()
    c.close()


def test_memory_of_a_handed_over_vm_is_freed_when_the_new_daemon_deletes_it(
        old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """The new daemon holds a VM's memfds only through the VM: once it is deleted there
    (and the old daemon is gone), no descriptor of its memory stays open."""
    before = memfd_inodes()
    c = client_of(old)
    c.create_vm("m")
    c.add_memory_region("m", 0, 1 << 16)
    c.write_memory("m", 0x1000, b"kept")
    guest_memory = memfd_inodes() - before
    assert guest_memory
    c.close()
    new = took_over(old, take_over)
    n = client_of(new)
    assert n.read_memory("m", 0x1000, 4) == b"kept"
    n.delete_vm("m")
    n.close()
    assert not guest_memory & memfd_inodes()


def test_crash_counts_cross_a_take_over(old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """The VM crashes counted by kind (kvmd_vm_crashes) continue in the new daemon."""
    assert old.host is not None
    vm = old.host.create_vm("strict", {}, VmOptions(strict_io=True))
    boot_core(vm, UNCLAIMED_OUT)
    vm.start()
    wait_until(lambda: vm.state == "crashed", 10, "the VM to crash")
    old.host.delete_vm("strict")
    new = take_over()
    assert new.host is not None and new.host.crashes == {"unclaimed": 1}


def small_and_big(daemon: Daemon) -> None:
    """VMs "small" (64 KiB) and "big" (256 KiB): a take-over by a daemon allowing 128 KiB
    per VM strands "big"."""
    c = client_of(daemon)
    c.create_vm("small")
    c.add_memory_region("small", 0, 1 << 16)
    c.create_vm("big")
    c.add_memory_region("big", 0, 1 << 18)
    c.close()


def test_a_stranded_vm_keeps_its_earlier_reason_when_stranded_again(
        old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """A VM stranded by one take-over travels on with the next; stranded again there, its
    reason says why it was stranded before."""
    small_and_big(old)
    second = took_over(old, take_over, max_memory_per_vm_bytes=1 << 17)
    c = client_of(second)
    [first] = c.list_stranded_vms()
    assert first.vm_id == "big" and "131072" in first.reason
    c.close()
    third = took_over(second, take_over, max_memory_per_vm_bytes=3 << 16)
    c = client_of(third)
    [again] = c.list_stranded_vms()
    assert again.vm_id == "big" and "196608" in again.reason
    assert f"(stranded before: {first.reason})" in again.reason
    c.close()


def test_a_stranded_vm_deleted_for_good_frees_its_id(
        old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """A stranded VM keeps its id reserved; DeleteStrandedVm releases it: a new VM may
    take the id."""
    small_and_big(old)
    new = take_over(max_memory_per_vm_bytes=1 << 17)
    c = client_of(new)
    assert [s.vm_id for s in c.list_stranded_vms()] == ["big"]
    c.delete_stranded_vm("big")
    assert c.list_stranded_vms() == []
    assert c.create_vm("big").vm_id == "big"
    c.close()


def test_a_failed_take_over_keeps_no_extra_descriptor_of_a_stranded_vm(
        old: Daemon, take_over: Callable[..., Daemon]) -> None:
    """A stranded VM travels with every take-over as copies of its memfds; when the new
    daemon aborts, the old one closes the copies: it holds the stranded memory exactly as
    often as before."""
    small_and_big(old)
    keeper = took_over(old, take_over, max_memory_per_vm_bytes=1 << 17)
    c = client_of(keeper)
    assert [s.vm_id for s in c.list_stranded_vms()] == ["big"]
    held = sorted(memfd_descriptors())
    assert "kvmd-mem.0.big" in receive_and_abort(keeper)
    wait_until(lambda: c.get_vm("small").state == "created", 30, "the daemon to serve")
    assert sorted(memfd_descriptors()) == held
    assert [s.vm_id for s in c.list_stranded_vms()] == ["big"]
    c.close()


def test_after_a_take_over_the_old_daemon_keeps_nothing_at_its_stop(
        old: Daemon, take_over: Callable[..., Daemon], tmp_path: Path) -> None:
    """Once its VMs are the new daemon's, a stop that would keep VMs (SIGTERM under
    systemd, on_stop = "keep") saves none of them: no state file is left for a later
    start to restore over memory the new daemon runs."""
    c = client_of(old)
    c.create_vm("v")
    c.add_memory_region("v", 0, 1 << 16)
    c.close()
    take_over()
    assert old.exit_requested.wait(10)
    assert old.stop(keep_vms=True) is False
    assert not (tmp_path / "run-old" / "handover").exists()


def test_a_vm_that_cannot_be_saved_refuses_the_take_over(old: Daemon) -> None:
    """A VM held paused by something else (a snapshot's hold) cannot be handed over: the
    old daemon refuses the whole take-over, naming it, rather than leave it behind, and
    runs the other VMs on."""
    c = client_of(old)
    boot(c, "free", irqs=True)
    boot(c, "held", irqs=True)
    assert old.host is not None
    with old.host.get_vm("held").held_paused("snapshot"):
        chan = fake_new_daemon(old)
        try:
            chan.expect("accepted", 10)
            with pytest.raises(HandoverError, match="cannot hand over: held: "):
                chan.expect("manifest", 30)
        finally:
            chan.close()
        wait_until(lambda: c.get_vm("free").state == "running", 30, "the old daemon to serve")
    assert c.get_vm("held").state == "running" and not old.exit_requested.is_set()
    c.close()


def test_a_vm_whose_save_fails_in_the_kernel_or_a_file_refuses_the_take_over(
        old: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving a VM fails with an OSError (a mapped file's msync, a memfd's fstat): the
    old daemon refuses the take-over naming the VM and the error, rather than hand over
    the others and lose it at the commit, and runs its VMs on."""
    c = client_of(old)
    boot(c, "good", irqs=True)
    boot(c, "bad", irqs=True)
    real = carry.save_vm

    def save_vm(vm: Any, *args: Any) -> Any:
        if vm.id == "bad":
            raise OSError(errno.EIO, "Input/output error")
        return real(vm, *args)

    monkeypatch.setattr(carry, "save_vm", save_vm)
    chan = fake_new_daemon(old)
    try:
        chan.expect("accepted", 10)
        with pytest.raises(HandoverError, match="cannot hand over: bad: Input/output error"):
            chan.expect("manifest", 30)
    finally:
        chan.close()
    for vm_id in ("good", "bad"):
        wait_until(lambda v=vm_id: c.get_vm(v).state == "running", 30, f"{vm_id} to run")
    assert not old.exit_requested.is_set()
    c.close()


def test_a_file_that_is_no_socket_at_the_handover_path_is_left_alone(
        host: Host, tmp_path: Path) -> None:
    """Only a stale socket at <socket>.handover is replaced: a regular file there is not
    the daemon's to delete; the daemon serves on without a hand-over socket."""
    path = tmp_path / "kvmd.sock.handover"
    path.write_text("someone's file")
    handover = Handover(host, "", str(tmp_path / "kvmd.sock"))
    handover.serving()
    try:
        assert path.read_text() == "someone's file"
    finally:
        handover.stop_listening()
    assert path.read_text() == "someone's file"


def test_the_handover_socket_goes_when_the_daemon_stops_listening(
        host: Host, tmp_path: Path) -> None:
    """stop_listening removes <socket>.handover: a later --take-over finds no daemon there
    rather than a socket nobody answers."""
    path = tmp_path / "kvmd.sock.handover"
    handover = Handover(host, "", str(tmp_path / "kvmd.sock"))
    handover.serving()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    handover.stop_listening()
    assert not path.exists()


def test_a_second_take_over_while_one_is_in_progress_is_refused(old: Daemon) -> None:
    """One hand-over at a time: a new daemon asking while another hand-over holds the
    daemon is refused with that reason, and nothing stops."""
    c = client_of(old)
    c.create_vm("v")
    assert old.handover is not None
    with old.handover._lock:
        chan = fake_new_daemon(old)
        try:
            with pytest.raises(HandoverError, match="another hand-over is in progress"):
                chan.expect("accepted", 10)
        finally:
            chan.close()
    assert c.get_vm("v").vm_id == "v" and not old.exit_requested.is_set()
    c.close()
