"""Certificate reload without restart: replaced files are picked up at the next handshake
(file change), and SIGHUP forces a re-read. The certificate a new connection sees is read
with the `ssl` module and compared by serial number."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from deploy_support import (
    RPC_TIMEOUT,
    CertFiles,
    Pki,
    TlsDaemon,
    cert_serial,
    kvmd_script,
    peer_certificate,
    read,
    rpc_code,
)
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb

WAIT = 10.0


def live_copy(pki: Pki, directory: Path) -> CertFiles:
    """A private copy of the server certificate and key that a test may overwrite."""
    cert, key = directory / "live.pem", directory / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    return CertFiles(str(cert), str(key))


def replace_file(path: str, source: str, *, keep_mtime: bool = False) -> None:
    """Atomically replace `path` with the contents of `source` (write + rename, as
    certificate tools do); with `keep_mtime`, the old modification time is restored."""
    before = os.stat(path)
    tmp = path + ".new"
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # make the change visible even on a coarse-grained file system clock
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def overwrite(path: str, data: bytes) -> None:
    before = os.stat(path)
    with open(path, "wb") as fh:
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def served_serial(port: int, pki: Pki) -> int:
    return cert_serial(peer_certificate(port, pki, pki.clients["admin-1"]))


def test_replaced_certificate_is_served_without_restart(
        tls_daemon: Callable[..., TlsDaemon], pki: Pki, tmp_path: Path) -> None:
    live = live_copy(pki, tmp_path)
    d = tls_daemon(server=live)
    old = cert_serial(read(pki.server.cert))
    assert served_serial(d.port, pki) == old
    before = d.tls("admin-1")
    assert before.create_vm("kept").vm_id == "kept"

    new = pki.issue_server("rotated-1")
    replace_file(live.key, new.key)
    replace_file(live.cert, new.cert)
    new_serial = cert_serial(read(new.cert))
    assert new_serial != old
    wait_until(lambda: served_serial(d.port, pki) == new_serial, WAIT,
               "a new connection to see the replaced certificate")
    # A new gRPC connection verifies the new certificate and the daemon kept its state.
    after = d.tls("admin-1")
    assert after.list_ids() == {"kept"}
    assert after.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT).api_version == 12
    after.delete_vm("kept")


def test_broken_or_half_replaced_files_keep_the_current_certificate(
        tls_daemon: Callable[..., TlsDaemon], pki: Pki, tmp_path: Path) -> None:
    """A garbage certificate, or a new certificate whose key is not there yet, must not
    take the listener down: handshakes keep working with the current certificate, and the
    complete pair is picked up once it is in place."""
    live = live_copy(pki, tmp_path)
    d = tls_daemon(server=live)
    old = cert_serial(read(pki.server.cert))
    good_cert = read(live.cert)

    overwrite(live.cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    for _ in range(3):
        assert served_serial(d.port, pki) == old
    assert d.tls("admin-1").serving()

    new = pki.issue_server("rotated-2")
    overwrite(live.cert, read(new.cert))  # the key still is the old one: a mismatched pair
    for _ in range(3):
        assert served_serial(d.port, pki) == old
    assert d.tls("admin-1").serving()

    overwrite(live.key, read(new.key))
    new_serial = cert_serial(read(new.cert))
    wait_until(lambda: served_serial(d.port, pki) == new_serial, WAIT,
               "the completed certificate/key pair to be served")
    assert d.tls("admin-1").serving()
    assert good_cert != read(live.cert)


def test_replaced_client_ca_is_used_for_new_connections(
        tls_daemon: Callable[..., TlsDaemon], pki: Pki, tmp_path: Path) -> None:
    """Rotating the client CA: clients of the old CA are refused on new connections,
    clients of the new one accepted."""
    ca = tmp_path / "clients-ca.pem"
    shutil.copy(pki.ca_file, ca)
    d = tls_daemon(client_ca=str(ca))
    assert d.tls("admin-1").serving()
    assert rpc_code(lambda: d.tls("admin-1", wrong_ca=True).serving()) == \
        grpc.StatusCode.UNAVAILABLE

    replace_file(str(ca), pki.other_ca_file)

    def rotated() -> bool:
        fresh = d.tls("admin-1", wrong_ca=True)
        return rpc_code(lambda: fresh.hypervisor.GetInfo(
            pb.GetInfoRequest(), timeout=RPC_TIMEOUT)) == grpc.StatusCode.OK

    wait_until(rotated, WAIT, "a client of the new CA to be accepted")
    assert rpc_code(lambda: d.tls("admin-1").hypervisor.GetInfo(
        pb.GetInfoRequest(), timeout=RPC_TIMEOUT)) == grpc.StatusCode.UNAVAILABLE


def test_sighup_forces_a_reload_in_the_daemon_process(pki: Pki, tmp_path: Path,
                                                     short_dir: Path) -> None:
    """The kvmd process: files replaced with their modification time unchanged (so only
    the signal can tell), then SIGHUP: new connections get the new certificate, the
    daemon keeps running, and SIGTERM still ends it with 0."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is absent")
    live = live_copy(pki, tmp_path)
    log_path = tmp_path / "kvmd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [kvmd_script(), "--listen", f"unix://{short_dir}/kvmd.sock",
             "--listen", "127.0.0.1:0", "--tls-cert", live.cert, "--tls-key", live.key,
             "--tls-client-ca", pki.ca_file, "--metrics-listen", "off", "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        port_re = re.compile(r'msg="listening with TLS".*\bport=(\d+)')

        def port() -> int | None:
            match = port_re.search(log_path.read_text(errors="replace"))
            return int(match.group(1)) if match else None

        wait_until(lambda: port() is not None or proc.poll() is not None, 30,
                   "kvmd to log its TLS port")
        assert proc.poll() is None, log_path.read_text()
        tls_port = port()
        assert tls_port is not None
        old = cert_serial(read(pki.server.cert))
        assert served_serial(tls_port, pki) == old

        new = pki.issue_server("rotated-hup")
        replace_file(live.key, new.key, keep_mtime=True)
        replace_file(live.cert, new.cert, keep_mtime=True)
        new_serial = cert_serial(read(new.cert))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload" in log_path.read_text(errors="replace").split(
            "listening with TLS", 1)[-1], WAIT, "kvmd to log the SIGHUP reload")
        wait_until(lambda: served_serial(tls_port, pki) == new_serial, WAIT,
                   "the new certificate after SIGHUP")
        assert proc.poll() is None, "kvmd died on SIGHUP:\n" + log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
