"""Migration tests: two kvmd processes on this machine stand in for two hosts. Each has a
Unix socket (the orchestrator's, here the test's) and a TLS listener on 127.0.0.1 (the
daemons' link), with host certificates from a test CA (trustme); a daemon's certificate is
both its server certificate and the client certificate it presents to a migration target.

The working-set guest checks its own memory: on every pass over its working set it verifies
that each page still holds the previous pass's number before writing the next one, and
exits through the debug port (the VM stops with exit code 0xBD) at the first page that does
not. A migration that loses or repeats a page, or resumes stale memory, stops the guest.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "state"))

from polling import wait_until
from state_guests import COUNTER_ADDR, PRINT_ROUTINES, assemble
from state_support import Node, connect

from kvmd.migration.transport import METHOD
from kvmd_proto import vmm_pb2 as pb

if not os.path.exists("/dev/kvm"):
    pytest.skip("/dev/kvm is absent: the migration tests need real KVM", allow_module_level=True)

MiB = 1 << 20
WS_BASE = 1 * MiB            # the working set: one dword per page, rewritten every pass
WS_PAGES = 1024              # 4 MiB
STATIC_BASE = 6 * MiB        # 1 MiB of random bytes the guest never touches
STATIC_SIZE = 1 * MiB
GUEST_MEM = 8 * MiB
BAD_EXIT_CODE = 0xBD

WORKING_SET_SOURCE = r"""
    .code16
    .set WS_BASE, {base}
    .set WS_END, {end}
start:
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xF000, %sp
next:
    mov 0x2000, %eax            # c: passes completed (each page holds c)
    mov %eax, %ecx
    inc %ecx                    # this pass writes c+1
    mov $WS_BASE, %edi
pass:
    addr32 cmpl %es:(%edi), %eax
    jne bad
    addr32 movl %ecx, %es:(%edi)
    add $0x1000, %edi
    cmp $WS_END, %edi
    jb pass
    mov %ecx, 0x2000
    mov %ecx, %eax
    call print_dec
    jmp next
bad:
    mov $0xBD, %al
    mov $0x501, %dx
    out %al, %dx
    hlt

"""


def working_set_source(pages: int = WS_PAGES, base: int = WS_BASE) -> str:
    return WORKING_SET_SOURCE.format(base=base, end=base + pages * 4096) + PRINT_ROUTINES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """A CA, a certificate per host (server and client: SANs localhost and 127.0.0.1), and
    one from an unrelated CA (a daemon nobody trusts)."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    other_ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return str(path)

    def host(self, name: str, *, untrusted: bool = False) -> tuple[str, str]:
        """(cert, key) files for host `name`."""
        ca = self.other_ca if untrusted else self.ca
        leaf = ca.issue_cert("localhost", "127.0.0.1", common_name=name)
        return (self._write(f"{name}.pem", leaf.cert_chain_pems[0].bytes()),
                self._write(f"{name}.key", leaf.private_key_pem.bytes()))


class Host:
    """A kvmd process: the test's Node on its Unix socket, and its TLS `target` address."""

    def __init__(self, directory: Path, pki: Pki | None, name: str, *args: str,
                 untrusted: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.socket = directory / "kvmd.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = directory / "kvmd.log"
        tls: list[str] = []
        if pki is not None:
            cert, key = pki.host(name, untrusted=untrusted)
            tls = ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki.ca_file]
        script = Path(sys.executable).parent / "kvmd"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(script), "--listen", self.address, "--listen", self.target,
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
             "--state-dir", str(directory / "state"), *tls, *args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.node = Node(self.address, connect(self.address))
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.node.healthy():
                    break
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kvmd {name} did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: {(sample name, sorted labels): value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    @property
    def stubs(self) -> Any:
        return self.node.stubs

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.node.stubs.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    # -- what the tests repeat ------------------------------------------------------------

    def prepare(self, vm_id: str, ttl_seconds: int = 0) -> str:
        return str(self.stubs.migration.PrepareIncomingMigration(
            pb.PrepareIncomingMigrationRequest(vm_id=vm_id, ttl_seconds=ttl_seconds)).token)

    def migrate(self, vm_id: str, target: Host | str, token: str | None = None,
                timeout: float = 120, **options: Any) -> list[pb.MigrationProgress]:
        """Migrate (preparing the target unless `token`); every progress message."""
        address = target if isinstance(target, str) else target.target
        if token is None:
            assert isinstance(target, Host)
            token = target.prepare(vm_id)
        call = self.stubs.migration.MigrateVm(pb.MigrateVmRequest(
            vm_id=vm_id, target=address, token=token,
            options=pb.MigrationOptions(**options)), timeout=timeout)
        return list(call)

    def vm(self, vm_id: str) -> pb.Vm:
        return self.stubs.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))

    def vm_ids(self) -> list[str]:
        return self.node.vm_ids()

    def migrations(self) -> list[pb.MigrationInfo]:
        return list(self.stubs.migration.ListMigrations(pb.ListMigrationsRequest()).migrations)

    def boot_working_set(self, vm_id: str, *, pages: int = WS_PAGES,
                         static: bytes = b"", log_dirty: bool = True,
                         **options: Any) -> None:
        """The self-checking working-set guest (not started); `static` is written at
        STATIC_BASE."""
        s = self.stubs
        s.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, options=pb.VmOptions(**options)))
        s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=GUEST_MEM, log_dirty=log_dirty))
        node = self.node
        node.write(vm_id, 0x1000, assemble(working_set_source(pages)))
        if static:
            node.write(vm_id, STATIC_BASE, static)
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        s.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
        sregs = s.vcpus.GetSregs(ref)
        sregs.cs.base, sregs.cs.selector = 0x1000, 0x100
        sregs.es.limit, sregs.es.g = 0xFFFFFFFF, 1  # "unreal mode": 32-bit offsets via ES
        s.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
        s.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rsp=0xF000,
                                                                 rflags=2)))

    def passes(self, vm_id: str) -> int:
        return self.node.u32(vm_id, COUNTER_ADDR)


class ConsoleFollower:
    """Reads a VM's console (backlog, then live) in a thread until the stream ends."""

    def __init__(self, host: Host, vm_id: str) -> None:
        self.data = bytearray()
        self.error: grpc.RpcError | None = None
        self._call = host.stubs.vms.StreamConsole(
            pb.StreamConsoleRequest(vm_id=vm_id, backlog=True), timeout=300)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._call:
                self.data += chunk.data
        except grpc.RpcError as exc:
            self.error = exc

    def join(self, timeout: float = 30) -> bytes:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the console stream did not end"
        return bytes(self.data)

    def cancel(self) -> None:
        self._call.cancel()


class LinkProxy:
    """A TCP proxy between two daemons: `cut()` closes every connection through it, as a
    broken network link would."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = upstream_port
        self.listener = socket.socket()
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.target = f"{host}:{self.port}"
        self.bytes = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                try:  # RST to both daemons, as from a dead link (shutdown wakes the pumps)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    """tests/polling.wait_until, under the name these tests use."""
    return wait_until(predicate, timeout, what, interval=0.05)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("migration-pki"))


class HostPair:
    """The session's source and target daemons, restarted when a test killed one."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.directory = directory
        self.pki = pki
        self.starts = 0
        # One images directory for both: shared storage, as between two hosts of a cluster.
        self.images = directory / "images"
        self.images.mkdir(mode=0o750)
        self.a = self._start("kvmd-a")
        self.b = self._start("kvmd-b")

    def _start(self, name: str) -> Host:
        self.starts += 1
        return Host(self.directory / f"{name}-{self.starts}", self.pki, name,
                    "--images-dir", str(self.images))

    def fresh(self) -> tuple[Host, Host]:
        if self.a.proc.poll() is not None:
            self.a.stop()
            self.a = self._start("kvmd-a")
        if self.b.proc.poll() is not None:
            self.b.stop()
            self.b = self._start("kvmd-b")
        return self.a, self.b

    def clean(self) -> None:
        """After a test: no migration, no VM left on either daemon that still runs."""
        for host in (self.a, self.b):
            if host.proc.poll() is not None:
                continue
            for m in host.migrations():
                try:
                    host.stubs.migration.CancelMigration(
                        pb.CancelMigrationRequest(vm_id=m.vm_id))
                except grpc.RpcError:
                    pass  # ended meanwhile
            wait_for(lambda h=host: not h.migrations(), 30, f"{host.name}'s migrations to end")
            for vm_id in host.vm_ids():
                host.stubs.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id))

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


@pytest.fixture(scope="session")
def host_pair(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[HostPair]:
    pair = HostPair(tmp_path_factory.mktemp("migration"), pki)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
def hosts(host_pair: HostPair) -> Iterator[tuple[Host, Host]]:
    """Two daemons with mTLS between them, the source and the target, each without VMs
    or migrations at the start of the test."""
    pair = host_pair.fresh()
    try:
        yield pair
    finally:
        host_pair.clean()


def fake_target(receive: Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]],
                *options: tuple[str, Any]) -> tuple[grpc.Server, str]:
    """A started grpcio server playing the target's ReceiveMigration with `receive` (raw
    message bytes in and out), and its address: a source's GrpcTransport against a target
    that misbehaves as a test needs. Stop the server after the test."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=list(options))
    service, method = METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        service.strip("/"), {method: grpc.stream_stream_rpc_method_handler(receive)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"
