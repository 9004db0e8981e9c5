"""Per-client authorization over mTLS (raw stubs) and the Unix socket: roles admin, operator
and viewer, VM ownership, operator prefix and quota, unknown identities, the "local" identity,
and the denial counter on /metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, SAN_SUFFIX, Stubs, TlsDaemon, codes, rpc_code, vm_calls
from polling import wait_until

from kvmd_proto import vmm_pb2 as pb

OK = "OK"
DENIED = "PERMISSION_DENIED"
QUOTA = 2

POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator", "vm_prefix": "a-", "max_vms": QUOTA},
    {"name": "operator-b", "role": "operator"},
    {"name": "viewer-1", "role": "viewer"},
    {"name": "local", "role": "viewer"},
]

# What a viewer may not do (each is a mutation, or GetDirtyLog, which resets the log).
MUTATIONS = ("Vms/DeleteVm", "Vms/StartVm", "Vms/PauseVm", "Vms/StopVm", "Vms/WriteConsole",
             "Memory/AddMemoryRegion", "Memory/RemoveMemoryRegion", "Memory/WriteGuestMemory",
             "Memory/GetDirtyLog", "Interrupts/SetIrqLine", "IoEvents/RegisterIoevent",
             "Vcpus/CreateVcpu", "Vcpus/SetRegs", "Vcpus/StartVcpu",
             "ExitHandlers/HandleExits")
VIEWER_READS = ("Vms/GetVm", "Vms/WatchVm", "Vms/GetExitStats", "Memory/ListMemoryRegions",
                "Vcpus/ListVcpus", "Vcpus/GetVcpuState")


@pytest.fixture
def d(tls_daemon: Callable[..., TlsDaemon]) -> TlsDaemon:
    return tls_daemon(policy=POLICY, metrics_listen="127.0.0.1:0")


def snapshot(s: Stubs, vm_id: str) -> tuple[Any, ...]:
    """What must not change when a denied caller pokes at a VM."""
    vm = s.get_vm(vm_id)
    regions = s.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id=vm_id),
                                         timeout=RPC_TIMEOUT).regions
    regs = s.vcpus.GetRegs(pb.VcpuRef(vm_id=vm_id, vcpu_id=0), timeout=RPC_TIMEOUT)
    memory = b"".join(c.data for c in s.memory.ReadGuestMemory(
        pb.ReadGuestMemoryRequest(vm_id=vm_id, guest_addr=0x4000, length=16),
        timeout=RPC_TIMEOUT))
    return (vm.owner, vm.state, vm.vcpu_count, vm.memory_slot_count, len(regions), regs.rip,
            memory)


def run_and_read_console(s: Stubs, vm_id: str) -> None:
    """Start the VM, see its guest's console output, stop it."""
    s.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)
    assert s.console_backlog(vm_id, 2) == b"hi"
    s.vms.StopVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)


def test_admin_can_do_everything(d: TlsDaemon) -> None:
    admin, b = d.tls("admin-1"), d.tls("operator-b")
    admin.boot("adm-vm")
    assert admin.get_vm("adm-vm").owner == "admin-1"
    run_and_read_console(admin, "adm-vm")
    assert admin.vcpus.GetRegs(pb.VcpuRef(vm_id="adm-vm", vcpu_id=0),
                               timeout=RPC_TIMEOUT).rip > 0
    b.boot("b-vm")
    assert admin.list_ids() == {"adm-vm", "b-vm"}
    # Every kind of call, on the admin's own VM and on an operator's.
    for vm_id in ("adm-vm", "b-vm"):
        results = codes({k: v for k, v in vm_calls(admin, vm_id).items()
                         if k not in ("Vms/DeleteVm", "ExitHandlers/HandleExits")})
        assert all(code not in (DENIED, "UNAUTHENTICATED") for code in results.values()), \
            results
        admin.vms.StopVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)
    admin.delete_vm("b-vm")
    admin.delete_vm("adm-vm")
    assert admin.list_ids() == set()


def test_operator_acts_on_its_own_vms(d: TlsDaemon) -> None:
    a = d.tls("operator-a")
    a.boot("a-own")
    assert a.get_vm("a-own").owner == "operator-a"
    run_and_read_console(a, "a-own")
    assert a.first_event("a-own").vm_id == "a-own"
    assert a.vcpus.GetRegs(pb.VcpuRef(vm_id="a-own", vcpu_id=0), timeout=RPC_TIMEOUT).rip > 0
    assert a.list_ids() == {"a-own"}
    a.delete_vm("a-own")
    assert a.list_ids() == set()


def test_operator_cannot_touch_another_operators_vm(d: TlsDaemon) -> None:
    a, b, admin = d.tls("operator-a"), d.tls("operator-b"), d.tls("admin-1")
    b.boot("b-vm")
    a.boot("a-1")
    before = snapshot(b, "b-vm")
    results = codes(vm_calls(a, "b-vm"))
    assert results == dict.fromkeys(results, DENIED)
    # Nor through a vCPU RPC that names the VM inside a VcpuRef.
    sregs = rpc_code(lambda: a.vcpus.GetSregs(pb.VcpuRef(vm_id="b-vm", vcpu_id=0),
                                              timeout=RPC_TIMEOUT))
    assert sregs == grpc.StatusCode.PERMISSION_DENIED
    assert a.list_ids() == {"a-1"}
    assert b.list_ids() == {"b-vm"}
    assert admin.list_ids() == {"a-1", "b-vm"}
    assert "b-vm" not in {v.vm_id for v in a.vms.ListVms(
        pb.ListVmsRequest(label_selector={}), timeout=RPC_TIMEOUT).vms}
    assert snapshot(b, "b-vm") == before
    # ... and the other way round.
    results = codes(vm_calls(b, "a-1"))
    assert results == dict.fromkeys(results, DENIED)
    # The owner still has its VM and full control of it.
    run_and_read_console(b, "b-vm")
    b.delete_vm("b-vm")
    a.delete_vm("a-1")


def test_operator_vm_prefix(d: TlsDaemon) -> None:
    a, b = d.tls("operator-a"), d.tls("operator-b")
    for bad in ("x-1", "A-1", "ba-1", "a"):
        assert rpc_code(lambda vm_id=bad: a.create_vm(vm_id)) == \
            grpc.StatusCode.PERMISSION_DENIED, bad
    assert a.create_vm("a-ok").owner == "operator-a"
    assert b.create_vm("x-1").owner == "operator-b"  # operator-b has no prefix
    assert d.tls("admin-1").list_ids() == {"a-ok", "x-1"}
    a.delete_vm("a-ok")
    b.delete_vm("x-1")


def test_operator_quota_is_enforced(d: TlsDaemon) -> None:
    a, b = d.tls("operator-a"), d.tls("operator-b")
    b.create_vm("b-other")  # another identity's VMs do not count against the quota
    for i in range(QUOTA):
        a.create_vm(f"a-{i}")
    code = rpc_code(lambda: a.create_vm("a-over"))
    assert code != grpc.StatusCode.OK
    assert a.list_ids() == {f"a-{i}" for i in range(QUOTA)}
    assert "a-over" not in d.tls("admin-1").list_ids()
    a.delete_vm("a-0")
    assert a.create_vm("a-over").owner == "operator-a"  # a freed slot can be reused
    assert rpc_code(lambda: a.create_vm("a-more")) != grpc.StatusCode.OK
    # Admin-created VMs with the operator's prefix are not the operator's either.
    d.tls("admin-1").create_vm("a-admin")
    assert a.list_ids() == {"a-1", "a-over"}
    for s, vm_id in ((a, "a-1"), (a, "a-over"), (b, "b-other"), (d.tls("admin-1"), "a-admin")):
        s.delete_vm(vm_id)


def test_operator_quota_exhaustion_is_resource_exhausted(d: TlsDaemon) -> None:
    """A per-identity quota is a limit reached, not a missing permission: gRPC documents
    RESOURCE_EXHAUSTED for "a per-user quota", and the project conventions say "limit
    reached -> RESOURCE_EXHAUSTED" (a client may retry after deleting a VM)."""
    a = d.tls("operator-a")
    for i in range(QUOTA):
        a.create_vm(f"a-{i}")
    assert rpc_code(lambda: a.create_vm("a-over")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for i in range(QUOTA):
        a.delete_vm(f"a-{i}")


def test_operator_quota_holds_under_concurrent_creates(d: TlsDaemon) -> None:
    """Simultaneous CreateVm calls by one operator (one channel each, several rounds): at
    most `max_vms` may succeed. Checking the quota and creating the VM must be one step."""
    n, rounds = 16, 8
    admin = d.tls("admin-1")
    channels = [d.tls("operator-a") for _ in range(n)]
    for s in channels:
        assert s.serving()  # connected before the race starts
    for r in range(rounds):
        barrier = threading.Barrier(n)
        results: dict[str, grpc.StatusCode] = {}

        def create(s: Stubs, vm_id: str, barrier: threading.Barrier,
                   results: dict[str, grpc.StatusCode]) -> None:
            barrier.wait()
            results[vm_id] = rpc_code(lambda: s.create_vm(vm_id))

        threads = [threading.Thread(target=create, args=(s, f"a-r{r}-{i}", barrier, results))
                   for i, s in enumerate(channels)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RPC_TIMEOUT * 2)
        owned = channels[0].list_ids()
        for vm_id in owned:
            admin.delete_vm(vm_id)
        succeeded = sorted(k for k, v in results.items() if v == grpc.StatusCode.OK)
        assert len(succeeded) <= QUOTA and len(owned) <= QUOTA, (
            f"round {r}: quota {QUOTA}, yet {len(succeeded)} concurrent creates succeeded "
            f"({succeeded})")


def test_viewer_reads_but_cannot_create_or_mutate(d: TlsDaemon) -> None:
    viewer, admin, b = d.tls("viewer-1"), d.tls("admin-1"), d.tls("operator-b")
    admin.boot("adm-vm")
    b.boot("b-vm")
    assert viewer.list_ids() == {"adm-vm", "b-vm"}  # a viewer sees every VM
    assert viewer.get_vm("b-vm").owner == "operator-b"
    assert viewer.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=RPC_TIMEOUT).api_version == 12
    assert rpc_code(lambda: viewer.create_vm("v-vm")) == grpc.StatusCode.PERMISSION_DENIED
    for vm_id in ("adm-vm", "b-vm"):
        before = snapshot(admin, vm_id)
        calls = vm_calls(viewer, vm_id)
        reads = codes({k: calls[k] for k in VIEWER_READS})
        assert reads == dict.fromkeys(reads, OK)
        writes = codes({k: calls[k] for k in MUTATIONS})
        assert writes == dict.fromkeys(writes, DENIED)
        assert snapshot(admin, vm_id) == before
    assert admin.list_ids() == {"adm-vm", "b-vm"}
    admin.delete_vm("adm-vm")
    b.delete_vm("b-vm")


def test_viewer_can_call_every_side_effect_free_vcpu_get(d: TlsDaemon) -> None:
    """The issue gives viewers "Get/List/Watch": the vCPU state getters are Get RPCs that
    change nothing, so a viewer may call them (GetDirtyLog, which resets the log, is
    excluded on purpose)."""
    viewer, admin = d.tls("viewer-1"), d.tls("admin-1")
    admin.boot("adm-vm", irqchip=True)
    ref = pb.VcpuRef(vm_id="adm-vm", vcpu_id=0)
    t = RPC_TIMEOUT
    getters: dict[str, Callable[[], Any]] = {
        "Vcpus/GetRegs": lambda: viewer.vcpus.GetRegs(ref, timeout=t),
        "Vcpus/GetSregs": lambda: viewer.vcpus.GetSregs(ref, timeout=t),
        "Vcpus/GetFpu": lambda: viewer.vcpus.GetFpu(ref, timeout=t),
        "Vcpus/GetCpuid": lambda: viewer.vcpus.GetCpuid(ref, timeout=t),
        "Vcpus/GetMsrs": lambda: viewer.vcpus.GetMsrs(
            pb.GetMsrsRequest(vcpu=ref, indices=[0x10]), timeout=t),
        "Vcpus/GetMpState": lambda: viewer.vcpus.GetMpState(ref, timeout=t),
        "Vcpus/GetLapic": lambda: viewer.vcpus.GetLapic(ref, timeout=t),
        "Vcpus/GetVcpuEvents": lambda: viewer.vcpus.GetVcpuEvents(ref, timeout=t),
    }
    try:
        results = codes(getters)
        denied = sorted(k for k, v in results.items() if v != OK)
        assert not denied, f"a viewer may not call these Get RPCs: {denied} ({results})"
    finally:
        admin.delete_vm("adm-vm")


def test_identity_not_in_policy_is_denied(d: TlsDaemon) -> None:
    stranger, admin = d.tls("stranger"), d.tls("admin-1")
    admin.boot("adm-vm")
    assert stranger.serving()  # health stays open to anyone with a TLS session
    host_calls: dict[str, Callable[[], Any]] = {
        "Hypervisor/GetInfo": lambda: stranger.hypervisor.GetInfo(pb.GetInfoRequest(),
                                                                  timeout=RPC_TIMEOUT),
        "Vms/ListVms": lambda: stranger.vms.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT),
        "Vms/CreateVm": lambda: stranger.create_vm("s-vm"),
    }
    results = codes({**host_calls, **vm_calls(stranger, "adm-vm")})
    assert results == dict.fromkeys(results, DENIED)
    assert admin.list_ids() == {"adm-vm"}
    admin.delete_vm("adm-vm")


def test_identity_matched_by_subject_alternative_name(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    """A policy naming the certificate's SAN (not its CN) grants that certificate."""
    san = "operator-b" + SAN_SUFFIX
    d = tls_daemon(policy=[{"name": san, "role": "operator"},
                           {"name": "admin-1", "role": "admin"}])
    b = d.tls("operator-b")
    assert b.create_vm("san-vm").owner == san
    assert rpc_code(lambda: d.tls("operator-a").get_vm("san-vm")) == \
        grpc.StatusCode.PERMISSION_DENIED
    b.delete_vm("san-vm")


def test_local_identity_follows_its_grant(d: TlsDaemon,
                                          tls_daemon: Callable[..., TlsDaemon]) -> None:
    # "local" is a viewer in POLICY.
    local, admin = d.local(), d.tls("admin-1")
    admin.create_vm("adm-vm")
    assert local.list_ids() == {"adm-vm"}
    assert local.get_vm("adm-vm").owner == "admin-1"
    assert rpc_code(lambda: local.create_vm("l-vm")) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: local.delete_vm("adm-vm")) == grpc.StatusCode.PERMISSION_DENIED
    admin.delete_vm("adm-vm")

    # "local" as an operator: its own VMs only.
    op = tls_daemon(policy=[{"name": "local", "role": "operator", "vm_prefix": "l-"},
                            {"name": "admin-1", "role": "admin"}])
    local, admin = op.local(), op.tls("admin-1")
    assert local.create_vm("l-1").owner == "local"
    assert rpc_code(lambda: local.create_vm("x-1")) == grpc.StatusCode.PERMISSION_DENIED
    admin.create_vm("adm-vm")
    assert local.list_ids() == {"l-1"}
    assert rpc_code(lambda: local.get_vm("adm-vm")) == grpc.StatusCode.PERMISSION_DENIED
    assert admin.get_vm("l-1").owner == "local"
    local.delete_vm("l-1")
    admin.delete_vm("adm-vm")

    # A policy without "local": the Unix socket has no role at all.
    none = tls_daemon(policy=[{"name": "admin-1", "role": "admin"}])
    local = none.local()
    assert local.serving()
    assert rpc_code(lambda: local.list_ids()) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: local.create_vm("l-1")) == grpc.StatusCode.PERMISSION_DENIED


def test_without_policy_every_caller_is_admin(tls_daemon: Callable[..., TlsDaemon]) -> None:
    d = tls_daemon()
    local, viewer = d.local(), d.tls("viewer-1")
    assert local.create_vm("l-vm").owner == "local"
    assert viewer.create_vm("v-vm").owner == "viewer-1"
    assert viewer.list_ids() == local.list_ids() == {"l-vm", "v-vm"}
    viewer.delete_vm("l-vm")
    local.delete_vm("v-vm")


def denials(d: TlsDaemon) -> dict[tuple[str, str], float]:
    """kvmd_authorization_denials_total by (method, reason)."""
    return {(dict(labels)["method"], dict(labels)["reason"]): value
            for (name, labels), value in d.metrics().items()
            if name == "kvmd_authorization_denials_total"}


def test_denials_are_counted_and_logged(d: TlsDaemon, tls_daemon: Callable[..., TlsDaemon],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvmd.auth")
    viewer, stranger, admin = d.tls("viewer-1"), d.tls("stranger"), d.tls("admin-1")
    admin.create_vm("adm-vm")
    before = denials(d)
    for _ in range(3):
        assert rpc_code(lambda: viewer.create_vm("v-vm")) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: stranger.get_vm("adm-vm")) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: d.local().delete_vm("adm-vm")) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert admin.get_vm("adm-vm").owner == "admin-1"  # allowed calls are not counted

    def delta(method: str, reason: str = DENIED) -> float:
        key = (f"/kvmd.v1.{method}", reason)
        return denials(d).get(key, 0.0) - before.get(key, 0.0)

    wait_until(lambda: delta("Vms/CreateVm") >= 3, 5, "three counted CreateVm denials")
    assert delta("Vms/CreateVm") == 3
    assert delta("Vms/GetVm") == 1
    assert delta("Vms/DeleteVm") == 1
    assert sum(denials(d).values()) - sum(before.values()) == 5
    denied_logs = [r for r in caplog.records if r.name == "kvmd.auth"
                   and "denied" in r.getMessage()]
    assert len(denied_logs) >= 5, [r.getMessage() for r in caplog.records]
    admin.delete_vm("adm-vm")

    # No identity at all (TLS without client certificates, with a policy): UNAUTHENTICATED.
    tls_only = tls_daemon(mtls=False, policy=POLICY, metrics_listen="127.0.0.1:0")
    anonymous = tls_only.tls()
    assert rpc_code(lambda: anonymous.list_ids()) == grpc.StatusCode.UNAUTHENTICATED
    assert denials(tls_only).get(("/kvmd.v1.Vms/ListVms", "UNAUTHENTICATED")) == 1
