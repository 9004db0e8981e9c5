"""The fd store hand-over in process (kvmd.handover.Handover.to_fd_store, then
Handover.receive on a second Host): two Hosts stand for the stopping and the starting
daemon, FakeSystemd's notify socket for systemd, and the store's fds are passed as
LISTEN_FDS would pass them. What reaches the store, what the state directory keeps, what
is stranded and why, and which descriptors each side lets go of."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from handover_support import FakeSystemd
from polling import wait_until

from kvmd.config import Config
from kvmd.core.host import Host
from kvmd.core.vm import VmOptions
from kvmd.handover import MANIFEST, STATE_SUBDIR, Carried, Handover, pending, runtime_dir
from kvmd.state import handover as carry
from kvmd.state.handover import memfd_name

SIZE = 0x10000
PATTERN = bytes(range(256)) * (SIZE // 256)


@pytest.fixture
def systemd(fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> FakeSystemd:
    """FakeSystemd's notify socket and fd store, for this process (NOTIFY_SOCKET)."""
    monkeypatch.setenv("NOTIFY_SOCKET", fake_systemd.notify_path)
    return fake_systemd


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def make_vm(host: Host, vm_id: str) -> None:
    """A VM of one slot of memory holding PATTERN (no vCPU: the memory is what travels)."""
    vm = host.create_vm(vm_id, {}, VmOptions())
    vm.add_memory_region(0, SIZE, False, False)
    vm.write_memory(0, PATTERN)


def pass_store(sd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The next start's LISTEN_FDS: a copy of each fd in the store, as systemd passes
    them (the daemon owns them)."""
    with sd._lock:
        fds = [(name, os.dup(fd)) for name, fd in sd.store]
    monkeypatch.setattr("kvmd.handover.listen_fds", lambda: list(fds))
    return fds


def hand_to_store(host: Host, run_dir: Path) -> Handover:
    """SIGTERM under systemd: the VMs go to the store, then close here."""
    old = Handover(host, str(run_dir), None)
    assert old.to_fd_store()
    old.close_vms()
    return old


def fd_inodes() -> list[int]:
    """The inode behind each memfd descriptor this process holds (one per descriptor)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:"):
                out.append(os.stat(f"/proc/self/fd/{name}").st_ino)
        except OSError:
            pass
    return out


def test_a_vm_crosses_the_fd_store_and_each_side_lets_go_of_its_memory(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The memfd goes to the store, the state to <run>/handover/a.state (0600) with the
    manifest; the next start restores the VM over the same memory, then removes the state
    file and the manifest, takes the memfd out of the store (FDSTOREREMOVE) and closes the
    copies it was passed: only the restored VM holds the memory."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    state_dir = run_dir / STATE_SUBDIR
    assert systemd.names() == [memfd_name("a", 0)]
    assert sorted(os.listdir(state_dir)) == ["a.state", MANIFEST]
    assert os.stat(state_dir / "a.state").st_mode & 0o777 == 0o600
    manifest = json.loads((state_dir / MANIFEST).read_text())
    assert [(v["vm_id"], v["memfds"], v["state_file"]) for v in manifest["vms"]] == [
        ("a", [memfd_name("a", 0)], "a.state")]
    [(_, stored)] = systemd.store
    inode = os.fstat(stored).st_ino

    pass_store(systemd, monkeypatch)
    new = Handover(new_host, str(run_dir), None)
    new.receive(False)
    assert new.report is not None and [(v.vm_id, v.restored) for v in new.report.vms] == [
        ("a", True)]
    assert new_host.get_vm("a").read_memory(0, SIZE) == PATTERN
    assert os.listdir(state_dir) == []
    wait_until(lambda: systemd.names() == [], 10, "the memfd to leave the store")
    assert fd_inodes().count(inode) == 1  # the restored VM's own
    new_host.delete_vm("a")
    assert inode not in fd_inodes()


def test_the_runtime_directory_is_the_configured_one_else_systemds_first_else_the_sockets(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where the states wait: runtime_dir; else the first of systemd's RuntimeDirectory=
    paths (RUNTIME_DIRECTORY, ':'-separated); else the first Unix socket's directory; ""
    with TCP listeners only (no fd store hand-over then)."""
    sock = f"unix://{tmp_path}/kvmd.sock"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/kvmd:/run/other")
    assert runtime_dir(Config(listen=[sock], runtime_dir="/x")) == "/x"
    assert runtime_dir(Config(listen=[sock])) == "/run/kvmd"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert runtime_dir(Config(listen=["127.0.0.1:0", sock])) == str(tmp_path)
    assert runtime_dir(Config(listen=["127.0.0.1:0"])) == ""


@pytest.mark.parametrize(("listen_pid", "listen_fds", "state", "expected"), [
    ("mine", "2", False, True),       # systemd passed this process memfds
    ("mine", "0", False, False),      # nothing in the store
    ("another", "2", False, False),   # variables meant for another process
    (None, None, True, True),         # states wait in the runtime directory
    (None, None, False, False),
])
def test_a_hand_over_is_pending_when_fds_were_passed_to_this_process_or_states_wait(
        monkeypatch: pytest.MonkeyPatch, run_dir: Path, listen_pid: str | None,
        listen_fds: str | None, state: bool, expected: bool) -> None:
    """kvmd.launch restores early (before the server loads) only when a previous daemon
    handed VMs over: fds meant for this process, or state files waiting."""
    for key in ("LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(key, raising=False)
    if listen_pid is not None:
        pid = os.getpid() if listen_pid == "mine" else os.getpid() + 1
        monkeypatch.setenv("LISTEN_PID", str(pid))
    if listen_fds is not None:
        monkeypatch.setenv("LISTEN_FDS", listen_fds)
    if state:
        (run_dir / STATE_SUBDIR).mkdir(parents=True)
        (run_dir / STATE_SUBDIR / "a.state").write_bytes(b"")
    assert pending(Config(listen=["127.0.0.1:0"], runtime_dir=str(run_dir))) is expected


def test_closing_a_carried_vm_twice_never_closes_another_descriptor() -> None:
    """Carried.close forgets the fds it closed: a second close (a failure path after
    another) cannot close a descriptor that reused the number meanwhile."""
    r, w = os.pipe()
    carried = Carried("a", b"", {memfd_name("a", 0): os.dup(r)})
    carried.close()
    r2, w2 = os.pipe()  # takes the lowest free numbers: the one just closed
    try:
        carried.close()
        os.fstat(r2)
        assert carried.fds == {}
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_a_bug_restoring_one_vm_strands_it_and_the_others_are_restored(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception restoring one VM (a daemon bug, not a domain error) costs
    that VM only: it is stranded with the exception as its reason (state file and memfd
    kept), the others are restored."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    make_vm(old_host, "b")
    hand_to_store(old_host, run_dir)
    real = carry.restore_vm

    def restore_vm(host: Host, record: Any, memfds: dict[str, int], **kw: Any) -> Any:
        if record.state.vm_id == "b":
            raise RuntimeError("a bug")
        return real(host, record, memfds, **kw)

    monkeypatch.setattr(carry, "restore_vm", restore_vm)
    pass_store(systemd, monkeypatch)
    new = Handover(new_host, str(run_dir), None)
    new.receive(False)
    assert [vm.id for vm in new_host.list_vms()] == ["a"]
    [stranded] = new.stranded.all()
    assert (stranded.carried.vm_id, stranded.reason) == ("b", "RuntimeError: a bug")
    assert sorted(os.listdir(run_dir / STATE_SUBDIR)) == ["b.state", MANIFEST]
    wait_until(lambda: systemd.names() == [memfd_name("b", 0)], 10, "a's memfd to go")
    new.stranded.forget_all()
