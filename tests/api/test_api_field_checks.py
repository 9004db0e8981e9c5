"""Request checks at the API boundary: which requests are accepted at the edge of a limit,
and which field a refusal names (the BadRequest violation a client acts on)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
from api_support import RunningDaemon

from kvmd.api.services import MAX_PAGE_SIZE
from kvmd.core.errors import Reason
from kvmd.core.remote import MAX_DEADLINE_MS
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_list_vms_page_holds_exactly_page_size(api: RunningDaemon) -> None:
    """ListVms returns page_size VMs (not one more) and a token to the rest."""
    for i in range(4):
        api.create_vm(f"p{i}")
    page = api.vms.ListVms(pb.ListVmsRequest(page_size=2))
    assert [v.vm_id for v in page.vms] == ["p0", "p1"]
    assert page.next_page_token
    rest = api.vms.ListVms(pb.ListVmsRequest(page_size=2, page_token=page.next_page_token))
    assert [v.vm_id for v in rest.vms] == ["p2", "p3"]


def test_list_vms_page_size_is_at_most_max_page_size(api: RunningDaemon) -> None:
    """page_size MAX_PAGE_SIZE is accepted, one more is refused VALUE_OUT_OF_RANGE on
    page_size."""
    api.create_vm("one")
    page = api.vms.ListVms(pb.ListVmsRequest(page_size=MAX_PAGE_SIZE))
    assert [v.vm_id for v in page.vms] == ["one"] and not page.next_page_token
    api.assert_code(lambda: api.vms.ListVms(pb.ListVmsRequest(page_size=MAX_PAGE_SIZE + 1)),
                    INVALID, reason=Reason.VALUE_OUT_OF_RANGE, field="page_size")


def test_empty_write_stream_names_vm_id(api: RunningDaemon) -> None:
    """A WriteGuestMemory stream with no message is refused FIELD_REQUIRED on vm_id."""
    api.assert_code(lambda: api.memory.WriteGuestMemory(iter([])), INVALID,
                    reason=Reason.FIELD_REQUIRED, field="vm_id")


def test_read_past_the_slot_is_refused_before_any_chunk(api: RunningDaemon) -> None:
    """ReadGuestMemory checks the whole range first: a range running past the slot's end
    fails without delivering the chunks that lie inside it."""
    api.create_vm("r")
    api.add_memory("r", 0, 0x10000)
    got: list[pb.GuestMemoryChunk] = []

    def read() -> None:
        for chunk in api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
                vm_id="r", guest_addr=0, length=0x11000, chunk_size=0x1000)):
            got.append(chunk)

    api.assert_code(read, INVALID)
    assert got == []


def test_ioevent_with_unknown_space_names_space(api: RunningDaemon) -> None:
    """RegisterIoevent with an address space outside the enum names the field `space`."""
    api.create_vm("io")
    api.assert_code(lambda: api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="io", ioevent_id="e", space=99, address=0x10, length=1)), INVALID,
        reason=Reason.VALUE_UNKNOWN, field="space")


def test_claim_with_unknown_space_names_claim_ranges_space(api: RunningDaemon) -> None:
    """A HandleExits claim with an unknown address space names claim.ranges.space."""
    api.create_vm("c")
    claim = pb.ClaimRequest(vm_id="c", ranges=[pb.AddressRange(space=99, base=0x10,
                                                                length=1)])
    api.assert_code(lambda: next(api.stubs.exits.HandleExits(iter([
        pb.ExitHandlerMessage(claim=claim)]))), INVALID,
        reason=Reason.VALUE_UNKNOWN, field="claim.ranges.space")


def test_claim_deadline_at_the_maximum_is_accepted(api: RunningDaemon) -> None:
    """deadline_ms equal to MAX_DEADLINE_MS is allowed; one more is VALUE_OUT_OF_RANGE."""
    api.create_vm("d")
    done = threading.Event()

    def hold(deadline: int) -> Iterator[pb.ExitHandlerMessage]:
        yield pb.ExitHandlerMessage(claim=pb.ClaimRequest(
            vm_id="d", deadline_ms=deadline,
            ranges=[pb.AddressRange(space=pb.PIO, base=0x510, length=1)]))
        done.wait(30)

    stream = api.stubs.exits.HandleExits(hold(MAX_DEADLINE_MS), timeout=30)
    try:
        assert next(stream).claimed.handler_id
    finally:
        done.set()
        stream.cancel()
    api.assert_code(lambda: next(api.stubs.exits.HandleExits(hold(MAX_DEADLINE_MS + 1))),
                    INVALID, reason=Reason.VALUE_OUT_OF_RANGE, field="claim.deadline_ms")


def test_exit_stats_name_their_vm(api: RunningDaemon) -> None:
    """GetExitStats answers with the VM's id alongside its counters."""
    api.create_vm("s")
    api.create_vcpu("s", 0)
    stats = api.vms.GetExitStats(pb.VmRef(vm_id="s"))
    assert stats.vm_id == "s"
    assert 0 in stats.vcpus
