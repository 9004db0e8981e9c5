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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvmd.api.gen import vmm_pb2 as pb
from kvmd.api.gen import vmm_pb2_grpc as rpc
from kvmd.server import Config, Daemon

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


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


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

@dataclass
class Stubs:
    """One channel and a stub per kvmd service (plus health)."""

    channel: grpc.Channel
    hypervisor: rpc.HypervisorStub
    vms: rpc.VmsStub
    memory: rpc.MemoryStub
    interrupts: rpc.InterruptsStub
    ioevents: rpc.IoEventsStub
    vcpus: rpc.VcpusStub
    exits: rpc.ExitHandlersStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def of(cls, channel: grpc.Channel) -> Stubs:
        return cls(channel, rpc.HypervisorStub(channel), rpc.VmsStub(channel),
                   rpc.MemoryStub(channel), rpc.InterruptsStub(channel),
                   rpc.IoEventsStub(channel), rpc.VcpusStub(channel),
                   rpc.ExitHandlersStub(channel), health_pb2_grpc.HealthStub(channel))

    def close(self) -> None:
        self.channel.close()

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

    def serving(self) -> bool:
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                  timeout=RPC_TIMEOUT)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def rpc_code(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run `call` (consuming a returned stream); the status code it failed with, or OK."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


# -- in-process daemons --------------------------------------------------------------------

class TlsDaemon:
    """An in-process kvmd with a Unix socket and a TLS TCP listener on 127.0.0.1."""

    def __init__(self, pki: Pki, socket_dir: Path, *, mtls: bool = True,
                 policy: list[dict[str, Any]] | None = None, **config: Any) -> None:
        self.pki = pki
        self.socket_path = socket_dir / "kvmd.sock"
        cfg = Config(
            listen=[f"unix://{self.socket_path}", "127.0.0.1:0"],
            tls_cert=pki.server.cert, tls_key=pki.server.key,
            tls_client_ca=pki.ca_file if mtls else "",
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


def run_kvmd(*args: str, env: dict[str, str] | None = None,
             timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the kvmd console script to completion (for configurations it must refuse)."""
    return subprocess.run([kvmd_script(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)
