"""AIP-193 error reasons: every error names a specific, stable reason (kvmd.core.errors.Reason)
sent with one status code, INVALID_ARGUMENT names its field, and the README lists them all.

Three guards that can fail: every raise site in kvmd is walked (AST) and must name a reason
or a resource whose kind gives one; the Reason table itself may hold no status code's name;
and every error any API test provokes goes through RunningDaemon.assert_code, which checks
the reason belongs to the code it came with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_support import DaemonFactory, RunningDaemon, error_info
from google.rpc import error_details_pb2, status_pb2
from reason_sites import raise_sites, unspecific

from kvmd.api.auth import Hidden
from kvmd.api.errors import DOMAIN, RETRY_KEY, reason_code, to_status
from kvmd.api.gate import HandingOver
from kvmd.core.errors import (
    InvalidArgument,
    KernelError,
    NotFound,
    Reason,
    ResourceExhausted,
    from_os_error,
    limit,
)
from kvmd.core.host import missing_vm
from kvmd_proto import vmm_pb2 as pb

README = Path(__file__).resolve().parents[2] / "README.md"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1 << 20


# -- the table of reasons and the raise sites ---------------------------------------------


def test_every_raise_site_names_a_specific_reason() -> None:
    sites = raise_sites()
    assert len(sites) > 200  # the walk finds them (a broken walk would pass vacuously)
    bad = [f"{site}: {why}" for site in sites if (why := unspecific(site))]
    assert not bad, "raise sites without a specific reason:\n" + "\n".join(bad)


def test_the_site_check_can_fail(tmp_path: Path) -> None:
    """The walk flags a bare InvalidArgument, a reason of another class and a NotFound
    without a resource, and accepts the forms kvmd uses."""
    from reason_sites import Site

    def site(cls: type, keywords: set[str], reason: str | None = None) -> Site:
        return Site("x.py", 1, cls, frozenset(keywords), reason)

    assert unspecific(site(InvalidArgument, set()))
    assert unspecific(site(InvalidArgument, {"reason"}, "VM_NOT_FOUND"))
    assert unspecific(site(InvalidArgument, {"reason"}, "NO_SUCH_REASON"))
    assert unspecific(site(NotFound, set()))
    assert unspecific(site(ResourceExhausted, {"resource"}))
    assert unspecific(site(InvalidArgument, {"reason", "field"}, "ADDRESS_UNALIGNED")) is None
    assert unspecific(site(NotFound, {"resource"})) is None
    assert unspecific(site(Hidden, {"resource"})) is None
    assert unspecific(site(HandingOver, set())) is None
    assert unspecific(site(KernelError, set())) is None


def test_no_reason_repeats_a_status_code() -> None:
    codes = {c.name for c in grpc.StatusCode}
    assert 20 <= len(Reason) <= 100  # dozens, not hundreds
    for reason in Reason:
        assert reason.value == reason.name
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", reason.value), reason
        assert reason.value not in codes, f"{reason} is a status code's name"
        assert reason.doc, f"{reason} has no meaning"
        assert reason_code(reason) != grpc.StatusCode.OK


def readme_reasons() -> dict[str, str]:
    """reason -> status code, from the README's table under "### Errors"."""
    text = README.read_text()
    section = text.split("\n### Errors\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([A-Z_]+)` \| .+ \|$", section, re.M)
    assert len(rows) == len(set(r for r, _ in rows)), "a reason is listed twice"
    return dict(rows)


def test_readme_lists_every_reason_with_its_code() -> None:
    listed = readme_reasons()
    missing = sorted(r.value for r in Reason if r.value not in listed)
    unknown = sorted(set(listed) - set(Reason.__members__))
    assert not missing, f"reasons missing from the README's Errors table: {missing}"
    assert not unknown, f"the README lists reasons kvmd does not have: {unknown}"
    wrong = {r: code for r, code in listed.items() if reason_code(Reason[r]).name != code}
    assert not wrong, f"README codes that differ from the daemon's: {wrong}"


# -- to_status: the google.rpc.Status a domain error becomes -------------------------------


def details(status: grpc.Status) -> tuple[Any, list[tuple[str, str]]]:
    """(ErrorInfo, field violations) of a grpc.Status made by to_status."""
    trailer = dict(status.trailing_metadata)["grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(trailer)
    info, violations = None, []
    for d in rich.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return info, violations


def test_reason_follows_the_resource_kind() -> None:
    cases = {"vm/a": Reason.VM_NOT_FOUND, "vm/a/vcpu/3": Reason.VCPU_NOT_FOUND,
             "vm/a/slot/2": Reason.SLOT_NOT_FOUND, "vm/a/irqfd/i": Reason.IRQFD_NOT_FOUND,
             "vm/a/ioevent/e": Reason.IOEVENT_NOT_FOUND, "snapshot/s": Reason.SNAPSHOT_NOT_FOUND,
             "stranded/a": Reason.STRANDED_VM_NOT_FOUND, "images/d/f": Reason.FILE_NOT_FOUND}
    for resource, reason in cases.items():
        assert NotFound("x", resource=resource).reason == reason, resource
    info, violations = details(to_status(NotFound("x", resource="vm/a/vcpu/3")))
    assert (info.reason, info.domain) == ("VCPU_NOT_FOUND", DOMAIN)
    assert dict(info.metadata) == {"vm_id": "a", "vcpu_id": "3", "resource": "vm/a/vcpu/3"}
    assert violations == []


def test_invalid_argument_carries_a_field_violation() -> None:
    exc = InvalidArgument("guest address 0x1001 is not page aligned",
                          reason=Reason.ADDRESS_UNALIGNED, field="guest_addr")
    status = to_status(exc)
    assert status.code == INVALID
    info, violations = details(status)
    assert info.reason == "ADDRESS_UNALIGNED"
    assert violations == [("guest_addr", "guest address 0x1001 is not page aligned")]


def test_limits_kernel_errors_hidden_vms_and_hand_overs() -> None:
    info, _ = details(to_status(ResourceExhausted(
        "too many", reason=Reason.LIMIT_VMS, metadata=limit("max_vms", 4))))
    assert info.reason == "LIMIT_VMS"
    assert (info.metadata["limit"], info.metadata["limit_value"]) == ("max_vms", "4")
    # A kernel errno: the class from the errno table, the reason from what it means.
    import errno

    from kvmd.kvm import KvmError
    overlap = from_os_error(KvmError(errno.EEXIST, "KVM_SET_USER_MEMORY_REGION", "overlap"),
                            "vm/a")
    assert overlap.reason == Reason.SLOT_OVERLAP
    info, _ = details(to_status(from_os_error(KvmError(errno.EIO, "KVM_RUN", "io"), "vm/a")))
    assert (info.reason, info.metadata["errno"], info.metadata["ioctl"]) == (
        "KERNEL_ERROR", str(errno.EIO), "KVM_RUN")
    # A VM the caller may not see answers exactly what a missing one does.
    hidden = Hidden("no vm 'a'", resource="vm/a")
    assert details(to_status(hidden))[0] == details(to_status(missing_vm("a")))[0]
    # The hand-over gate: its own reason, and the retry trailer.
    status = to_status(HandingOver("handing over"))
    assert details(status)[0].reason == "HANDOVER_IN_PROGRESS"
    assert dict(status.trailing_metadata)[RETRY_KEY] == "handover"
    # Not a domain error at all: a daemon bug, INTERNAL.
    status = to_status(ZeroDivisionError("oops"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert details(status)[0].reason == "INTERNAL_ERROR"


# -- over real gRPC -----------------------------------------------------------------------

def _vm(api: RunningDaemon, vm_id: str = "r", **kw: Any) -> str:
    api.create_vm(vm_id, **kw)
    return vm_id


BAD_INPUTS: dict[str, tuple[Any, grpc.StatusCode, Reason, str | None]] = {
    "bad vm id": (lambda a: a.vms.GetVm(pb.GetVmRequest(vm_id="bad id!")),
                  INVALID, Reason.ID_INVALID, "vm_id"),
    "missing vm": (lambda a: a.vms.GetVm(pb.GetVmRequest(vm_id="ghost")),
                   grpc.StatusCode.NOT_FOUND, Reason.VM_NOT_FOUND, None),
    "duplicate vm": (lambda a: a.create_vm(_vm(a)),
                     grpc.StatusCode.ALREADY_EXISTS, Reason.VM_ALREADY_EXISTS, None),
    "unaligned region": (lambda a: a.add_memory(_vm(a), 0x1001, MiB),
                         INVALID, Reason.ADDRESS_UNALIGNED, "guest_addr"),
    "empty region": (lambda a: a.add_memory(_vm(a), 0, 0),
                     INVALID, Reason.VALUE_OUT_OF_RANGE, "size"),
    "overlapping region": (lambda a: (a.add_memory(_vm(a), 0, MiB),
                                      a.add_memory("r", MiB // 2, MiB)),
                           grpc.StatusCode.ALREADY_EXISTS, Reason.SLOT_OVERLAP, None),
    "missing vcpu": (lambda a: a.vcpus.GetRegs(pb.VcpuRef(vm_id=_vm(a), vcpu_id=3)),
                     grpc.StatusCode.NOT_FOUND, Reason.VCPU_NOT_FOUND, None),
    "duplicate vcpu": (lambda a: (a.create_vcpu(_vm(a), 0), a.create_vcpu("r", 0)),
                       grpc.StatusCode.ALREADY_EXISTS, Reason.VCPU_ALREADY_EXISTS, None),
    "bad page token": (lambda a: a.vms.ListVms(pb.ListVmsRequest(page_token="nope")),
                       INVALID, Reason.PAGE_TOKEN_INVALID, "page_token"),
    "huge page size": (lambda a: a.vms.ListVms(pb.ListVmsRequest(page_size=1 << 30)),
                       INVALID, Reason.VALUE_OUT_OF_RANGE, "page_size"),
    "pause a new vm": (lambda a: a.vms.PauseVm(pb.VmRef(vm_id=_vm(a))),
                       grpc.StatusCode.FAILED_PRECONDITION, Reason.VM_NOT_RUNNING, None),
    "irqfd without irqchip": (lambda a: a.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id=_vm(a), irqfd_id="i", gsi=1)),
        grpc.StatusCode.FAILED_PRECONDITION, Reason.IRQCHIP_MODE, None),
    "missing irqfd": (lambda a: a.interrupts.UnregisterIrqfd(pb.UnregisterIrqfdRequest(
        vm_id=_vm(a, irqchip=True), irqfd_id="i")),
        grpc.StatusCode.NOT_FOUND, Reason.IRQFD_NOT_FOUND, None),
    "pit without irqchip": (lambda a: a.create_vm("p", pit=True),
                            INVALID, Reason.ARGUMENTS_CONFLICT, "options.pit"),
    "ioevent length": (lambda a: a.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id=_vm(a), ioevent_id="e", space=pb.PIO, address=0x600, length=3)),
        INVALID, Reason.VALUE_OUT_OF_RANGE, "length"),
    "interrupt vector": (lambda a: (a.create_vcpu(_vm(a)), a.vcpus.InjectInterrupt(
        pb.InjectInterruptRequest(vcpu=pb.VcpuRef(vm_id="r"), vector=300))),
        INVALID, Reason.VALUE_OUT_OF_RANGE, "vector"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_reason_and_field(api: RunningDaemon, case: str) -> None:
    fn, code, reason, field = BAD_INPUTS[case]
    err = api.assert_code(lambda: fn(api), code, reason=reason, field=field)
    info = error_info(err)
    assert info is not None
    if code == grpc.StatusCode.NOT_FOUND or reason.name.endswith("ALREADY_EXISTS"):
        assert info.metadata["vm_id"] in ("r", "ghost")  # the object is named


def test_limit_reason_names_the_limit(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_vms=1)
    api.create_vm("one")
    err = api.assert_code(lambda: api.create_vm("two"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                          reason=Reason.LIMIT_VMS)
    info = error_info(err)
    assert info is not None
    assert (info.metadata["limit"], info.metadata["limit_value"]) == ("max_vms", "1")
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="one"))
