"""End-to-end tests of ``kvmctl demo``, ``kvmctl exits`` and ``kvmctl vm console``.

``kvmctl demo`` is the first thing a new user runs, so it is tested both in-process
(``kvmd_client.kvmctl.main`` with capsys) and as the installed console script, against the session
daemon (a real kvmd process on a temporary Unix socket).
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kvmctl_support import Kvmctl, kvmctl_command, ok

from kvmd_client import KvmdClient, NotFoundError
from kvmd_client import demo_guest as guest
from kvmd_client.kvmctl import main

Healthy = Callable[[], None]

GREETING = "Hello from a kvmd guest!"
COUNTING = "counting: 1 2 3 4 5 6 7 8 9"
#: Characters the demo guest prints; each costs one LSR read and one THR write.
CHARS = len(guest.EXPECTED_CONSOLE)
#: The demo guest's exits, exactly: the UART, nine counts to port 0x80 and the debug exit.
DEMO_COUNTS = {"io": 2 * CHARS + 10, "io_in": CHARS, "io_out": CHARS + 10, "unclaimed_pio": 9}

# A real-mode echo guest: wait for a received byte, echo it, end with debug exit on 'q'.
ECHO_GUEST = bytes([
    0xBA, 0xFD, 0x03,  # 00 poll: mov dx, 0x3fd   ; line status register
    0xEC,              # 03       in al, dx
    0xA8, 0x01,        # 04       test al, 1      ; DR: data ready
    0x74, 0xF8,        # 06       jz poll
    0xBA, 0xF8, 0x03,  # 08       mov dx, 0x3f8   ; receiver buffer / transmitter holding
    0xEC,              # 0b       in al, dx
    0xEE,              # 0c       out dx, al      ; echo
    0x3C, 0x71,        # 0d       cmp al, 'q'
    0x75, 0xEF,        # 0f       jne poll
    0xBA, 0x01, 0x05,  # 11       mov dx, 0x501   ; debug exit with code 'q'
    0xEE,              # 14       out dx, al
    0xF4,              # 15       hlt
])  # fmt: skip


def run_script(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the kvmctl console script against ``address``."""
    return subprocess.run(kvmctl_command("--address", address, *args), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def demo_vm_id(out: str) -> str:
    """The VM id from the first line of the demo's text output."""
    match = re.match(r"kvmctl demo: vm (\S+) on ", out)
    assert match, out
    return match.group(1)


def assert_gone(client: KvmdClient, vm_id: str) -> None:
    with pytest.raises(NotFoundError):
        client.get_vm(vm_id)
    assert vm_id not in [vm.vm_id for vm in client.list_vms()]


def table(text: str) -> dict[str, list[str]]:
    """Rows of a kvmctl table keyed by their first cell (header row included)."""
    return {cells[0]: cells[1:] for cells in (line.split() for line in text.splitlines())
            if cells}


def boot_echo_guest(client: KvmdClient, vm_id: str) -> None:
    """Create, load and start the echo guest (running, polling its UART)."""
    client.create_vm(vm_id)
    client.add_memory_region(vm_id, 0, 64 << 10)
    client.write_memory(vm_id, 0x1000, ECHO_GUEST)
    client.create_vcpu(vm_id, 0)
    client.set_sregs(vm_id, 0, {s: {"base": 0, "selector": 0} for s in ("cs", "ds", "ss")})
    client.set_regs(vm_id, 0, rip=0x1000, rsp=0x8000, rflags=0x2)
    client.start_vm(vm_id)


# ---------------------------------------------------------------------------------------------
# the guest image


def test_guest_image_layout() -> None:
    """The hand-assembled immediates point at the strings, and the exit is where it says."""
    image = guest.IMAGE
    assert image[:3] == bytes([0xBE]) + (guest.LOAD_ADDRESS + guest.GREETING_OFFSET).to_bytes(
        2, "little")
    assert image[0x1B:0x1E] == bytes([0xBE]) + (guest.LOAD_ADDRESS + guest.BYE_OFFSET).to_bytes(
        2, "little")
    assert image[0x21:0x27] == bytes([0xBA, 0x01, 0x05, 0xB0, guest.EXIT_CODE, 0xEE])
    assert image[guest.GREETING_OFFSET:].startswith(guest.GREETING)
    assert image.endswith(guest.BYE)
    assert f"{GREETING}\n{COUNTING}\nbye!\n" == guest.EXPECTED_CONSOLE
    assert guest.LOAD_ADDRESS + len(image) < guest.STACK_TOP <= guest.MEMORY_SIZE


# ---------------------------------------------------------------------------------------------
# kvmctl demo


def test_demo(kvmctl: Kvmctl, client: KvmdClient) -> None:
    result = ok(kvmctl("demo"))
    lines = result.out.splitlines()
    vm_id = demo_vm_id(result.out)
    assert re.fullmatch(r"demo-[0-9a-f]{6}", vm_id)
    start = lines.index("--- guest console (COM1) ---")
    end = lines.index("--- end of console ---")
    assert lines[start + 1 : end] == [GREETING, COUNTING, "bye!"]
    assert "exit code 42" in lines[end + 1] and "0x2a" in lines[end + 1]
    rows = table("\n".join(lines[end + 3 :]))
    assert rows["REASON"] == ["COUNT", "WHAT"]
    for reason, count in DEMO_COUNTS.items():
        assert rows[reason][0] == str(count), reason
    assert lines[-1] == f"deleted vm {vm_id} (--keep keeps it)"
    assert_gone(client, vm_id)


def test_demo_json(kvmctl: Kvmctl, client: KvmdClient, address: str) -> None:
    summary = ok(kvmctl("demo", "--json")).json()
    assert summary["console"] == guest.EXPECTED_CONSOLE
    assert (summary["state"], summary["reason"], summary["exit_code"]) == (
        "stopped", "debug_exit", 42)
    assert summary["ok"] is True and summary["deleted"] is True
    assert summary["exit_counts"] == DEMO_COUNTS
    assert summary["vcpu_exit_counts"] == {"0": DEMO_COUNTS}
    assert summary["address"] == address
    assert 0 < summary["elapsed_seconds"] < 30
    assert_gone(client, summary["vm_id"])


def test_demo_keep(kvmctl: Kvmctl, client: KvmdClient, vm_id: str) -> None:
    result = ok(kvmctl("demo", "--vm-id", vm_id, "--keep"))
    assert demo_vm_id(result.out) == vm_id
    assert result.out.splitlines()[-1].startswith(f"kept vm {vm_id}: ")
    vm = client.get_vm(vm_id)
    assert (vm.state, vm.reason, vm.exit_code) == ("stopped", "debug_exit", 42)
    assert vm.labels["created-by"] == "kvmctl-demo"
    assert {k: v for k, v in client.exit_stats(vm_id).total.items() if v} == DEMO_COUNTS


def test_demo_keep_json(kvmctl: Kvmctl, client: KvmdClient, vm_id: str) -> None:
    summary = ok(kvmctl("demo", "--vm-id", vm_id, "--keep", "--json")).json()
    assert (summary["vm_id"], summary["deleted"]) == (vm_id, False)
    assert client.get_vm(vm_id).exit_code == 42


def test_demo_with_a_taken_id(kvmctl: Kvmctl, client: KvmdClient, vm_id: str,
                              assert_healthy: Healthy) -> None:
    """An existing VM is refused (ALREADY_EXISTS) and left alone, never deleted."""
    client.create_vm(vm_id, {"mine": "yes"})
    result = kvmctl("demo", "--vm-id", vm_id)
    assert result.code == 1 and result.err.startswith("error: ALREADY_EXISTS (VM_ALREADY_EXISTS): ")
    assert result.out == ""
    assert client.get_vm(vm_id).labels["mine"] == "yes"
    assert_healthy()


def test_demo_daemon_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", f"unix://{tmp_path}/nobody.sock", "demo"]) == 3
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_demo_subprocess(address: str, client: KvmdClient) -> None:
    proc = run_script(address, "demo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"{GREETING}\n{COUNTING}\nbye!\n--- end of console ---\n" in proc.stdout
    assert "exit code 42" in proc.stdout
    assert int(table(proc.stdout)["io_out"][0]) > 0
    assert_gone(client, demo_vm_id(proc.stdout))


def test_demo_subprocess_json(address: str, client: KvmdClient) -> None:
    proc = run_script(address, "demo", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["console"].startswith(GREETING)
    assert summary["exit_code"] == 42 and summary["exit_counts"]["io_out"] > 0
    assert_gone(client, summary["vm_id"])


def test_demo_subprocess_keep(address: str, client: KvmdClient, vm_id: str) -> None:
    proc = run_script(address, "demo", "--keep", "--vm-id", vm_id)
    assert proc.returncode == 0, proc.stderr
    assert client.get_vm(vm_id).exit_code == 42


# ---------------------------------------------------------------------------------------------
# kvmctl exits (and its alias vm stats)


@pytest.fixture
def demo_vm(kvmctl: Kvmctl, vm_id: str) -> str:
    """A stopped VM left behind by ``kvmctl demo --keep``."""
    ok(kvmctl("demo", "--vm-id", vm_id, "--keep", "--json"))
    return vm_id


def test_exits(kvmctl: Kvmctl, demo_vm: str) -> None:
    out = ok(kvmctl("exits", demo_vm)).out
    rows = table(out)
    assert rows.pop("REASON") == ["TOTAL", "VCPU0"]
    assert rows == {r: [str(n), str(n)] for r, n in DEMO_COUNTS.items()}
    assert ok(kvmctl("vm", "stats", demo_vm)).out == out  # the old name still works


def test_exits_one_vcpu_and_all(kvmctl: Kvmctl, demo_vm: str) -> None:
    rows = table(ok(kvmctl("exits", demo_vm, "--vcpu", "0")).out)
    assert rows.pop("REASON") == ["VCPU0"]
    assert rows == {r: [str(n)] for r, n in DEMO_COUNTS.items()}
    every = table(ok(kvmctl("exits", demo_vm, "--all")).out)
    assert every["hlt"] == ["0", "0"] and every["mmio"] == ["0", "0"]
    assert every["io_out"] == [str(DEMO_COUNTS["io_out"])] * 2
    assert table(ok(kvmctl("vm", "stats", demo_vm, "--vcpu", "0", "--all")).out)["hlt"] == ["0"]


def test_exits_json(kvmctl: Kvmctl, demo_vm: str) -> None:
    assert ok(kvmctl("exits", demo_vm, "--json")).json() == {
        "vm_id": demo_vm, "total": DEMO_COUNTS, "vcpus": {"0": DEMO_COUNTS}}
    assert ok(kvmctl("exits", demo_vm, "--vcpu", "0", "--json")).json() == {
        "vm_id": demo_vm, "vcpu_id": 0, "counts": DEMO_COUNTS}
    every = ok(kvmctl("exits", demo_vm, "--all", "--json")).json()
    assert every["total"]["hlt"] == 0 and every["total"]["io_in"] == DEMO_COUNTS["io_in"]
    assert set(every["vcpus"]["0"]) == set(every["total"])


def test_exits_before_running(kvmctl: Kvmctl, client: KvmdClient, vm_id: str) -> None:
    client.create_vm(vm_id)
    assert ok(kvmctl("exits", vm_id)).out == "No exits yet.\n"
    client.create_vcpu(vm_id, 0)
    assert ok(kvmctl("exits", vm_id, "--vcpu", "0")).out == "No exits yet.\n"
    assert ok(kvmctl("exits", vm_id, "--json")).json() == {
        "vm_id": vm_id, "total": {}, "vcpus": {"0": {}}}


def test_exits_errors(kvmctl: Kvmctl, demo_vm: str, assert_healthy: Healthy) -> None:
    result = kvmctl("exits", "no-such-vm")
    assert result.code == 1 and result.err.startswith("error: NOT_FOUND (VM_NOT_FOUND): ")
    result = kvmctl("exits", demo_vm, "--vcpu", "5")
    assert result.code == 1 and result.err.startswith("error: NOT_FOUND (VCPU_NOT_FOUND): ")
    assert kvmctl("exits").code == 2
    assert kvmctl("exits", demo_vm, "--vcpu", "-1").code == 2
    assert_healthy()


# ---------------------------------------------------------------------------------------------
# kvmctl vm console, watch, run control


def test_console_no_follow(kvmctl: Kvmctl, demo_vm: str) -> None:
    """A stopped VM's console: the backlog, then kvmctl returns on its own."""
    started = time.monotonic()
    assert ok(kvmctl("vm", "console", demo_vm, "--no-follow")).out == guest.EXPECTED_CONSOLE
    assert time.monotonic() - started < 10  # it did return (the backlog is not empty)
    lines = ok(kvmctl("vm", "console", demo_vm, "--no-follow", "--json")).out.splitlines()
    assert [json.loads(line) for line in lines] == [{"data": guest.EXPECTED_CONSOLE}]


def test_console_no_follow_errors(kvmctl: Kvmctl, demo_vm: str, client: KvmdClient,
                                  vm_ids: Callable[[], str]) -> None:
    result = kvmctl("vm", "console", "no-such-vm", "--no-follow")
    assert result.code == 1 and result.err.startswith("error: NOT_FOUND (VM_NOT_FOUND): ")
    assert kvmctl("vm", "console", demo_vm, "--no-follow", "--no-backlog").code == 2
    silent = vm_ids()
    client.create_vm(silent)
    result = ok(kvmctl("vm", "console", silent, "--no-follow", "--backlog-wait", "0.2"))
    assert result.out == ""


def test_console_follow_ends_with_duration(kvmctl: Kvmctl, demo_vm: str) -> None:
    assert ok(kvmctl("vm", "console", demo_vm, "--duration", "0.5")).out == (
        guest.EXPECTED_CONSOLE)
    assert ok(kvmctl("vm", "console", demo_vm, "--no-backlog", "--duration", "0.3")).out == ""


def test_console_interactive(kvmctl: Kvmctl, client: KvmdClient, vm_id: str,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """-i sends stdin lines to the guest through WriteConsole; the echo guest sends them back
    and ends on 'q'."""
    boot_echo_guest(client, vm_id)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nq\n"))
    result = ok(kvmctl("vm", "console", vm_id, "-i", "--duration", "2"))
    assert result.out == "hello\nq"
    final = client.wait_vm(vm_id, timeout=10)
    assert (final.state, final.reason, final.exit_code) == ("stopped", "debug_exit", ord("q"))


def test_console_not_interactive_without_a_terminal(
    kvmctl: Kvmctl, client: KvmdClient, vm_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without -i and with stdin not a terminal, stdin is left alone."""
    boot_echo_guest(client, vm_id)
    monkeypatch.setattr(sys, "stdin", io.StringIO("ignored\nq\n"))
    assert ok(kvmctl("vm", "console", vm_id, "--duration", "0.5")).out == ""
    assert sys.stdin.read() == "ignored\nq\n"
    assert client.get_vm(vm_id).state == "running"


def test_console_interactive_subprocess(address: str, client: KvmdClient, vm_id: str) -> None:
    boot_echo_guest(client, vm_id)
    proc = subprocess.run(
        kvmctl_command("--address", address, "vm", "console", vm_id, "-i", "--duration", "3"),
        input="ping\nq\n", capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ping\nq", "")
    assert client.wait_vm(vm_id, timeout=10).exit_code == ord("q")


# Runs its arguments with SIGINT at its default, as from a terminal: a suite started in the
# background without job control has SIGINT ignored, and kvmctl would inherit that (Python
# then keeps it ignored). Not a preexec_fn: this process has gRPC threads, and with one, the
# forked child runs gRPC's fork handlers, which start poller threads there; closing the
# child's fds before exec then pulls their epoll fd away and gRPC aborts the child (seen on a
# loaded host: no output, SIGABRT, "epoll_wait error: Bad file descriptor").
SIGINT_DEFAULT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
                  "signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]


@pytest.mark.parametrize("command", [["vm", "console"], ["vm", "console", "-i"],
                                     ["vm", "watch", "--current"]],
                         ids=["console", "console-i", "watch"])
def test_ctrl_c_ends_cleanly(address: str, demo_vm: str, command: list[str]) -> None:
    """SIGINT (Ctrl-C) while following: exit code 0, no traceback."""
    proc = subprocess.Popen(
        [*SIGINT_DEFAULT, *kvmctl_command("--address", address, *command[:2], demo_vm,
                                          *command[2:])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no output from kvmctl"
        first = os.read(proc.stdout.fileno(), 4096)
        expected = b"stopped" if command[1] == "watch" else GREETING.encode()
        assert expected in first, (first, b"" if first else (proc.communicate(timeout=20),
                                                             proc.returncode))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


def test_run_control_from_the_shell(kvmctl: Kvmctl, client: KvmdClient, vm_id: str) -> None:
    """vm start/pause/resume/stop/watch on the echo guest (it spins, polling its UART)."""
    boot_echo_guest(client, vm_id)
    assert ok(kvmctl("vm", "pause", vm_id)).out.strip() == f"vm {vm_id}: paused"
    assert ok(kvmctl("vm", "resume", vm_id, "--json")).json()["state"] == "running"
    assert ok(kvmctl("vm", "stop", vm_id)).out.startswith(f"vm {vm_id}: stopped")
    assert ok(kvmctl("vm", "start", vm_id)).out.strip() == f"vm {vm_id}: running"
    client.write_console(vm_id, b"q")
    final = ok(kvmctl("vm", "wait", vm_id, "--within", "30", "--json")).json()
    assert (final["state"], final["exit_code"]) == ("stopped", ord("q"))
    watched = kvmctl("vm", "watch", vm_id, "--current", "--count", "1")
    assert watched.code == 0 and watched.err.startswith(f"watching events of vm {vm_id}")
    assert "-> stopped  (debug_exit)  exit code 113" in watched.out
    assert int(table(ok(kvmctl("exits", vm_id)).out)["io_in"][0]) > 0
