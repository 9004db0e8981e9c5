"""Per-client authorization over mTLS (raw stubs) and the Unix socket: roles admin, operator
and viewer, VM ownership, operator prefix and quota, unknown identities, the "local" identity,
and the denial counter on /metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from deploy_support import RPC_TIMEOUT, SAN_SUFFIX, Stubs, TlsDaemon, codes, rpc_code, vm_calls
from guests import CODE_ADDR, out_bytes_program
from polling import wait_until

from kvmd.core.vm import VmOptions
from kvmd_proto import vmm_pb2 as pb

OK = "OK"
DENIED = "PERMISSION_DENIED"
HIDDEN = "NOT_FOUND"  # what an operator gets for another tenant's VM: as for a missing one
QUOTA = 2

POLICY: list[dict[str, Any]] = [
    {"name": "admin-1", "role": "admin"},
    {"name": "operator-a", "role": "operator", "vm_prefix": "a-", "max_vms": QUOTA},
    {"name": "operator-b", "role": "operator"},
    {"name": "viewer-1", "role": "viewer"},
    {"name": "local", "role": "viewer"},
]

# What a viewer may not do (each is a mutation, or a dirty-log read, which resets the log).
MUTATIONS = ("Vms/DeleteVm", "Vms/StartVm", "Vms/PauseVm", "Vms/StopVm", "Vms/WriteConsole",
             "Memory/AddMemoryRegion", "Memory/RemoveMemoryRegion", "Memory/WriteGuestMemory",
             "Memory/GetDirtyLog", "Memory/PollDirtyLog", "Interrupts/SetIrqLine",
             "IoEvents/RegisterIoevent",
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
    # Another tenant's VM does not exist for a (NOT_FOUND, as a missing VM).
    results = codes(vm_calls(a, "b-vm"))
    assert results == dict.fromkeys(results, HIDDEN)
    # Nor through a vCPU RPC that names the VM inside a VcpuRef.
    sregs = rpc_code(lambda: a.vcpus.GetSregs(pb.VcpuRef(vm_id="b-vm", vcpu_id=0),
                                              timeout=RPC_TIMEOUT))
    assert sregs == grpc.StatusCode.NOT_FOUND
    assert a.list_ids() == {"a-1"}
    assert b.list_ids() == {"b-vm"}
    assert admin.list_ids() == {"a-1", "b-vm"}
    assert "b-vm" not in {v.vm_id for v in a.vms.ListVms(
        pb.ListVmsRequest(label_selector={}), timeout=RPC_TIMEOUT).vms}
    assert snapshot(b, "b-vm") == before
    # ... and the other way round.
    results = codes(vm_calls(b, "a-1"))
    assert results == dict.fromkeys(results, HIDDEN)
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


def vcpu_getters(s: Stubs, vm_id: str) -> dict[str, Callable[[], Any]]:
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
    t = RPC_TIMEOUT
    return {
        "Vcpus/GetRegs": lambda: s.vcpus.GetRegs(ref, timeout=t),
        "Vcpus/GetSregs": lambda: s.vcpus.GetSregs(ref, timeout=t),
        "Vcpus/GetFpu": lambda: s.vcpus.GetFpu(ref, timeout=t),
        "Vcpus/GetMsrs": lambda: s.vcpus.GetMsrs(
            pb.GetMsrsRequest(vcpu=ref, indices=[0x10, 0xC0000101]), timeout=t),  # TSC, GS base
        "Vcpus/GetLapic": lambda: s.vcpus.GetLapic(ref, timeout=t),
        "Vcpus/GetVcpuEvents": lambda: s.vcpus.GetVcpuEvents(ref, timeout=t),
        "Vcpus/GetCpuid": lambda: s.vcpus.GetCpuid(ref, timeout=t),
        "Vcpus/GetMpState": lambda: s.vcpus.GetMpState(ref, timeout=t),
        "Vcpus/GetVcpuState": lambda: s.vcpus.GetVcpuState(ref, timeout=t),
    }


# Guest CPU state is guest data: registers, FPU/XMM, MSRs (the GS base, syscall entry points,
# keys in MSRs), the LAPIC and pending exceptions (a page fault's address).
GUEST_CPU_STATE = ("Vcpus/GetRegs", "Vcpus/GetSregs", "Vcpus/GetFpu", "Vcpus/GetMsrs",
                   "Vcpus/GetLapic", "Vcpus/GetVcpuEvents")
# What a viewer may read about a vCPU: its run state and the configuration the host gave it.
VCPU_METADATA = ("Vcpus/GetCpuid", "Vcpus/GetMpState", "Vcpus/GetVcpuState")


def test_viewer_reads_no_guest_cpu_state(d: TlsDaemon) -> None:
    """Viewers see metadata, states, counters and events, never the guest's CPU state; the
    VM's owner (and admins) read all of it."""
    viewer, admin, b = d.tls("viewer-1"), d.tls("admin-1"), d.tls("operator-b")
    admin.boot("adm-vm", irqchip=True)
    b.boot("b-vm", irqchip=True)
    try:
        for vm_id in ("adm-vm", "b-vm"):
            results = codes(vcpu_getters(viewer, vm_id))
            assert {k: results[k] for k in GUEST_CPU_STATE} == dict.fromkeys(
                GUEST_CPU_STATE, DENIED), results
            assert {k: results[k] for k in VCPU_METADATA} == dict.fromkeys(
                VCPU_METADATA, OK), results
        for s, vm_id in ((admin, "adm-vm"), (admin, "b-vm"), (b, "b-vm")):
            results = codes(vcpu_getters(s, vm_id))
            assert results == dict.fromkeys(results, OK), (vm_id, results)
    finally:
        admin.delete_vm("adm-vm")
        b.delete_vm("b-vm")


def crash_events(s: Stubs, vm_id: str, out: list[pb.VmEvent], ready: threading.Event) -> None:
    """Collect `vm_id`'s WatchVm events until it crashes."""
    call = s.vms.WatchVm(pb.WatchVmRequest(vm_id=vm_id, include_current=True),
                         timeout=RPC_TIMEOUT)
    try:
        for event in call:
            out.append(event)
            ready.set()
            if event.type == "crashed":
                return
    finally:
        call.cancel()


def test_crash_events_carry_registers_only_for_those_who_may_read_them(d: TlsDaemon) -> None:
    """WatchVm's crashed event carries the vCPU's registers for the owner and admins; a
    viewer gets the same event (type, reason, state) without them."""
    admin, viewer, b = d.tls("admin-1"), d.tls("viewer-1"), d.tls("operator-b")
    b.boot("b-crash", strict_io=True)
    # An unclaimed port write (0xe9) crashes a strict-IO VM.
    b.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
        vm_id="b-crash", guest_addr=CODE_ADDR, data=out_bytes_program(b"x", 0xE9))]),
        timeout=RPC_TIMEOUT)
    seen: dict[str, list[pb.VmEvent]] = {"admin": [], "owner": [], "viewer": []}
    threads = []
    for name, s in (("admin", admin), ("owner", b), ("viewer", viewer)):
        ready = threading.Event()
        thread = threading.Thread(target=crash_events, args=(s, "b-crash", seen[name], ready))
        thread.start()
        assert ready.wait(RPC_TIMEOUT), f"the {name}'s watch did not start"
        threads.append(thread)
    b.vms.StartVm(pb.VmRef(vm_id="b-crash"), timeout=RPC_TIMEOUT)
    for thread in threads:
        thread.join(RPC_TIMEOUT)
    crashed = {name: [e for e in events if e.type == "crashed"] for name, events in seen.items()}
    assert all(len(c) == 1 for c in crashed.values()), seen
    for name in ("admin", "owner"):
        assert crashed[name][0].HasField("regs") and crashed[name][0].regs.rip > CODE_ADDR
    assert not crashed["viewer"][0].HasField("regs"), crashed["viewer"][0]
    assert crashed["viewer"][0].reason == crashed["owner"][0].reason != ""
    assert crashed["viewer"][0].state == "crashed"
    b.delete_vm("b-crash")


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
    assert rpc_code(lambda: local.get_vm("adm-vm")) == grpc.StatusCode.NOT_FOUND
    assert admin.get_vm("l-1").owner == "local"
    # "local" names the Unix socket only: a certificate whose CN says "local" is not it.
    op.pki.clients["local"] = op.pki.issue_client(op.pki.ca, "local", "local")
    claims_local = op.tls("local")
    assert rpc_code(lambda: claims_local.create_vm("l-2")) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: claims_local.list_ids()) == grpc.StatusCode.PERMISSION_DENIED
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


# -- tenants: namespaces and existence (issue 13 #8) --------------------------------------

def details(code_and_error: tuple[grpc.StatusCode, str], vm_id: str) -> tuple[str, str]:
    code, text = code_and_error
    return code.name, text.replace(repr(vm_id), "<vm>").replace(vm_id, "<vm>")


def failure(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call that must fail (a stream's first message counts)."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            try:
                next(result, None)
            finally:
                result.cancel()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()  # type: ignore[attr-defined]
    raise AssertionError("the call succeeded")


def test_another_tenants_vm_is_not_found_exactly_like_a_missing_one(d: TlsDaemon) -> None:
    """An operator cannot tell another tenant's VM from no VM: every call answers what a
    missing VM answers (NOT_FOUND, the same message), and nothing changes."""
    a, b = d.tls("operator-a"), d.tls("operator-b")
    b.boot("b-vm")
    before = snapshot(b, "b-vm")
    counted = denials(d)
    foreign = {k: details(failure(call), "b-vm") for k, call in vm_calls(a, "b-vm").items()}
    # The daemon's operators see the probing: each is a denial (reason NOT_FOUND).
    wait_until(lambda: sum(denials(d).values()) - sum(counted.values()) >= len(foreign), 5,
               "the denials counted")
    assert {m: n - counted.get((m, r), 0) for (m, r), n in denials(d).items()
            if n != counted.get((m, r), 0)} == {
                f"/kvmd.v1.{k}": 1 for k in foreign}
    assert all(r == HIDDEN for (_m, r), n in denials(d).items() if n != counted.get((_m, r)))
    counted = denials(d)
    missing = {k: details(failure(call), "b-zz") for k, call in vm_calls(a, "b-zz").items()}
    assert foreign == missing
    assert denials(d) == counted  # a missing VM is an answer, not a denial
    assert {code for code, _ in foreign.values()} == {"NOT_FOUND"}
    refs = (pb.VcpuRef(vm_id="b-vm", vcpu_id=0), pb.VcpuRef(vm_id="b-zz", vcpu_id=0))
    assert details(failure(lambda: a.vcpus.GetSregs(refs[0], timeout=RPC_TIMEOUT)), "b-vm") \
        == details(failure(lambda: a.vcpus.GetSregs(refs[1], timeout=RPC_TIMEOUT)), "b-zz")
    assert snapshot(b, "b-vm") == before
    b.delete_vm("b-vm")


def test_check_extension_on_another_tenants_vm_is_not_found(d: TlsDaemon) -> None:
    a, b, viewer = d.tls("operator-a"), d.tls("operator-b"), d.tls("viewer-1")
    b.create_vm("b-vm")
    a.create_vm("a-vm")

    def check(s: Stubs, vm_id: str) -> Any:
        return s.hypervisor.CheckExtension(pb.CheckExtensionRequest(
            name="KVM_CAP_IRQFD", vm_id=vm_id), timeout=RPC_TIMEOUT)

    assert details(failure(lambda: check(a, "b-vm")), "b-vm") == \
        details(failure(lambda: check(a, "b-zz")), "b-zz")
    assert failure(lambda: check(a, "b-vm"))[0] == grpc.StatusCode.NOT_FOUND
    assert check(a, "a-vm").value > 0      # its own VM
    assert check(b, "b-vm").value > 0
    assert check(viewer, "b-vm").value > 0  # viewers see every VM's metadata
    assert a.hypervisor.CheckExtension(pb.CheckExtensionRequest(name="KVM_CAP_IRQFD"),
                                       timeout=RPC_TIMEOUT).value > 0  # /dev/kvm: anyone
    a.delete_vm("a-vm")
    b.delete_vm("b-vm")


def test_prefixes_are_reserved_for_their_identity(tls_daemon: Callable[..., TlsDaemon]) -> None:
    """An operator without a prefix (or with a shorter one) cannot squat ids inside another
    identity's prefix, by CreateVm or RestoreVm; admins may."""
    d = tls_daemon(policy=[
        {"name": "admin-1", "role": "admin"},
        {"name": "operator-a", "role": "operator", "vm_prefix": "a-"},
        {"name": "operator-b", "role": "operator", "vm_prefix": "a-b-"},
        {"name": "stranger", "role": "operator"},
    ])
    a, b, free, admin = d.tls("operator-a"), d.tls("operator-b"), d.tls("stranger"), \
        d.tls("admin-1")
    for vm_id in ("a-1", "a-b-1", "a-"):
        assert rpc_code(lambda vm_id=vm_id: free.create_vm(vm_id)) == \
            grpc.StatusCode.PERMISSION_DENIED, vm_id
    assert rpc_code(lambda: a.create_vm("a-b-2")) == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_code(lambda: free.vms.GetVm(pb.GetVmRequest(vm_id="a-1"),
                                           timeout=RPC_TIMEOUT)) == grpc.StatusCode.NOT_FOUND
    restore = pb.RestoreVmRequest(options=pb.RestoreVmOptions(vm_id="a-9"))
    assert rpc_code(lambda: free.snapshots.RestoreVm(iter([restore]), timeout=RPC_TIMEOUT)) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert free.create_vm("free-1").owner == "stranger"
    assert a.create_vm("a-1").owner == "operator-a"
    assert b.create_vm("a-b-1").owner == "operator-b"
    assert admin.create_vm("a-b-admin").owner == "admin-1"
    assert admin.list_ids() == {"free-1", "a-1", "a-b-1", "a-b-admin"}
    for vm_id in admin.list_ids():
        admin.delete_vm(vm_id)


def test_a_policy_may_not_give_two_identities_one_prefix() -> None:
    from kvmd.api.auth import Policy
    with pytest.raises(ValueError, match="prefix"):
        Policy.from_config({"identities": [
            {"name": "x", "role": "operator", "vm_prefix": "p-"},
            {"name": "y", "role": "operator", "vm_prefix": "p-"}]})


def test_a_call_acts_on_the_vm_it_was_authorized_for(
        tls_daemon: Callable[..., TlsDaemon]) -> None:
    """The VM checked is the VM acted on: when an operator's VM is deleted and another
    tenant's VM takes its id between the check and the handler, the call answers NOT_FOUND
    and leaves the new VM alone."""
    d = tls_daemon(policy=[{"name": "admin-1", "role": "admin"},
                           {"name": "operator-a", "role": "operator"},
                           {"name": "operator-b", "role": "operator"}])
    a, b = d.tls("operator-a"), d.tls("operator-b")
    host = d.daemon.host
    assert host is not None
    authorizer_check = d.daemon.authorizer.check
    swapped: list[str] = []

    def check_then_swap(method: str, grant: Any, identity: str, request: Any) -> Any:
        result = authorizer_check(method, grant, identity, request)
        if identity == "operator-a" and "shared" in str(request):
            # Between the check and the handler: a's VM goes, b's takes its id.
            host.delete_vm("shared")
            host.create_vm("shared", {}, VmOptions(), owner="operator-b")
            swapped.append(method)
        return result

    calls: dict[str, Callable[[], Any]] = {
        "DeleteVm": lambda: a.delete_vm("shared"),
        "StartVm": lambda: a.vms.StartVm(pb.VmRef(vm_id="shared"), timeout=RPC_TIMEOUT),
        "AddMemoryRegion": lambda: a.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
            vm_id="shared", guest_addr=0, size=0x1000), timeout=RPC_TIMEOUT),
        "CreateVcpu": lambda: a.vcpus.CreateVcpu(pb.CreateVcpuRequest(
            vm_id="shared", vcpu_id=0), timeout=RPC_TIMEOUT),
        "WriteGuestMemory": lambda: a.memory.WriteGuestMemory(iter([
            pb.WriteGuestMemoryRequest(vm_id="shared", guest_addr=0, data=b"x")]),
            timeout=RPC_TIMEOUT),
        "HandleExits": lambda: a.exits.HandleExits(iter([pb.ExitHandlerMessage(
            claim=pb.ClaimRequest(vm_id="shared", ranges=[
                pb.AddressRange(space=pb.PIO, base=0x700, length=1)]))]),
            timeout=RPC_TIMEOUT),
        "CheckExtension": lambda: a.hypervisor.CheckExtension(pb.CheckExtensionRequest(
            name="KVM_CAP_IRQFD", vm_id="shared"), timeout=RPC_TIMEOUT),
    }
    d.daemon.authorizer.check = check_then_swap  # type: ignore[method-assign]
    try:
        for name, call in calls.items():
            host.create_vm("shared", {}, VmOptions(), owner="operator-a")
            if name == "WriteGuestMemory":
                host.get_vm("shared").add_memory_region(0, 0x1000, False, False)
            code = rpc_code(call)
            new = host.get_vm("shared")
            assert code == grpc.StatusCode.NOT_FOUND, (name, code)
            assert (new.owner, len(new.vcpus()), new.memory_regions(), new.state,
                    list(new.claims.handlers())) == ("operator-b", 0, [], "created", []), name
            host.delete_vm("shared")
    finally:
        d.daemon.authorizer.check = authorizer_check  # type: ignore[method-assign]
    assert len(swapped) == len(calls)
    assert b.list_ids() == set()


def denied_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "kvmd.auth"
            and r.getMessage() == "rpc denied"]


def test_a_flood_of_denials_logs_a_few_lines(d: TlsDaemon,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A low-privilege identity cannot flood the log with its denials: per identity and
    method only the first few of an interval are logged (each is still counted)."""
    caplog.set_level(logging.WARNING, logger="kvmd.auth")
    viewer = d.tls("viewer-1")
    before = denials(d)
    for _ in range(200):
        assert rpc_code(lambda: viewer.create_vm("v-vm")) == grpc.StatusCode.PERMISSION_DENIED
    assert 1 <= len(denied_lines(caplog)) <= 10, len(denied_lines(caplog))
    wait_until(lambda: sum(denials(d).values()) - sum(before.values()) == 200, 5,
               "every denial counted")


def test_denial_logs_are_rate_limited_per_identity_and_method(
        d: TlsDaemon, caplog: pytest.LogCaptureFixture) -> None:
    """The first `per_key` denials of each identity and method per interval are logged;
    the rest are summed up in one line once the interval is over."""
    from kvmd.api.auth import DenialLog
    assert d.daemon.authorizer is not None
    limit, interval = 3, 0.5
    d.daemon.authorizer.denial_log = DenialLog(per_key=limit, interval=interval)
    caplog.set_level(logging.WARNING, logger="kvmd.auth")
    viewer, local = d.tls("viewer-1"), d.local()
    for _ in range(40):
        assert rpc_code(lambda: viewer.create_vm("v-vm")) == grpc.StatusCode.PERMISSION_DENIED
    for _ in range(4):
        assert rpc_code(lambda: local.delete_vm("x")) == grpc.StatusCode.PERMISSION_DENIED
    lines = denied_lines(caplog)
    assert len(lines) == 2 * limit, [r.__dict__ for r in lines]  # 3 of each kind
    time.sleep(interval * 1.5)
    # The next denial (of anyone) ends the interval: the suppressed ones are summed up.
    assert rpc_code(lambda: viewer.create_vm("v-vm")) == grpc.StatusCode.PERMISSION_DENIED
    summaries = {(r.identity, r.method): r.suppressed  # type: ignore[attr-defined]
                 for r in caplog.records if r.getMessage() == "rpc denials not logged"}
    assert summaries == {("viewer-1", "/kvmd.v1.Vms/CreateVm"): 40 - limit,
                         ("local", "/kvmd.v1.Vms/DeleteVm"): 4 - limit}
    lines = denied_lines(caplog)
    assert len(lines) == 2 * limit + 1
    assert lines[-1].method == "/kvmd.v1.Vms/CreateVm"  # type: ignore[attr-defined]
