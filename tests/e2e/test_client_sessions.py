"""The client library across daemon restarts: retries that resend what never reached a
daemon but keep each call's deadline, and exit-handler sessions that claim again on the
next daemon and send only replies its exits wait for."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from inprocess_daemon import client_of

from kvmd.server import Daemon
from kvmd_client import DeadlineExceededError, KvmdClient, UnavailableError


def _later(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    """Run fn after delay seconds in a thread (joined by the caller)."""
    def run() -> None:
        time.sleep(delay)
        fn()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_create_is_sent_again_once_the_restarted_daemon_listens(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """A client that reached the daemon, whose socket then went away (a restart): a
    CreateVm that failed to connect was never sent, so the client sends it again once the
    next daemon listens on the same socket, within retry_timeout."""
    address = f"unix://{tmp_path}/restart.sock"
    first = start_daemon(listen=[address])
    with KvmdClient(address, retry_timeout=20, timeout=20) as client:
        client.create_vm("before")
        first.stop()
        later = _later(0.5, lambda: start_daemon(listen=[address]))
        try:
            assert client.create_vm("after").vm_id == "after"
        finally:
            later.join(30)
        assert [vm.vm_id for vm in client.list_vms()] == ["after"]


def test_a_retry_never_outlives_the_calls_own_deadline(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """Retries ride out a restart within retry_timeout but each call keeps its own deadline:
    a create with a 0.5 s deadline fails (DEADLINE_EXCEEDED or UNAVAILABLE) when the next
    daemon only listens after 1.5 s, rather than being answered by it."""
    address = f"unix://{tmp_path}/slow.sock"
    first = start_daemon(listen=[address])
    with KvmdClient(address, retry_timeout=20, timeout=20) as client:
        client.create_vm("before")
        first.stop()
        later = _later(1.5, lambda: start_daemon(listen=[address]))
        client.timeout = 0.5  # the deadline of the calls made from now on
        try:
            with pytest.raises((DeadlineExceededError, UnavailableError)):
                client.create_vm("late")
        finally:
            client.timeout = 20
            later.join(30)
        assert client.list_vms() == []


# -- the client: remote exit handler sessions ---------------------------------------------

CLAIMED_PORT = 0x700
DEBUG_EXIT_PORT = 0x501  # the daemon's debug-exit device: a write stops the VM with its value


def _boot(client: KvmdClient, vm_id: str, program: bytes) -> None:
    """64 KiB of RAM at 0, `program` at 0x1000, vCPU 0 in flat real mode at 0x1000."""
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 0x10000)
    client.write_memory(vm_id, 0x1000, program)
    client.create_vcpu(vm_id, 0)
    flat = {"base": 0, "selector": 0}
    client.set_sregs(vm_id, 0, cs=flat, ds=flat, es=flat, fs=flat, gs=flat, ss=flat)
    client.set_regs(vm_id, 0, rip=0x1000, rsp=0x8000, rflags=0x2)


def test_replies_to_exits_nobody_waits_for_stay_on_the_client(
        start_daemon: Callable[..., Daemon]) -> None:
    """ExitHandlerSession.reply sends only replies to exits it received and has not answered
    yet: a reply to an unknown exit id, or a second reply to the same exit, is dropped by the
    client (the daemon would end the session INVALID_ARGUMENT for it), and the guest's two
    reads are both answered."""
    program = bytes([
        0xBA, CLAIMED_PORT & 0xFF, CLAIMED_PORT >> 8,  # mov dx, 0x700
        0xEC,                                          # in al, dx   (answered: 0x21)
        0x88, 0xC3,                                    # mov bl, al
        0xEC,                                          # in al, dx   (answered: 0x21)
        0x00, 0xD8,                                    # add al, bl
        0xBA, DEBUG_EXIT_PORT & 0xFF, DEBUG_EXIT_PORT >> 8,
        0xEE,                                          # out dx, al  (exit code 0x42)
        0xF4,
    ])
    daemon = start_daemon()
    with client_of(daemon) as client:
        _boot(client, "dev", program)
        with client.handle_exits("dev", [("pio", CLAIMED_PORT, 1)],
                                 deadline_ms=10_000) as session:
            session.reply(4242, b"\x00")  # no such exit
            client.start_vm("dev")
            for answered, exit_request in enumerate(session, 1):
                session.reply(exit_request.exit_id, b"\x21")
                session.reply(exit_request.exit_id, b"\x21")  # a repeat
                if answered == 2:
                    break
        assert client.wait_vm("dev", timeout=20).exit_code == 0x42


def test_an_exit_session_reclaims_on_the_next_daemon_and_forgets_old_exits(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    """An ExitHandlerSession outlives a daemon restart: it claims its ranges again on the
    next daemon, takes that daemon's handler id, answers its exits, drops a reply to an
    exit of the ended stream (the next daemon would end the session for it), and leaves no
    request-sending thread of either stream behind."""
    address = tmp_path / "exits.sock"
    first = start_daemon(listen=[f"unix://{address}"])
    spare = tmp_path / "next.sock"
    start_daemon(listen=[f"unix://{spare}"])
    wait_for_21 = bytes([
        0xBA, CLAIMED_PORT & 0xFF, CLAIMED_PORT >> 8,  # mov dx, 0x700
        0xEC,                                          # l: in al, dx
        0x3C, 0x21,                                    # cmp al, 0x21
        0x75, 0xFB,                                    # jne l
        0xB0, 0x42,                                    # mov al, 0x42
        0xBA, DEBUG_EXIT_PORT & 0xFF, DEBUG_EXIT_PORT >> 8,
        0xEE, 0xF4,                                    # out dx, al; hlt
    ])
    with KvmdClient(f"unix://{address}", timeout=20, retry_timeout=20) as client, \
            KvmdClient(f"unix://{spare}", timeout=20, retry_timeout=0) as other:
        _boot(client, "dev", wait_for_21)
        _boot(other, "dev", wait_for_21)
        threads_before = set(threading.enumerate())
        session = client.handle_exits("dev", [("pio", CLAIMED_PORT, 1)], deadline_ms=10_000)
        try:
            first_handler = session.handler_id
            client.start_vm("dev")
            old = next(session)  # left unanswered: its daemon goes away
            other.start_vm("dev")  # reads its port until a claim answers 0x21
            first.stop()
            os.rename(spare, address)  # the next daemon, at the same address
            new = next(session)
            assert session.handler_id != first_handler
            session.reply(old.exit_id, b"\x00")  # the ended stream's: dropped
            session.reply(new.exit_id, b"\x21")
            with KvmdClient(f"unix://{address}", timeout=20, retry_timeout=0) as after:
                assert after.wait_vm("dev", timeout=10).exit_code == 0x42
        finally:
            session.cancel()
    # Each stream's requests are sent by a grpc client thread (unnamed: "Thread-N"; the
    # daemon names all of its own): the ended stream's ends with that stream.
    deadline = time.monotonic() + 10
    while (senders := [t.name for t in threading.enumerate() if t not in threads_before
                       and t.name.startswith("Thread-")]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert senders == []
