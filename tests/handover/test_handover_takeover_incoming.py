"""The new daemon's side of `kvmd --take-over` (kvmd.handover.Handover.receive(True)) in
process, against a scripted old daemon on the hand-over socket: what it refuses, and what
it lets go of when the switch does not happen (the VMs it restored, the memfds it was
sent)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from handover_support import memfd_descriptors
from polling import wait_until

from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.handover import Channel, Handover, HandoverError, socket_path
from kvmd.state.handover import SavedForHandover, save_vm

SIZE = 0x10000


def saved_vm(host: Host, vm_id: str) -> SavedForHandover:
    """A VM of one slot, saved for a hand-over as the old daemon saves it."""
    vm = host.create_vm(vm_id, {}, VmOptions())
    vm.add_memory_region(0, SIZE, False, False)
    vm.write_memory(0, b"kept")
    with vm.held_paused("handover", True) as hold:
        return save_vm(vm, hold.run_states, 1)


@pytest.fixture
def old_daemon(tmp_path: Path) -> Iterator[Callable[[Callable[[Channel], Any]], list[Any]]]:
    """Listen on the hand-over socket beside tmp_path/kvmd.sock and run `script` on the
    first connection (in a thread); returns a list that gets what the script returns."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Callable[[Channel], Any]) -> list[Any]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(socket_path(str(tmp_path / "kvmd.sock")))
        listener.listen(1)
        listeners.append(listener)
        out: list[Any] = []

        def run() -> None:
            conn, _ = listener.accept()
            chan = Channel(conn)
            try:
                out.append(script(chan))
            finally:
                chan.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return out

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(10)


def send_vms(chan: Channel, saved: list[SavedForHandover]) -> None:
    """The old daemon's side up to "sent": accepted, the manifest, each VM."""
    chan.expect("hello", 10)
    chan.send_json({"op": "accepted"})
    chan.send_json({"op": "manifest", "kvmd_handover": 1, "frozen_ns": 1, "saved_ns": 2,
                    "vms": [{"vm_id": s.vm_id, "memfds": sorted(s.memfds)} for s in saved]})
    for s in saved:
        chan.send_json({"op": "vm", "vm_id": s.vm_id})
        chan.send_blob(s.data)
        chan.send_fds(s.memfds)
    chan.send_json({"op": "sent"})


def new_daemon(host: Host, tmp_path: Path) -> Handover:
    return Handover(host, str(tmp_path / "run-new"), str(tmp_path / "kvmd.sock"))


def test_an_old_daemon_that_never_commits_leaves_the_new_one_nothing(
        hosts: tuple[Host, Host], tmp_path: Path,
        old_daemon: Callable[[Callable[[Channel], Any]], list[Any]]) -> None:
    """The old daemon goes away after the verdict, without "commit": the take-over fails
    and the new daemon closes what it restored and every memfd it was sent (the memory is
    the old daemon's still: only its own VM holds it)."""
    old_host, new_host = hosts
    saved = saved_vm(old_host, "a")
    inode = os.fstat(next(iter(saved.memfds.values()))).st_ino
    held = memfd_descriptors().count(inode)

    def no_commit(chan: Channel) -> dict[str, Any]:
        send_vms(chan, [saved])
        return chan.expect("restored", 30)

    verdict = old_daemon(no_commit)
    with pytest.raises(HandoverError, match="take-over failed"):
        new_daemon(new_host, tmp_path).receive(True)
    assert verdict == [{"op": "restored", "results": {"a": ""}}]
    assert new_host.list_vms() == []
    assert memfd_descriptors().count(inode) == held


def test_an_old_daemon_with_only_a_stranded_vm_is_taken_over_and_the_vm_stays_stranded(
        hosts: tuple[Host, Host], tmp_path: Path,
        old_daemon: Callable[[Callable[[Channel], Any]], list[Any]]) -> None:
    """A VM stranded in the old daemon travels as its memfds and its reason, without a
    state: nothing to restore is no reason to refuse; the new daemon commits and keeps the
    VM stranded with the reason it had."""
    old_host, new_host = hosts
    saved = saved_vm(old_host, "s")

    def only_stranded(chan: Channel) -> dict[str, Any]:
        chan.expect("hello", 10)
        chan.send_json({"op": "accepted"})
        chan.send_json({"op": "manifest", "kvmd_handover": 1, "vms": [
            {"vm_id": "s", "memfds": sorted(saved.memfds), "stranded": "it was big"}]})
        chan.send_json({"op": "vm", "vm_id": "s"})
        chan.send_fds(saved.memfds)
        chan.send_json({"op": "sent"})
        verdict = chan.expect("restored", 30)
        chan.send_json({"op": "commit"})
        chan.send_json({"op": "released"})
        return verdict

    verdict = old_daemon(only_stranded)
    new = new_daemon(new_host, tmp_path)
    new.receive(True)
    wait_until(lambda: verdict, 10, "the old daemon's script to end")  # it ends after us
    assert verdict == [{"op": "restored", "results": {}}]
    [stranded] = new.stranded.all()
    assert (stranded.carried.vm_id, stranded.reason, sorted(stranded.carried.fds)) == (
        "s", "it was big", sorted(saved.memfds))
    new.stranded.forget_all()


@pytest.mark.parametrize("fault", ["fds before their VM", "gone before sent"])
def test_a_broken_exchange_fails_the_take_over_and_closes_every_fd_sent(
        hosts: tuple[Host, Host], tmp_path: Path, fault: str,
        old_daemon: Callable[[Callable[[Channel], Any]], list[Any]]) -> None:
    """Memfds sent before any "vm" message, or an old daemon gone before "sent": the
    take-over fails and the new daemon keeps no descriptor of what it was sent."""
    old_host, new_host = hosts
    saved = saved_vm(old_host, "a")
    inode = os.fstat(next(iter(saved.memfds.values()))).st_ino
    held = memfd_descriptors().count(inode)

    def broken(chan: Channel) -> None:
        chan.expect("hello", 10)
        chan.send_json({"op": "accepted"})
        chan.send_json({"op": "manifest", "kvmd_handover": 1, "vms": []})
        if fault == "gone before sent":
            chan.send_json({"op": "vm", "vm_id": "a"})
            chan.send_blob(saved.data)
        chan.send_fds(saved.memfds)  # then the connection closes

    old_daemon(broken)
    with pytest.raises(HandoverError, match="take-over failed"):
        new_daemon(new_host, tmp_path).receive(True)
    assert memfd_descriptors().count(inode) == held
    assert new_host.list_vms() == []


def sockets() -> int:
    """How many socket descriptors this process holds."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except OSError:
            pass
    return count


def test_no_daemon_to_take_over_fails_at_once_keeping_no_socket(
        host: Host, tmp_path: Path) -> None:
    """--take-over with nobody on the hand-over socket: HandoverError naming the path,
    and the socket it tried with is closed."""
    held = sockets()
    with pytest.raises(HandoverError, match=r"no daemon to take over at .*kvmd\.sock\.handover"):
        new_daemon(host, tmp_path).receive(True)
    assert sockets() == held
