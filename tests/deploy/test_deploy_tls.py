"""TLS and mTLS transport: who can complete a handshake with the daemon's TCP listener.

Each refused client is checked to fail with UNAVAILABLE (no TLS session, so no RPC), and
the daemon to still serve a legitimate client afterwards."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import grpc
import pytest
from deploy_support import (
    FAIL_TIMEOUT,
    RPC_TIMEOUT,
    Pki,
    TlsDaemon,
    kvmctl_script,
    rpc_code,
)

from kvmd_client import KvmdClient, PermissionDeniedError, UnavailableError
from kvmd_proto import vmm_pb2 as pb

POLICY = [
    {"name": "local", "role": "viewer"},
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator"},
    {"name": "viewer-1", "role": "viewer"},
]


def assert_refused(stubs_call: Callable[[], object]) -> None:
    assert rpc_code(stubs_call) == grpc.StatusCode.UNAVAILABLE


def assert_still_serving(d: TlsDaemon) -> None:
    admin = d.tls("admin-1")
    assert admin.serving()
    assert admin.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT).api_version == 12


def test_plain_client_to_tls_port_fails(tls_daemon: Callable[..., TlsDaemon]) -> None:
    d = tls_daemon(policy=POLICY)
    plain = d.plain_tcp()
    assert_refused(lambda: plain.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=FAIL_TIMEOUT))
    assert_refused(lambda: plain.vms.CreateVm(pb.CreateVmRequest(vm_id="plain"),
                                              timeout=FAIL_TIMEOUT))
    assert_still_serving(d)
    assert "plain" not in d.tls("admin-1").list_ids()


def test_tls_client_without_certificate_to_mtls_port_fails(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    d = tls_daemon(policy=POLICY)
    anonymous = d.tls()
    assert_refused(lambda: anonymous.hypervisor.GetInfo(pb.GetInfoRequest(),
                                                        timeout=FAIL_TIMEOUT))
    assert_refused(lambda: anonymous.vms.ListVms(pb.ListVmsRequest(), timeout=FAIL_TIMEOUT))
    assert_still_serving(d)


@pytest.mark.parametrize("identity", ["admin-1", "operator-a"])
def test_client_certificate_from_wrong_ca_fails(tls_daemon: Callable[..., TlsDaemon],
                                                identity: str) -> None:
    """Same CN and SAN as a real identity, signed by an untrusted CA: no handshake."""
    d = tls_daemon(policy=POLICY)
    impostor = d.tls(identity, wrong_ca=True)
    assert_refused(lambda: impostor.vms.CreateVm(pb.CreateVmRequest(vm_id="impostor"),
                                                 timeout=FAIL_TIMEOUT))
    assert_still_serving(d)
    assert "impostor" not in d.tls("admin-1").list_ids()


def test_client_that_does_not_trust_the_server_ca_fails(
        tls_daemon: Callable[..., TlsDaemon], pki: Pki) -> None:
    d = tls_daemon(policy=POLICY)
    wary = d.tls("admin-1", trust=pki.other_ca_file)
    assert_refused(lambda: wary.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=FAIL_TIMEOUT))
    assert_still_serving(d)


def test_mtls_client_with_trusted_certificate_works(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    d = tls_daemon(policy=POLICY)
    admin = d.tls("admin-1")
    assert admin.create_vm("mtls-ok").vm_id == "mtls-ok"
    assert admin.get_vm("mtls-ok").owner == "admin-1"
    admin.delete_vm("mtls-ok")


def test_server_auth_only_tls_works_without_client_certificate(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    """TLS without --tls-client-ca and without a policy: any TLS client is served (the
    transport is encrypted, the server authenticated); a plain client is still refused."""
    d = tls_daemon(mtls=False)
    anonymous = d.tls()
    assert anonymous.serving()
    assert anonymous.create_vm("tls-only").vm_id == "tls-only"
    assert "tls-only" in anonymous.list_ids()
    anonymous.delete_vm("tls-only")
    plain = d.plain_tcp()
    assert_refused(lambda: plain.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=FAIL_TIMEOUT))


def test_server_auth_only_tls_with_policy_needs_an_identity(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    """With a policy but no client CA, a TLS caller has no identity: UNAUTHENTICATED."""
    d = tls_daemon(mtls=False, policy=POLICY)
    anonymous = d.tls()
    assert anonymous.serving()  # health is open to all
    assert rpc_code(lambda: anonymous.hypervisor.GetInfo(
        pb.GetInfoRequest(), timeout=RPC_TIMEOUT)) == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_code(lambda: anonymous.create_vm("anon")) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("wrong_ca", [False, True], ids=["trusted-ca", "untrusted-ca"])
def test_server_auth_only_tls_ignores_unverified_client_certificates(
        tls_daemon: Callable[..., TlsDaemon], wrong_ca: bool) -> None:
    """Without --tls-client-ca nothing verifies client certificates, so a certificate a
    client presents (here one naming the admin) must not become its identity."""
    d = tls_daemon(mtls=False, policy=POLICY)
    claimed = d.tls("admin-1", wrong_ca=wrong_ca)
    assert rpc_code(lambda: claimed.create_vm("claimed-admin")) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert d.local().list_ids() == set()


def test_client_library_with_tls_options(tls_daemon: Callable[..., TlsDaemon],
                                         pki: Pki) -> None:
    d = tls_daemon(policy=POLICY)
    admin, viewer = pki.clients["admin-1"], pki.clients["viewer-1"]
    with KvmdClient(d.target, tls_ca=pki.ca_file, tls_cert=admin.cert, tls_key=admin.key,
                    timeout=RPC_TIMEOUT) as client:
        assert client.tls
        client.wait_ready(RPC_TIMEOUT)
        client.create_vm("lib-vm")
        assert client.get_vm("lib-vm").owner == "admin-1"
    with KvmdClient(d.target, tls_ca=pki.ca_file, tls_cert=viewer.cert, tls_key=viewer.key,
                    timeout=RPC_TIMEOUT) as client:
        assert [v.vm_id for v in client.list_vms()] == ["lib-vm"]
        with pytest.raises(PermissionDeniedError):
            client.delete_vm("lib-vm")
    with KvmdClient(d.target, tls_ca=pki.ca_file, timeout=FAIL_TIMEOUT) as client, \
            pytest.raises(UnavailableError):
        client.list_vms()  # no client certificate on an mTLS port
    d.tls("admin-1").delete_vm("lib-vm")


def test_kvmctl_with_tls_options(tls_daemon: Callable[..., TlsDaemon], pki: Pki) -> None:
    d = tls_daemon(policy=POLICY)

    def kvmctl(identity: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        tls = ["--tls-ca", pki.ca_file]
        if identity is not None:
            tls += ["--tls-cert", pki.clients[identity].cert,
                    "--tls-key", pki.clients[identity].key]
        return subprocess.run([kvmctl_script(), "--address", d.target, *tls,
                               "--timeout", str(FAIL_TIMEOUT), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    made = kvmctl("operator-a", "vm", "create", "ctl-vm")
    assert made.returncode == 0, made.stderr
    listed = kvmctl("operator-a", "--json", "vm", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ctl-vm" in listed.stdout
    denied = kvmctl("viewer-1", "vm", "delete", "ctl-vm")
    assert denied.returncode == 1, denied.stderr
    assert "PERMISSION_DENIED" in denied.stderr
    no_cert = kvmctl(None, "vm", "list")
    assert no_cert.returncode == 3, no_cert.stderr  # daemon unreachable: no TLS session
    removed = kvmctl("operator-a", "vm", "delete", "ctl-vm")
    assert removed.returncode == 0, removed.stderr
    assert "ctl-vm" not in d.tls("admin-1").list_ids()


def test_client_library_checks_the_server_name(tls_daemon: Callable[..., TlsDaemon],
                                               pki: Pki) -> None:
    """The server certificate names localhost and 127.0.0.1: tls_server_name may pick
    either, a name the certificate lacks fails the handshake."""
    d = tls_daemon(policy=POLICY)
    admin = pki.clients["admin-1"]
    with KvmdClient(d.target, tls_ca=pki.ca_file, tls_cert=admin.cert, tls_key=admin.key,
                    tls_server_name="localhost", timeout=RPC_TIMEOUT) as client:
        assert client.list_vms() == []
    with KvmdClient(d.target, tls_ca=pki.ca_file, tls_cert=admin.cert, tls_key=admin.key,
                    tls_server_name="not-kvmd.example", timeout=FAIL_TIMEOUT) as client, \
            pytest.raises(UnavailableError):
        client.list_vms()
