"""End-to-end fixtures: the kvmd daemon as a real process on a temporary Unix socket.

The session daemon is started once (``.venv/bin/kvmd --listen unix://<tmp>/kvmd.sock``),
awaited through grpc.health.v1, and stopped with SIGTERM at the end; it must exit 0. Tests
that need a daemon of their own (signal handling, stale sockets) use ``start_kvmd``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kvmctl_support import kvmctl

from kvmd_client import KvmdClient, KvmdError, NotFoundError

__all__ = ["kvmctl"]  # the in-process kvmctl fixture, shared by the test files

BIN_DIR = Path(sys.executable).parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def kvmd_command(*args: str) -> list[str]:
    """The kvmd console script next to this interpreter (or the module, if not installed)."""
    script = BIN_DIR / "kvmd"
    if script.exists():
        return [str(script), *args]
    found = shutil.which("kvmd")
    if found:
        return [found, *args]
    return [sys.executable, "-c", "import sys; from kvmd.launch import main; sys.exit(main())",
            *args]


class Daemon:
    """One kvmd process listening on a Unix socket in ``directory``."""

    def __init__(self, directory: Path, name: str = "kvmd") -> None:
        self.directory = directory
        self.socket = directory / f"{name}.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, wait: bool = True) -> Daemon:
        """Spawn the daemon (output to ``log_path``); with ``wait``, block until SERVING."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            kvmd_command(
                "--listen", self.address, "--metrics-listen", "off", "--log-level", "info",
                "--state-dir", str(self.directory / f"{self.socket.stem}-state"), *extra,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for grpc.health.v1 SERVING; fail with the daemon's log if it dies or hangs."""
        assert self.proc is not None
        with KvmdClient(self.address) as client:
            try:
                client.wait_ready(timeout)
            except KvmdError as e:
                code = self.proc.poll()
                pytest.fail(f"kvmd not ready ({e}); exit code {code}; log:\n{self.log()}")

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon process."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then wait; SIGKILL (and fail) if it does not exit in ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            pytest.fail(f"kvmd ignored SIGTERM for {timeout}s; log:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL if still running (cleanup for tests that failed halfway)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()


def _require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent: end-to-end tests need a KVM host")


@pytest.fixture(scope="session")
def kvmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The session's daemon; at the end it must stop on SIGTERM with exit code 0."""
    _require_kvm()
    daemon = Daemon(tmp_path_factory.mktemp("kvmd"))
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, f"kvmd exited with {code} on SIGTERM; log:\n{daemon.log()}"
        assert not daemon.socket.exists(), "kvmd left its socket behind"


@pytest.fixture
def start_kvmd(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """A factory for private daemons (each in the test's tmp dir); all killed at teardown."""
    _require_kvm()
    started: list[Daemon] = []
    counter = itertools.count()

    def start(*extra: str, wait: bool = True, name: str | None = None) -> Daemon:
        daemon = Daemon(tmp_path, name or f"kvmd{next(counter)}")
        started.append(daemon)
        return daemon.start(*extra, wait=wait)

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def address(kvmd: Daemon) -> str:
    """The session daemon's address."""
    return kvmd.address


@pytest.fixture
def client(kvmd: Daemon) -> Iterator[KvmdClient]:
    """A client of the session daemon with a 30 s default deadline."""
    with KvmdClient(kvmd.address, timeout=30) as c:
        yield c


_vm_counter = itertools.count()


@pytest.fixture
def vm_ids(request: pytest.FixtureRequest, client: KvmdClient) -> Iterator[Callable[[], str]]:
    """A factory of fresh VM ids (unique per test); every such VM is deleted at teardown."""
    made: list[str] = []
    base = request.node.name.replace("[", "-").replace("]", "")[:40].strip("-_.")

    def new_id() -> str:
        vm_id = f"{base}-{os.getpid()}-{next(_vm_counter)}"
        made.append(vm_id)
        return vm_id

    yield new_id
    for vm_id in made:
        try:
            client.delete_vm(vm_id)
        except NotFoundError:
            pass


@pytest.fixture
def vm_id(vm_ids: Callable[[], str]) -> str:
    """One fresh VM id (the VM is not created; deleted at teardown if it was)."""
    return vm_ids()


@pytest.fixture
def assert_healthy(client: KvmdClient) -> Callable[[], None]:
    """A check that the daemon still answers health checks and ordinary RPCs."""

    def check() -> None:
        assert client.health() == "SERVING"
        assert client.info().api_version == 12

    return check


@dataclass
class TlsFiles:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Certificates made with the openssl CLI for the TLS/mTLS tests."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command (Debian package openssl)")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=kvmd test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=kvmd-{name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.pem",
                 cwd=d)
    return TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
                    d / "client.key")


@pytest.fixture
def tcp_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
