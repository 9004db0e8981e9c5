"""Helpers for the deployment tests: a test PKI (trustme), in-process TLS daemons with raw
stubs per identity, the kvmd console script as a process, metrics scraping."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2
from guests import CODE_ADDR, GUEST_MEM_SIZE, STACK_TOP, UART_PORT, out_bytes_program
from kvmd_stubs import Stubs as StubsBase
from prometheus_client.parser import text_string_to_metric_families

from kvmd.server import Config, Daemon
from kvmd_proto import vmm_pb2 as pb

BIN_DIR = Path(sys.executable).parent
# Every RPC in these tests gets a deadline: a daemon bug fails a test, never hangs it.
RPC_TIMEOUT = 10.0
# A handshake that must fail gets this long to do so.
FAIL_TIMEOUT = 5.0

# The identities of the test PKI: certificate CN = name, SAN = name + ".clients.test".
IDENTITIES = ("admin-1", "operator-a", "operator-b", "viewer-1", "stranger")
SAN_SUFFIX = ".clients.test"


def kvmd_script() -> str:
    """The installed `kvmd` console script of this virtualenv."""
    script = BIN_DIR / "kvmd"
    if script.exists():
        return str(script)
    found = shutil.which("kvmd")
    assert found, "the kvmd console script is not installed (make install)"
    return found


def kvmctl_script() -> str:
    script = BIN_DIR / "kvmctl"
    if script.exists():
        return str(script)
    found = shutil.which("kvmctl")
    assert found, "the kvmctl console script is not installed (make install)"
    return found


# -- PKI -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


@dataclass
class Pki:
    """A CA with a server certificate (localhost, 127.0.0.1) and one client certificate per
    identity, plus a second, unrelated CA with its own client certificates."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    other_ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_file = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())
        self.server = self.issue_server("server")
        self.clients = {name: self.issue_client(self.ca, name, name) for name in IDENTITIES}
        # Same names as the real clients, signed by a CA the daemon does not trust.
        self.wrong_ca_clients = {name: self.issue_client(self.other_ca, name, f"wrong-{name}")
                                 for name in ("admin-1", "operator-a")}

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        os.chmod(path, 0o600)
        return str(path)

    def issue_server(self, stem: str) -> CertFiles:
        """A fresh server certificate (new key, new serial) for localhost and 127.0.0.1."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", common_name="kvmd.test")
        return CertFiles(self._write(f"{stem}.pem", leaf.cert_chain_pems[0].bytes()),
                         self._write(f"{stem}.key", leaf.private_key_pem.bytes()))

    def issue_client(self, ca: trustme.CA, name: str, stem: str) -> CertFiles:
        leaf = ca.issue_cert(name + SAN_SUFFIX, common_name=name)
        return CertFiles(self._write(f"client-{stem}.pem", leaf.cert_chain_pems[0].bytes()),
                         self._write(f"client-{stem}.key", leaf.private_key_pem.bytes()))


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def cert_serial(pem_or_der: bytes) -> int:
    if pem_or_der.startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(pem_or_der).serial_number
    return x509.load_der_x509_certificate(pem_or_der).serial_number


def peer_certificate(port: int, pki: Pki, client: CertFiles | None = None) -> bytes:
    """The DER certificate the daemon presents on a new TLS connection (verified against
    the test CA), using the `ssl` module instead of grpc."""
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    with socket.create_connection(("127.0.0.1", port), timeout=FAIL_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


# -- stubs ---------------------------------------------------------------------------------

class Stubs(StubsBase):
    """One channel and a stub per kvmd service (plus health), with conveniences."""

    # Small conveniences used by many tests (all with a deadline).
    def create_vm(self, vm_id: str) -> pb.Vm:
        return self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def get_vm(self, vm_id: str) -> pb.Vm:
        return self.vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def list_ids(self) -> set[str]:
        return {v.vm_id for v in self.vms.ListVms(pb.ListVmsRequest(),
                                                  timeout=RPC_TIMEOUT).vms}

    def delete_vm(self, vm_id: str) -> None:
        self.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)

    def boot(self, vm_id: str, message: bytes = b"hi", **options: Any) -> pb.Vm:
        """A real-mode VM (RAM at 0, one vCPU) whose guest writes `message` to COM1 and
        halts. Not started."""
        vm = self.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, options=pb.VmOptions(**options)),
                               timeout=RPC_TIMEOUT)
        self.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id=vm_id, guest_addr=0, size=GUEST_MEM_SIZE), timeout=RPC_TIMEOUT)
        self.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
            vm_id=vm_id, guest_addr=CODE_ADDR,
            data=out_bytes_program(message, UART_PORT))]), timeout=RPC_TIMEOUT)
        self.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0), timeout=RPC_TIMEOUT)
        ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
        sregs = self.vcpus.GetSregs(ref, timeout=RPC_TIMEOUT)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            getattr(sregs, name).base = 0
            getattr(sregs, name).selector = 0
        self.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=RPC_TIMEOUT)
        self.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(
            rip=CODE_ADDR, rflags=2, rsp=STACK_TOP)), timeout=RPC_TIMEOUT)
        return vm

    def console_backlog(self, vm_id: str, length: int) -> bytes:
        """The first `length` bytes of the VM's console (backlog, then live)."""
        call = self.vms.StreamConsole(pb.StreamConsoleRequest(vm_id=vm_id, backlog=True),
                                      timeout=RPC_TIMEOUT)
        data = b""
        try:
            for chunk in call:
                data += chunk.data
                if len(data) >= length:
                    break
        finally:
            call.cancel()
        return data

    def first_event(self, vm_id: str) -> pb.VmEvent:
        call = self.vms.WatchVm(pb.WatchVmRequest(vm_id=vm_id, include_current=True),
                                timeout=RPC_TIMEOUT)
        try:
            return next(call)
        finally:
            call.cancel()

    def serving(self) -> bool:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                  timeout=RPC_TIMEOUT)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def vm_calls(s: Stubs, vm_id: str) -> dict[str, Callable[[], Any]]:
    """One call per kind of RPC that acts on (or reads) the VM `vm_id` and its vCPU 0:
    {"Service/Method": call}. Streams are returned unconsumed (see `rpc_code`)."""
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
    t = RPC_TIMEOUT
    return {
        "Vms/GetVm": lambda: s.vms.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=t),
        "Vms/DeleteVm": lambda: s.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm_id), timeout=t),
        "Vms/StartVm": lambda: s.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=t),
        "Vms/PauseVm": lambda: s.vms.PauseVm(pb.VmRef(vm_id=vm_id), timeout=t),
        "Vms/StopVm": lambda: s.vms.StopVm(pb.VmRef(vm_id=vm_id), timeout=t),
        "Vms/WatchVm": lambda: s.vms.WatchVm(
            pb.WatchVmRequest(vm_id=vm_id, include_current=True), timeout=t),
        "Vms/GetExitStats": lambda: s.vms.GetExitStats(pb.VmRef(vm_id=vm_id), timeout=t),
        "Vms/StreamConsole": lambda: s.vms.StreamConsole(
            pb.StreamConsoleRequest(vm_id=vm_id, backlog=True), timeout=t),
        "Vms/WriteConsole": lambda: s.vms.WriteConsole(
            pb.WriteConsoleRequest(vm_id=vm_id, data=b"x"), timeout=t),
        "Memory/AddMemoryRegion": lambda: s.memory.AddMemoryRegion(
            pb.AddMemoryRegionRequest(vm_id=vm_id, guest_addr=0x100000, size=0x1000),
            timeout=t),
        "Memory/RemoveMemoryRegion": lambda: s.memory.RemoveMemoryRegion(
            pb.RemoveMemoryRegionRequest(vm_id=vm_id, slot=0), timeout=t),
        "Memory/ListMemoryRegions": lambda: s.memory.ListMemoryRegions(
            pb.ListMemoryRegionsRequest(vm_id=vm_id), timeout=t),
        "Memory/WriteGuestMemory": lambda: s.memory.WriteGuestMemory(iter([
            pb.WriteGuestMemoryRequest(vm_id=vm_id, guest_addr=0x4000, data=b"x")]),
            timeout=t),
        "Memory/ReadGuestMemory": lambda: s.memory.ReadGuestMemory(
            pb.ReadGuestMemoryRequest(vm_id=vm_id, guest_addr=CODE_ADDR, length=16),
            timeout=t),
        "Memory/GetDirtyLog": lambda: s.memory.GetDirtyLog(
            pb.GetDirtyLogRequest(vm_id=vm_id, slot=0), timeout=t),
        "Memory/PollDirtyLog": lambda: s.memory.PollDirtyLog(
            pb.PollDirtyLogRequest(vm_id=vm_id, slot=0), timeout=t),
        "Interrupts/SetIrqLine": lambda: s.interrupts.SetIrqLine(
            pb.SetIrqLineRequest(vm_id=vm_id, irq=4, active=True), timeout=t),
        "IoEvents/RegisterIoevent": lambda: s.ioevents.RegisterIoevent(
            pb.RegisterIoeventRequest(vm_id=vm_id, ioevent_id="ev", space=pb.PIO,
                                      address=0x600, length=1), timeout=t),
        "Vcpus/CreateVcpu": lambda: s.vcpus.CreateVcpu(
            pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=1), timeout=t),
        "Vcpus/ListVcpus": lambda: s.vcpus.ListVcpus(pb.ListVcpusRequest(vm_id=vm_id),
                                                     timeout=t),
        "Vcpus/GetRegs": lambda: s.vcpus.GetRegs(ref, timeout=t),
        "Vcpus/SetRegs": lambda: s.vcpus.SetRegs(
            pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=CODE_ADDR, rflags=2)), timeout=t),
        "Vcpus/StartVcpu": lambda: s.vcpus.StartVcpu(ref, timeout=t),
        "Vcpus/GetVcpuState": lambda: s.vcpus.GetVcpuState(ref, timeout=t),
        "ExitHandlers/HandleExits": lambda: s.exits.HandleExits(iter([
            pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id=vm_id, ranges=[
                pb.AddressRange(space=pb.PIO, base=0x700, length=1)]))]), timeout=t),
    }


def rpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run `call`; the status code it failed with, or OK. A returned stream counts as OK
    once its first message arrives (or it ends cleanly); it is then cancelled."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            try:
                next(result, None)
            finally:
                result.cancel()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def codes(calls: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """{name: status code name} for each call (run in order)."""
    return {name: rpc_code(call).name for name, call in calls.items()}


# -- in-process daemons --------------------------------------------------------------------

class TlsDaemon:
    """An in-process kvmd with a Unix socket and a TLS TCP listener on 127.0.0.1."""

    def __init__(self, pki: Pki, socket_dir: Path, *, mtls: bool = True,
                 policy: list[dict[str, Any]] | None = None, server: CertFiles | None = None,
                 client_ca: str | None = None, **config: Any) -> None:
        self.pki = pki
        self.socket_path = socket_dir / "kvmd.sock"
        config.setdefault("state_dir", str(socket_dir / "state"))
        server = server or pki.server
        cfg = Config(
            listen=[f"unix://{self.socket_path}", "127.0.0.1:0"],
            tls_cert=server.cert, tls_key=server.key,
            tls_client_ca=client_ca or (pki.ca_file if mtls else ""),
            authorization={"identities": policy} if policy is not None else {},
            **config,
        )
        self.daemon = Daemon(cfg)
        self.daemon.start()
        self.port = self.daemon.ports["127.0.0.1:0"]
        self.target = f"127.0.0.1:{self.port}"
        self._stubs: list[Stubs] = []

    def _keep(self, stubs: Stubs) -> Stubs:
        self._stubs.append(stubs)
        return stubs

    def tls(self, identity: str | None = None, *, wrong_ca: bool = False,
            trust: str | None = None) -> Stubs:
        """Stubs over TLS; with `identity`, presenting that identity's client certificate
        (from the untrusted CA with `wrong_ca`). `trust` overrides the CA file trusted."""
        files = None
        if identity is not None:
            files = (self.pki.wrong_ca_clients if wrong_ca else self.pki.clients)[identity]
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(trust or self.pki.ca_file),
            private_key=read(files.key) if files else None,
            certificate_chain=read(files.cert) if files else None)
        return self._keep(Stubs.of(grpc.secure_channel(self.target, creds)))

    def plain_tcp(self) -> Stubs:
        return self._keep(Stubs.of(grpc.insecure_channel(self.target)))

    def local(self) -> Stubs:
        return self._keep(Stubs.of(grpc.insecure_channel(f"unix://{self.socket_path}")))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics: {(sample name, sorted labels): value}."""
        server = self.daemon.metrics_server
        assert server is not None, "start the daemon with metrics_listen='127.0.0.1:0'"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=RPC_TIMEOUT) as reply:
            text = reply.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def close(self) -> None:
        for stubs in self._stubs:
            stubs.close()
        self.daemon.stop()


@contextmanager
def notify_socket(directory: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound SOCK_DGRAM socket for sd_notify messages: (path, socket)."""
    path = str(directory / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield path, sock
    finally:
        sock.close()
        if os.path.lexists(path):
            os.unlink(path)


def run_kvmd(*args: str, socket_path: str | None = None, timeout: float = 30.0,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run the kvmd console script with a configuration it should refuse. Returns once it
    exits; if it starts serving instead (`socket_path` appears and stays), it is stopped
    and the test fails saying so."""
    proc = subprocess.Popen([*prefix, kvmd_script(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + timeout
        served_at: float | None = None
        while proc.poll() is None and time.monotonic() < deadline:
            if served_at is None and socket_path and os.path.exists(socket_path):
                served_at = time.monotonic()
            if served_at is not None and time.monotonic() - served_at > 2.0:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.terminate()
            out, err = proc.communicate(timeout=10)
            raise AssertionError(
                f"kvmd accepted the configuration {list(args)} and "
                f"{'started serving' if served_at else 'kept running'} (expected exit 2); "
                f"stderr:\n{err}")
        out, err = proc.communicate(timeout=10)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
