"""The fd store hand-over in process (kvmd.handover.Handover.to_fd_store, then
Handover.receive on a second Host): two Hosts stand for the stopping and the starting
daemon, FakeSystemd's notify socket for systemd, and the store's fds are passed as
LISTEN_FDS would pass them. What reaches the store, what the state directory keeps, what
is stranded and why, and which descriptors each side lets go of."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from handover_support import FakeSystemd, memfd_descriptors
from polling import wait_until

from kvmd.config import Config
from kvmd.core.errors import (
    AlreadyExists,
    InvalidState,
    KernelError,
    Reason,
    ResourceExhausted,
)
from kvmd.core.host import Host
from kvmd.core.limits import Limits
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.handover import (
    MANIFEST,
    STATE_SUBDIR,
    Carried,
    Handover,
    StrandedVms,
    pending,
    runtime_dir,
)
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
    return fds  # the list listen_fds answers: a test may add to it


def hand_to_store(host: Host, run_dir: Path) -> Handover:
    """SIGTERM under systemd: the VMs go to the store, then close here."""
    old = Handover(host, str(run_dir), None)
    assert old.to_fd_store()
    old.close_vms()
    return old


def receive_from_store(sd: FakeSystemd, monkeypatch: pytest.MonkeyPatch, host: Host,
                       run_dir: Path) -> Handover:
    """The next start: the store passed as LISTEN_FDS, the VMs restored into `host`."""
    pass_store(sd, monkeypatch)
    new = Handover(host, str(run_dir), None)
    new.receive(False)
    return new


def descriptors_of(link: str) -> list[int]:
    """This process's descriptors of `link` (what /proc/self/fd/N links to)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == link:
                out.append(int(name))
    return sorted(out)


def test_a_vm_crosses_the_fd_store_and_each_side_lets_go_of_its_memory(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The memfd goes to the store, the state to <run>/handover/ (0700) as a.state (0600) with the
    manifest; the next start restores the VM over the same memory, then removes the state
    file and the manifest, takes the memfd out of the store (FDSTOREREMOVE) and closes the
    copies it was passed: only the restored VM holds the memory. Crash counts continue."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    old_host.crashes["unclaimed"] = 2  # the crash counts by kind continue too
    hand_to_store(old_host, run_dir)
    state_dir = run_dir / STATE_SUBDIR
    assert systemd.names() == [memfd_name("a", 0)]
    assert sorted(os.listdir(state_dir)) == ["a.state", MANIFEST]
    assert os.stat(state_dir / "a.state").st_mode & 0o777 == 0o600
    assert os.stat(state_dir).st_mode & 0o777 == 0o700
    manifest = json.loads((state_dir / MANIFEST).read_text())
    assert [(v["vm_id"], v["memfds"], v["state_file"]) for v in manifest["vms"]] == [
        ("a", [memfd_name("a", 0)], "a.state")]
    [(_, stored)] = systemd.store
    inode = os.fstat(stored).st_ino

    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert new.report is not None and [(v.vm_id, v.restored) for v in new.report.vms] == [
        ("a", True)]
    assert new_host.get_vm("a").read_memory(0, SIZE) == PATTERN
    assert new_host.crashes == {"unclaimed": 2}
    assert os.listdir(state_dir) == []
    wait_until(lambda: systemd.names() == [], 10, "the memfd to leave the store")
    assert memfd_descriptors().count(inode) == 1  # the restored VM's own
    new_host.delete_vm("a")
    assert inode not in memfd_descriptors()


def test_a_vm_whose_pause_fails_once_still_reaches_the_store(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At a SIGTERM a VM that cannot be handed over ends with the daemon, so one whose pause
    failed (a vCPU slow to park on a loaded host) gets a second try, and travels."""
    old_host, _new_host = hosts
    make_vm(old_host, "a")
    make_vm(old_host, "b")
    real = ManagedVm.held_paused
    holds: list[str] = []

    def first_fails(vm: ManagedVm, purpose: str, leave_paused: bool = False) -> Any:
        holds.append(vm.id)
        if vm.id == "a" and holds.count("a") == 1:
            raise KernelError("vcpu 0 of vm a did not pause within 5.0 s",
                              reason=Reason.VCPU_UNRESPONSIVE)
        return real(vm, purpose, leave_paused)

    monkeypatch.setattr(ManagedVm, "held_paused", first_fails)
    hand_to_store(old_host, run_dir)
    assert holds == ["a", "b", "a"]
    assert sorted(systemd.names()) == [memfd_name("a", 0), memfd_name("b", 0)]


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
    ("mine", "2", "", True),              # systemd passed this process memfds
    ("mine", "0", "", False),             # nothing in the store
    ("another", "2", "", False),          # variables meant for another process
    (None, None, "a.state", True),        # states wait in the runtime directory
    (None, None, MANIFEST, True),         # a manifest alone (stranded VMs' memory only)
    (None, None, "a.state.tmp1", False),  # a write that never completed
    (None, None, "", False),
])
def test_a_hand_over_is_pending_when_fds_were_passed_to_this_process_or_states_wait(
        monkeypatch: pytest.MonkeyPatch, run_dir: Path, listen_pid: str | None,
        listen_fds: str | None, state: str, expected: bool) -> None:
    """kvmd.launch restores early (before the server loads) only when a previous daemon
    handed VMs over: fds meant for this process, or state files waiting."""
    for key in ("LISTEN_PID", "LISTEN_FDS"):
        monkeypatch.delenv(key, raising=False)
    if listen_pid is not None:
        pid = os.getpid() if listen_pid == "mine" else os.getpid() + 1
        monkeypatch.setenv("LISTEN_PID", str(pid))
    if listen_fds is not None:
        monkeypatch.setenv("LISTEN_FDS", listen_fds)
    (run_dir / STATE_SUBDIR).mkdir(parents=True)
    if state:
        (run_dir / STATE_SUBDIR / state).write_bytes(b"")
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
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert [vm.id for vm in new_host.list_vms()] == ["a"]
    [stranded] = new.stranded.all()
    assert (stranded.carried.vm_id, stranded.reason) == ("b", "RuntimeError: a bug")
    assert sorted(os.listdir(run_dir / STATE_SUBDIR)) == ["b.state", MANIFEST]
    wait_until(lambda: systemd.names() == [memfd_name("b", 0)], 10, "a's memfd to go")
    new.stranded.forget_all()


def strand_on_restore(systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
                      monkeypatch: pytest.MonkeyPatch) -> Handover:
    """VM "a" handed to the store, and stranded by the next start (its restore failing
    once): the new daemon's Handover."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    real = carry.restore_vm

    def refuse(*args: Any, **kw: Any) -> Any:
        raise InvalidState("not now", reason=Reason.HANDOVER_STATE_UNUSABLE)

    monkeypatch.setattr(carry, "restore_vm", refuse)
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    monkeypatch.setattr(carry, "restore_vm", real)
    assert [s.carried.vm_id for s in new.stranded.all()] == ["a"]
    return new


def test_a_stranded_vm_retried_runs_and_its_state_file_and_memfds_are_let_go(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RetryStrandedVm succeeds: the VM is back over the same memory, its state file is
    removed (never restored again over newer memory), its memfds leave the store and the
    daemon's copies are closed (only the VM holds its memory), its id is the VM's."""
    new = strand_on_restore(systemd, run_dir, hosts, monkeypatch)
    new_host = hosts[1]
    [(_, stored)] = systemd.store
    inode = os.fstat(stored).st_ino
    vm = new.stranded.retry("a")
    assert vm.read_memory(0, SIZE) == PATTERN and new.stranded.all() == []
    assert not (run_dir / STATE_SUBDIR / "a.state").exists()
    wait_until(lambda: systemd.names() == [], 10, "the memfd to leave the store")
    assert memfd_descriptors().count(inode) == 1
    new_host.delete_vm("a")
    new_host.reserve_id("a", "local")  # the id is free again
    new_host.release_id("a")


def test_retrying_a_stranded_vm_without_a_state_says_so_and_keeps_it(
        host: Host, run_dir: Path) -> None:
    """A stranded VM of which only memory arrived cannot be retried: FAILED_PRECONDITION
    (HANDOVER_STATE_UNUSABLE) with the reason it was stranded; it stays stranded, its
    memfd kept."""
    stranded = StrandedVms(host, None)
    r, w = os.pipe()
    stranded.add(Carried("m", b"", {memfd_name("m", 0): r}), "no saved state")
    with pytest.raises(InvalidState, match="no saved state") as err:
        stranded.retry("m")
    assert err.value.reason == Reason.HANDOVER_STATE_UNUSABLE
    [kept] = stranded.all()
    assert kept.carried.fds == {memfd_name("m", 0): r}
    stranded.delete("m")
    assert descriptors_of(f"pipe:[{os.fstat(w).st_ino}]") == [w]  # r is closed
    os.close(w)


def test_a_vm_stranded_twice_keeps_the_memfds_of_both_and_its_id_until_deleted(
        host: Host) -> None:
    """The same id stranded twice (its memory, then its state): one stranded VM holding
    every memfd of both; the id stays reserved (the second add could not reserve it: the
    first holds it) until the VM is deleted, which closes every memfd."""
    stranded = StrandedVms(host, None)
    pipes = [os.pipe() for _ in range(2)]
    since = int(time.time() * 1000)
    stranded.add(Carried("v", b"", {memfd_name("v", 0): pipes[0][0]}), "memory only")
    stranded.add(Carried("v", b"state", {memfd_name("v", 1): pipes[1][0]}), "state")
    [s] = stranded.all()
    assert since <= s.since_unix_ms <= int(time.time() * 1000)  # when it was stranded
    assert s.carried.fds == {memfd_name("v", 0): pipes[0][0], memfd_name("v", 1): pipes[1][0]}
    with pytest.raises(AlreadyExists):
        host.reserve_id("v", "local")
    stranded.delete("v")
    host.reserve_id("v", "local")
    host.release_id("v")
    for _, w in pipes:
        assert descriptors_of(f"pipe:[{os.fstat(w).st_ino}]") == [w]  # r is closed
        os.close(w)


def test_a_stranded_vm_over_the_vm_limit_is_kept_but_its_retry_respects_the_limit(
        run_dir: Path) -> None:
    """A VM stranded while the daemon is at max_vms cannot reserve its id; it is kept all
    the same, and a retry must reserve it then: RESOURCE_EXHAUSTED (LIMIT_VMS) while the
    limit holds, never a VM over the limit."""
    old_host, new_host = Host(), Host(Limits(max_vms=1))
    try:
        make_vm(old_host, "a")
        vm = old_host.get_vm("a")
        with vm.held_paused("handover", True) as hold:
            saved = carry.save_vm(vm, hold.run_states, 1)
        make_vm(new_host, "full")
        stranded = StrandedVms(new_host, None)
        stranded.add(Carried("a", saved.data, {n: os.dup(fd) for n, fd in saved.memfds.items()}),
                     "stranded at the limit")
        assert stranded.all()[0].id_reserved is False
        with pytest.raises(ResourceExhausted) as err:
            stranded.retry("a")
        assert err.value.reason == Reason.LIMIT_VMS
        assert [v.id for v in new_host.list_vms()] == ["full"]
        new_host.delete_vm("full")
        assert stranded.retry("a").read_memory(0, SIZE) == PATTERN
    finally:
        old_host.close()
        new_host.close()


def test_a_store_that_cannot_be_reached_ends_the_vms_and_keeps_nothing(
        host: Host, run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """systemd cannot be told (its notify socket is gone): to_fd_store answers False (the
    VMs end with this daemon), removes the state it wrote (no later start restores it
    without its memory) and closes the copies of the memfds it made."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    make_vm(host, "a")
    own = sorted(memfd_descriptors())
    assert Handover(host, str(run_dir), None).to_fd_store() is False
    assert not (run_dir / STATE_SUBDIR / "a.state").exists()
    assert sorted(memfd_descriptors()) == own


def test_a_daemon_ending_forgets_its_stranded_vms_closing_their_memfds(host: Host) -> None:
    """forget_all (the daemon ends; the fd store or the next daemon holds the memory):
    every stranded VM's memfds are closed here and its id is released."""
    stranded = StrandedVms(host, None)
    r, w = os.pipe()
    stranded.add(Carried("s", b"", {memfd_name("s", 0): r}), "memory only")
    stranded.forget_all()
    assert stranded.all() == []
    assert descriptors_of(f"pipe:[{os.fstat(w).st_ino}]") == [w]  # r is closed
    os.close(w)
    host.reserve_id("s", "local")
    host.release_id("s")


def test_a_stranded_vm_travels_on_through_the_store_with_its_reason(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM stranded here (its memory only, e.g. from a take-over) goes to the store with
    the others: its memfd stored, no state file written for it, the manifest naming its
    reason; the next start restores the others and strands it again, with that reason and
    its memory."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    old = Handover(old_host, str(run_dir), None)
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, SIZE)
    old.stranded.add(Carried("s", b"", {memfd_name("s", 0): memfd}), "it was big")
    assert old.to_fd_store()
    old.close_vms()
    assert systemd.names() == [memfd_name("a", 0), memfd_name("s", 0)]
    state_dir = run_dir / STATE_SUBDIR
    assert sorted(os.listdir(state_dir)) == ["a.state", MANIFEST]
    manifest = json.loads((state_dir / MANIFEST).read_text())
    assert {v["vm_id"]: v.get("stranded", "") for v in manifest["vms"]} == {
        "a": "", "s": "it was big"}

    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert [v.id for v in new_host.list_vms()] == ["a"]
    [s] = new.stranded.all()
    assert (s.carried.vm_id, s.reason, list(s.carried.fds)) == (
        "s", "it was big", [memfd_name("s", 0)])
    assert s.memory_bytes == SIZE
    manifest = json.loads((state_dir / MANIFEST).read_text())
    assert [(v["vm_id"], v["stranded"]) for v in manifest["vms"]] == [("s", "it was big")]
    wait_until(lambda: systemd.names() == [memfd_name("s", 0)], 10, "a's memfd to go")
    new.stranded.forget_all()


def test_a_manifest_naming_a_vm_that_left_nothing_does_not_stop_the_restore(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest names a stranded VM of which neither a state file nor a memfd is left
    (deleted since, the daemon killed before it rewrote the manifest): it is skipped, the
    VMs that are there are restored, and the rewritten manifest goes."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    path = run_dir / STATE_SUBDIR / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["vms"].append({"vm_id": "gone", "memfds": [memfd_name("gone", 0)],
                            "stranded": "deleted since"})
    path.write_text(json.dumps(manifest))
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert [v.id for v in new_host.list_vms()] == ["a"] and new.stranded.all() == []
    assert not path.exists()


@pytest.mark.parametrize("manifest", [b"{not json", b"[1, 2]", b"\xff\xfe",
                                      b'{"vms": [1, "a", null]}'])
def test_an_unusable_manifest_is_ignored_the_state_files_suffice(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch, manifest: bytes) -> None:
    """A manifest that is not JSON, not an object, or lists no objects: the start restores
    from the state
    files alone (the manifest only adds reasons and timings: without them the report
    claims no API outage rather than one since boot)."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    (run_dir / STATE_SUBDIR / MANIFEST).write_bytes(manifest)
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert new_host.get_vm("a").read_memory(0, SIZE) == PATTERN
    assert new.stranded.all() == []
    new.serving()
    assert new.report is not None and new.report.restored == 1
    assert (new.report.api_unavailable_seconds, new.report.save_seconds) == (0.0, 0.0)


def test_a_state_file_that_cannot_be_read_strands_its_vm_saying_why(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A <vm>.state that cannot be read (here: a directory): that VM is stranded with the
    read error as its reason, the others are restored; files that are not states
    (an interrupted write's temporary, a copy) are no VMs."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    make_vm(old_host, "b")
    hand_to_store(old_host, run_dir)
    state_dir = run_dir / STATE_SUBDIR
    (state_dir / "b.state").unlink()
    (state_dir / "b.state").mkdir()
    (state_dir / "a.state.tmp4242").write_bytes(b"half")
    (state_dir / "a.state.save").write_bytes((state_dir / "a.state").read_bytes())
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    assert [v.id for v in new_host.list_vms()] == ["a"]
    [s] = new.stranded.all()
    assert (s.carried.vm_id, s.reason) == ("b", "cannot read its state file: Is a directory")
    new.stranded.forget_all()


def test_memory_whose_state_directory_is_gone_is_stranded_not_lost(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store passes a VM's memfd but the state directory is gone (the runtime directory
    was emptied): the start does not fail; the VM is stranded, its memory kept, saying its
    saved state is missing, and a new manifest lists it."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    for name in os.listdir(run_dir / STATE_SUBDIR):
        os.unlink(run_dir / STATE_SUBDIR / name)
    os.rmdir(run_dir / STATE_SUBDIR)
    new = receive_from_store(systemd, monkeypatch, new_host, run_dir)
    [s] = new.stranded.all()
    assert s.carried.vm_id == "a" and "saved state is missing" in s.reason
    assert list(s.carried.fds) == [memfd_name("a", 0)]
    manifest = json.loads((run_dir / STATE_SUBDIR / MANIFEST).read_text())
    assert [v["vm_id"] for v in manifest["vms"]] == ["a"]  # the directory is back
    new.stranded.forget_all()


def test_an_fd_of_another_name_passed_at_start_is_closed(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store passes an fd whose name is no VM's memfd (put there by something else):
    it is closed, not held for the daemon's life; the VMs are restored."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    fds = pass_store(systemd, monkeypatch)
    r, w = os.pipe()
    fds.append(("stray", r))
    pipe = os.fstat(w).st_ino
    Handover(new_host, str(run_dir), None).receive(False)
    assert [v.id for v in new_host.list_vms()] == ["a"]
    assert descriptors_of(f"pipe:[{pipe}]") == [w]  # its read end is closed
    os.close(w)


def test_without_a_runtime_directory_nothing_is_handed_to_the_store(
        systemd: FakeSystemd, host: Host) -> None:
    """No runtime directory for the states (TCP listeners only, no runtime_dir): the
    memory alone cannot be restored, so to_fd_store answers False (the VMs end) and puts
    nothing in the store."""
    make_vm(host, "a")
    assert Handover(host, "", None).to_fd_store() is False
    assert systemd.names() == []


def test_memory_passed_to_a_daemon_without_a_runtime_directory_is_stranded_not_lost(
        systemd: FakeSystemd, run_dir: Path, hosts: tuple[Host, Host],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store passes memfds to a daemon that has no runtime directory (its states
    cannot be found): each VM is stranded with its memory, for a forced delete or a start
    with the right configuration, never dropped."""
    old_host, new_host = hosts
    make_vm(old_host, "a")
    hand_to_store(old_host, run_dir)
    pass_store(systemd, monkeypatch)
    new = Handover(new_host, "", None)
    new.receive(False)
    [s] = new.stranded.all()
    assert s.carried.vm_id == "a" and list(s.carried.fds) == [memfd_name("a", 0)]
    assert "saved state is missing" in s.reason and new_host.list_vms() == []
    new.stranded.forget_all()
