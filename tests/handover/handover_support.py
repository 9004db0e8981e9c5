"""Hand-over tests: kvmd processes, a faithful emulation of systemd's notify socket and fd
store, and the guests (assembled with GNU as, like tests/state's).

`FakeSystemd` is what systemd does for a Type=notify unit with FileDescriptorStoreMax=: a
SOCK_DGRAM notify socket (NOTIFY_SOCKET) whose messages it reads with their SCM_RIGHTS fds
(READY=1, STATUS=, STOPPING=1, FDSTORE=1 + FDNAME=, FDSTOREREMOVE=1 + FDNAME=, BARRIER=1:
it closes the fd it got once everything before was processed); fds already in the store
(same inode and flags, systemd's same_fd) are kept once; `restart()` sends SIGTERM, waits
for the exit and starts the next process with the store's fds from fd 3, LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID set to the new process's pid (a wrapper that execs kvmd), and
RUNTIME_DIRECTORY, as systemd 252 does across `systemctl restart`.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "state"))

from daemon_threads import own_thread_nices
from state_guests import PRINT_ROUTINES, assemble

from kvmd.config import DEFAULT_VCPU_NICE
from kvmd_client.kvmd_client import KvmdClient
from kvmd_proto import vmm_pb2 as pb

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the hand-over tests need real KVM",
                allow_module_level=True)

KVMD = str(Path(sys.executable).parent / "kvmd")
LISTEN_EXEC = str(Path(__file__).resolve().parent / "listen_exec.py")
CODE_ADDR = 0x1000
CODE_SEGMENT = CODE_ADDR >> 4
MEM_SIZE = 0x40000
COUNTER = 0x2000       # the number printed last
TICKS = 0x2004         # PIT interrupts counted (irqchip guests)
IRQ5S = 0x2008         # IRQ 5 interrupts counted (irqchip guests: irqfd on GSI 5)
PATTERN_ADDR = 0x30000  # 64 KiB the guests never touch: written before, read after
PATTERN_SIZE = 0x10000
STACK_TOP = 0xF000
IOEVENT_PORT = 0x99    # each printed number is followed by an OUT here (an ioevent)
CONSOLE_BUFFER = 4 << 20  # every number a test's guests print fits
START_TIMEOUT = 60.0

# Prints 1, 2, 3, ... on COM1, one per line, storing the number at COUNTER first; writes
# IOEVENT_PORT after each. With IRQS (irqchip guests), the PIC is set up first: IRQ0 (the
# in-kernel PIT at 100 Hz) counts in TICKS and paces the numbers (HLT until the next tick),
# IRQ5 (an irqfd) counts in IRQ5S. With CLAIMED, each number first reads CLAIMED_PORT.
_COUNTER = r"""
    .code16
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xF000, %sp
.if IRQS
    cli
    movw $tick, 0x20            # IVT 8: IRQ0 after the remap below
    movw $0x100, 0x22
    movw $irq5, 0x34            # IVT 13: IRQ5
    movw $0x100, 0x36
    mov $0x11, %al              # PIC: ICW1..4, vectors 8-15, IRQ0 and IRQ5 unmasked
    out %al, $0x20
    mov $0x08, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xDE, %al
    out %al, $0x21
    mov $0x34, %al              # PIT channel 0: rate generator, 11932 -> 100 Hz
    out %al, $0x43
    mov $0x9C, %al
    out %al, $0x40
    mov $0x2E, %al
    out %al, $0x40
    sti
.endif
next:
.if IRQS
    hlt                         # one number per PIT tick: irqchip guests idle in between
.endif
.if CLAIMED
    in $0x98, %al               # a port a remote exit handler may claim
.endif
    incl 0x2000
    mov 0x2000, %eax
    call print_dec
    out %al, $0x99
    jmp next

.if IRQS
tick:
    incl 0x2004
    push %ax
    mov $0x20, %al
    out %al, $0x20
    pop %ax
    iret
irq5:
    incl 0x2008
    push %ax
    mov $0x20, %al
    out %al, $0x20
    pop %ax
    iret
.endif
"""
COUNTER_SOURCE = ".set IRQS, 0\n.set CLAIMED, 0\n" + _COUNTER + PRINT_ROUTINES
IRQ_COUNTER_SOURCE = ".set IRQS, 1\n.set CLAIMED, 0\n" + _COUNTER + PRINT_ROUTINES
CLAIMED_COUNTER_SOURCE = ".set IRQS, 0\n.set CLAIMED, 1\n" + _COUNTER + PRINT_ROUTINES
CLAIMED_PORT = 0x98


def numbers(text: bytes) -> list[int]:
    """The complete numbers in a console's output (a trailing partial line dropped)."""
    lines = text.split(b"\n")
    return [int(x) for x in lines[:-1] if x]


def assert_consecutive(values: list[int], what: str) -> None:
    assert values, f"{what}: nothing printed"
    for a, b in itertools.pairwise(values):
        assert b == a + 1, f"{what}: {a} is followed by {b}"


def pattern(vm_id: str) -> bytes:
    seed = vm_id.encode() * 4
    return bytes((seed[i % len(seed)] * 31 + i) & 0xFF for i in range(PATTERN_SIZE))


def boot(c: KvmdClient, vm_id: str, irqs: bool = False, claimed: bool = False) -> None:
    """A counter guest (with irqchip, PIT, an irqfd on GSI 5 when `irqs`; reading
    CLAIMED_PORT when `claimed`), an ioevent on IOEVENT_PORT, a pattern in untouched memory,
    started."""
    # Console buffers large enough that the backlog holds all a test prints: the whole
    # sequence can be checked afterwards (the live, offset-resumed stream is checked too).
    c._vms.CreateVm(pb.CreateVmRequest(  # the client has no console_buffer_bytes argument
        vm_id=vm_id, labels={"test": "handover"}, options=pb.VmOptions(
            irqchip=irqs, pit=irqs, console_buffer_bytes=CONSOLE_BUFFER)), timeout=30)
    c.add_memory_region(vm_id, 0, MEM_SIZE, log_dirty=True)
    source = IRQ_COUNTER_SOURCE if irqs else CLAIMED_COUNTER_SOURCE if claimed \
        else COUNTER_SOURCE
    c.write_memory(vm_id, CODE_ADDR, assemble(source))
    c.write_memory(vm_id, PATTERN_ADDR, pattern(vm_id))
    c.create_vcpu(vm_id, 0)
    c.set_sregs(vm_id, 0, cs={"base": CODE_ADDR, "selector": CODE_SEGMENT})
    c.set_regs(vm_id, 0, rip=0, rsp=STACK_TOP, rflags=2)
    c.register_ioevent(vm_id, "out", IOEVENT_PORT, 1)
    if irqs:
        c.register_irqfd(vm_id, "irq5", 5)
    c.start_vm(vm_id)


def u32(c: KvmdClient, vm_id: str, addr: int) -> int:
    return int(struct.unpack("<I", c.read_memory(vm_id, addr, 4))[0])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a daemon in the middle of a hand-over
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- daemon processes ------------------------------------------------------------------------

class Kvmd:
    """One kvmd process on `directory`/kvmd.sock (its log in `directory`/kvmd-<n>.log)."""

    _numbers = iter(range(1000))
    # Every process started, so that a failed test cannot leave daemons (and their spinning
    # guests) running into the tests after it (reap_daemons).
    started: list[Kvmd] = []

    def __init__(self, directory: Path, *args: str, env: dict[str, str] | None = None,
                 argv: list[str] | None = None, pass_fds: tuple[int, ...] = (),
                 wait: bool = True) -> None:
        self.dir = directory
        self.socket = directory / "kvmd.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = directory / f"kvmd-{next(self._numbers)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        base = [KVMD, "--listen", self.address, "--metrics-listen", "off",
                "--state-dir", str(directory / "state"), "--log-level", "info", *args]
        self.proc = subprocess.Popen(
            (argv or []) + base, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, pass_fds=pass_fds)
        Kvmd.started.append(self)
        if wait:
            self.wait_serving()

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while "kvmd listening" not in self.log:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kvmd did not start (exit {self.proc.poll()}):\n"
                                     f"{self.log}")
            time.sleep(0.02)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def stop(self) -> int:
        self.signal()
        return self.wait()

    def log_lines(self, message: str) -> list[dict[str, str]]:
        """The logfmt lines whose msg is `message`, as {key: value}."""
        out = []
        for line in self.log.splitlines():
            fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
            fields = {k: v.strip('"') for k, v in fields.items()}
            if fields.get("msg") == message:
                out.append(fields)
        return out


# -- systemd's notify socket and fd store ----------------------------------------------------

def same_fd(a: int, b: int) -> bool:
    """systemd's same_fd(): one inode, and the same file status flags."""
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


@dataclass
class FakeSystemd:
    """A Type=notify service's manager: notify socket, fd store, restarts."""

    directory: Path
    args: tuple[str, ...] = ()
    store: list[tuple[str, int]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    current: Kvmd | None = None
    store_max: int = 16384

    def __post_init__(self) -> None:
        self.notify_path = str(self.directory / "notify.sock")
        self.runtime_dir = self.directory / "run"
        self.runtime_dir.mkdir(exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.notify_path)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        fd_size = array.array("i").itemsize
        while not self._closing:
            try:
                data, ancdata, _flags, _ = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(253 * fd_size) + socket.CMSG_SPACE(12))
            except OSError:
                return
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[:len(payload) - len(payload) % fd_size])
                    fds.extend(arr)
            self._handle(data.decode(errors="replace"), fds)

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        with self._lock:
            self.messages.append(text)
            if fields.get("READY") == "1":
                self._ready.set()
            if fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME", "")
                for entry in [e for e in self.store if e[0] == name]:
                    self.store.remove(entry)
                    os.close(entry[1])
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                for fd in fds:
                    if any(same_fd(fd, held) for _, held in self.store) or \
                            len(self.store) >= self.store_max:
                        os.close(fd)
                    else:
                        self.store.append((name, fd))
                fds = []
        for fd in fds:  # BARRIER=1's fd, and anything else systemd would not keep
            os.close(fd)

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_path, "RUNTIME_DIRECTORY": str(self.runtime_dir)}

    def start(self, wait: bool = True) -> Kvmd:
        """Start the service, passing the fd store (as systemd does at every start)."""
        self._ready.clear()
        with self._lock:
            held = list(self.store)
        env = self.env()
        argv: list[str] = []
        if held:
            env["LISTEN_FDNAMES"] = ":".join(n for n, _ in held)
            env["LISTEN_FDS_FROM"] = ",".join(str(fd) for _, fd in held)
            argv = [sys.executable, LISTEN_EXEC]
        self.current = Kvmd(self.directory, *self.args, env=env, argv=argv,
                            pass_fds=tuple(fd for _, fd in held), wait=wait)
        return self.current

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        if not self._ready.wait(timeout):
            raise AssertionError("the service never sent READY=1")

    def stop(self) -> int:
        assert self.current is not None
        return self.current.stop()

    def restart(self) -> Kvmd:
        """systemctl restart: SIGTERM, wait for the exit, start again with the store."""
        code = self.stop()
        assert code == 0, f"kvmd exited {code}:\n{self.current.log if self.current else ''}"
        return self.start()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, _ in self.store)

    def close(self) -> None:
        if self.current is not None and self.current.proc.poll() is None:
            self.current.stop()
        self._closing = True
        self._sock.close()
        with self._lock:
            for _, fd in self.store:
                os.close(fd)
            self.store.clear()


def connect(address: str, **kwargs: Any) -> KvmdClient:
    kwargs.setdefault("timeout", 30.0)
    return KvmdClient(address, **kwargs)


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    sd = FakeSystemd(tmp_path)
    try:
        yield sd
    finally:
        sd.close()


@pytest.fixture(autouse=True)
def reap_daemons() -> Iterator[None]:
    """After each test, kill any daemon it left running (a test that failed half-way)."""
    yield
    while Kvmd.started:
        kvmd = Kvmd.started.pop()
        if kvmd.proc.poll() is None:
            kvmd.proc.kill()
            kvmd.wait()


def vcpu_thread_ids(pid: int) -> list[int]:
    """The daemon's threads at vcpu_nice (10 by default: only vCPU threads lower their
    priority)."""
    return [tid for tid, nice in own_thread_nices(pid).items() if nice == DEFAULT_VCPU_NICE]


def memfd_descriptors() -> list[int]:
    """The inode behind each memfd descriptor this process holds (one per descriptor)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:"):
                out.append(os.stat(f"/proc/self/fd/{name}").st_ino)
        except OSError:
            pass
    return out
