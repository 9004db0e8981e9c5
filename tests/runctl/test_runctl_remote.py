"""Remote exit handlers (HandleExits): claims, replies, and every way a handler can fail
without leaving a vCPU hung or a claim behind."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from guests import SPIN, mov_al_mem16, mov_ax, mov_ds_ax, mov_mem16_al
from guests_runctl import (
    CLAIM_PORT,
    DEBUG_EXIT_PORT,
    MMIO_BASE,
    in_twice_program,
    port_loop,
    string_io_program,
)
from polling import wait_until
from runctl_api import Api, Code, ExitHandler, mmio, pio

import kvmd.core.vcpu
from kvmd_proto import vmm_pb2 as pb
from kvmd_proto import vmm_pb2_grpc as rpc

LONG_DEADLINE_MS = 30_000  # longer than any wait below: only the failure can release it


def ref(vm_id: str, vcpu_id: int = 0) -> pb.VcpuRef:
    return pb.VcpuRef(vm_id=vm_id, vcpu_id=vcpu_id)


def refused(api: Api, handler: ExitHandler, code: grpc.StatusCode) -> None:
    assert handler.wait_ended() == code, f"{handler.code}: {handler.details}"
    assert handler.incoming.get(timeout=1) is None  # nothing was claimed
    api.assert_healthy()


def second_read_served(api: Api, vm_id: str) -> ExitHandler:
    """After the first read went unclaimed: a new handler claims the same port, serves the
    second read with 0x42, and the guest debug-exits with (0x42 << 8) | first read."""
    api.wait_vcpu_state(vm_id, "halted")
    assert api.regs(vm_id).rbx & 0xFF == 0xFF  # the first read completed as unclaimed
    stats = api.stats(vm_id).total
    assert stats["unclaimed_pio"] == 1 and stats["io_in"] == 1
    handler = api.handler(vm_id, [pio(CLAIM_PORT)])  # the same range: released
    handler.claimed()
    handler.serve(lambda e: b"\x42")
    watch = api.watch(vm_id)
    api.vcpus.ResumeVcpu(ref(vm_id))
    assert watch.wait_for("debug_exit").exit_code == 0x42FF
    return handler


@pytest.mark.parametrize("how", ["cancel", "half-close"])
def test_handler_disconnecting_mid_exit_releases_vcpu_and_claims(api: Api, how: str) -> None:
    api.boot("drop", in_twice_program())
    first = api.handler("drop", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    first.claimed()
    api.start("drop")
    exit_ = first.next_exit()
    assert (exit_.address, exit_.size, exit_.is_write) == (CLAIM_PORT, 1, False)
    assert api.vcpu_state("drop").state == "running"  # waiting for our answer
    if how == "cancel":
        first.cancel()  # the client dies with the vCPU waiting on it
    else:
        first.close()  # the client ends its side of the stream
    first.wait_ended()
    second_read_served(api, "drop")
    api.delete("drop")


def test_handler_missing_its_deadline_releases_vcpu_and_claims(api: Api) -> None:
    api.boot("slow", in_twice_program())
    slow = api.handler("slow", [pio(CLAIM_PORT)], deadline_ms=100)
    slow.claimed()
    api.start("slow")
    exit_ = slow.next_exit()
    # Never answer: after 100 ms the daemon gives up on us, ends our stream and the vCPU
    # reads all-ones.
    assert slow.wait_ended() == Code.DEADLINE_EXCEEDED, "the late handler was not told why"
    second_read_served(api, "slow")
    # A reply that comes too late changes nothing.
    slow.reply(exit_.exit_id, b"\x01")
    api.assert_healthy()
    api.delete("slow")


def test_bad_reply_size_ends_stream_with_invalid_argument(api: Api) -> None:
    api.boot("badsize", in_twice_program())
    bad = api.handler("badsize", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    bad.claimed()
    api.start("badsize")
    exit_ = bad.next_exit()
    bad.reply(exit_.exit_id, b"\x01\x02")  # a 1-byte read answered with 2 bytes
    assert bad.wait_ended() == Code.INVALID_ARGUMENT, bad.details
    second_read_served(api, "badsize")
    api.delete("badsize")


def test_reply_to_unknown_exit_ends_stream_with_invalid_argument(api: Api) -> None:
    api.create_vm("unknown-exit")
    handler = api.handler("unknown-exit", [pio(CLAIM_PORT)])
    handler.claimed()
    handler.reply(123456789, b"\x00")
    assert handler.wait_ended() == Code.INVALID_ARGUMENT
    api.assert_healthy()
    # The claim died with the stream.
    again = api.handler("unknown-exit", [pio(CLAIM_PORT)])
    again.claimed()
    again.close()
    api.delete("unknown-exit")


def test_second_claim_message_ends_stream_with_invalid_argument(api: Api) -> None:
    api.create_vm("two-claims")
    handler = api.handler("two-claims", [pio(CLAIM_PORT)])
    handler.claimed()
    handler.send(pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="two-claims",
                                                             ranges=[pio(0x310)])))
    assert handler.wait_ended() == Code.INVALID_ARGUMENT
    api.assert_healthy()
    api.delete("two-claims")


def test_bad_claims_are_refused(api: Api) -> None:
    api.create_vm("claims")
    cases: list[tuple[pb.ExitHandlerMessage, grpc.StatusCode]] = [
        (pb.ExitHandlerMessage(reply=pb.ExitReply(exit_id=1)), Code.INVALID_ARGUMENT),
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="ghost", ranges=[pio(0x300)])),
         Code.NOT_FOUND),
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="claims")),
         Code.INVALID_ARGUMENT),                                      # no ranges
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="claims",
                                                     ranges=[pio(0x300, 0)])),
         Code.INVALID_ARGUMENT),                                      # empty range
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="claims",
                                                     ranges=[pio(0xFFFF, 2)])),
         Code.INVALID_ARGUMENT),                                      # past port 0xffff
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="claims",
                                                     ranges=[pio(0x300, 8), pio(0x304)])),
         Code.INVALID_ARGUMENT),                                      # overlap each other
        (pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="claims", ranges=[pio(0x300)],
                                                     deadline_ms=60_001)),
         Code.INVALID_ARGUMENT),                                      # deadline too long
    ]
    for first, code in cases:
        refused(api, api.handler("claims", [], first=first), code)
    # The documented longest deadline itself is taken.
    longest = api.handler("claims", [pio(0x300)], deadline_ms=60_000)
    longest.claimed()
    longest.close()
    assert longest.wait_ended() == Code.OK
    api.delete("claims")


def test_overlapping_claims_are_already_exists(api: Api) -> None:
    api.create_vm("overlap")
    a = api.handler("overlap", [pio(0x300, 8), mmio(MMIO_BASE, 0x1000)])
    a.claimed()
    refused(api, api.handler("overlap", [pio(0x304, 8)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("overlap", [pio(0x2FF, 2)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("overlap", [mmio(MMIO_BASE + 0xFFF, 0x10)]),
            Code.ALREADY_EXISTS)
    # All or nothing: a refused claim leaves none of its ranges claimed.
    refused(api, api.handler("overlap", [pio(0x310), pio(0x300)]), Code.ALREADY_EXISTS)
    c = api.handler("overlap", [pio(0x310)])
    c.claimed()
    # Adjacent ranges, and the same numbers in the other space, do not overlap.
    d = api.handler("overlap", [pio(0x308, 8), mmio(0x300, 8), mmio(MMIO_BASE + 0x1000, 8)])
    d.claimed()
    for h in (a, c, d):
        h.close()
    for h in (a, c, d):
        assert h.wait_ended() == Code.OK
    # Claims are released with their streams.
    e = api.handler("overlap", [pio(0x300, 0x20), mmio(MMIO_BASE, 0x2000)])
    e.claimed()
    e.close()
    api.delete("overlap")


def test_claims_overlapping_in_daemon_devices_are_already_exists(api: Api) -> None:
    api.create_vm("devices")
    refused(api, api.handler("devices", [pio(0x3F8)]), Code.ALREADY_EXISTS)      # COM1
    refused(api, api.handler("devices", [pio(0x3F0, 0x10)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("devices", [pio(0x3FF)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("devices", [pio(DEBUG_EXIT_PORT)]), Code.ALREADY_EXISTS)
    ok = api.handler("devices", [pio(0x3F0, 8), pio(0x400, 1)])  # right next to COM1
    ok.claimed()
    ok.close()
    api.delete("devices")


def test_deleting_the_vm_ends_its_handlers(api: Api) -> None:
    api.create_vm("gone")
    handler = api.handler("gone", [pio(CLAIM_PORT)])
    handler.claimed()
    api.delete("gone")
    assert handler.wait_ended() is not None
    api.assert_healthy()


def test_handler_serves_every_exit_of_a_loop(api: Api) -> None:
    api.boot("served", port_loop(CLAIM_PORT, 0x5A))
    seen: list[pb.ExitRequest] = []
    handler = api.handler("served", [pio(CLAIM_PORT)])
    handler.claimed()
    handler.serve(lambda e: b"", seen)
    api.start("served")
    wait_until(lambda: len(seen) > 10, 30, "the handler to serve a few exits")
    api.pause("served")
    total = api.stats("served").total
    # Paused only once the exit in flight was answered: the handler saw every exit.
    assert len(seen) > 10
    assert total["io_out"] == len(seen)
    assert total["unclaimed_pio"] == 0
    assert all(e.is_write and e.data == b"\x5a" and e.address == CLAIM_PORT for e in seen)
    api.stop("served")
    handler.close()
    api.delete("served")


def test_stop_vm_while_a_vcpu_waits_for_a_handler(api: Api) -> None:
    """StopVm must not hang (or fail) while a vCPU waits for a slow handler: the
    handler's deadline here is longer than the test waits."""
    api.boot("stuck", in_twice_program())
    handler = api.handler("stuck", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("stuck")
    handler.next_exit()
    vm = api.vms.StopVm(pb.VmRef(vm_id="stuck"), timeout=10)
    assert vm.state == "stopped"
    api.assert_healthy()
    api.delete("stuck")


def test_stop_vm_while_a_rep_ins_waits_for_a_handler(api: Api) -> None:
    """A `rep insb` of four bytes from a claimed port, waiting for a slow handler, is
    completed in full (all-ones) when StopVm gives it up: the VM is stopped by the request,
    not crashed by an access completed short."""
    api.boot("stuck-rep", string_io_program(0, CLAIM_PORT))
    handler = api.handler("stuck-rep", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("stuck-rep")
    handler.next_exit()
    vm = api.vms.StopVm(pb.VmRef(vm_id="stuck-rep"), timeout=10)
    assert (vm.state, vm.reason) == ("stopped", "stopped by request")
    api.assert_healthy()
    api.delete("stuck-rep")


@pytest.fixture
def short_state_change_wait(monkeypatch: pytest.MonkeyPatch) -> float:
    """The daemon's state-change wait (5 s) cut to 1 s (the daemon runs in this process),
    so a handler can answer after it without the test waiting 6 s."""
    monkeypatch.setattr(kvmd.core.vcpu, "STATE_CHANGE_TIMEOUT", 1.0)
    return 1.0


def test_pause_vm_while_a_vcpu_waits_for_a_handler(api: Api,
                                                   short_state_change_wait: float) -> None:
    """PauseVm while a vCPU waits for a slow handler must not fail with INTERNAL: the
    pause takes effect once the exit is answered (within the claim's deadline), also
    beside a vCPU that pauses at once (the VM's wait is its slowest vCPU's)."""
    api.boot("stuck-pause", {0x1000: SPIN, 0x1100: in_twice_program()},
             entries={0: 0x1000, 1: 0x1100})
    handler = api.handler("stuck-pause", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("stuck-pause")
    exit_ = handler.next_exit()
    assert exit_.vcpu_id == 1
    # Answer after twice the daemon's state-change wait.
    threading.Timer(2 * short_state_change_wait, handler.reply,
                    (exit_.exit_id, b"\x07")).start()
    vm = api.vms.PauseVm(pb.VmRef(vm_id="stuck-pause"), timeout=15)
    assert vm.state == "paused"
    api.resume("stuck-pause")
    api.wait_vcpu_state("stuck-pause", "halted", 1)  # at the program's hlt
    assert api.regs("stuck-pause", 1).rbx & 0xFF == 0x07  # the answer reached the guest
    api.stop("stuck-pause")
    api.delete("stuck-pause")


def test_a_snapshot_waits_for_a_vcpu_in_a_slow_remote_exit(
        api: Api, short_state_change_wait: float) -> None:
    """The daemon's own pauses (a snapshot's hold; a migration's switch-over and a
    hand-over pause the same way) wait for an exit within the claim's deadline too: the
    snapshot is taken once the handler answers, after the state-change wait."""
    api.boot("stuck-snap", in_twice_program())
    handler = api.handler("stuck-snap", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("stuck-snap")
    exit_ = handler.next_exit()
    threading.Timer(2 * short_state_change_wait, handler.reply,
                    (exit_.exit_id, b"\x07")).start()
    snapshots = rpc.SnapshotsStub(api.channel)
    replies = list(snapshots.SnapshotVm(pb.SnapshotVmRequest(vm_id="stuck-snap"), timeout=20))
    assert replies[-1].HasField("done"), replies[-1]
    api.wait_vcpu_state("stuck-snap", "halted")  # ran on: the answer, then the hlt
    assert api.regs("stuck-snap").rbx & 0xFF == 0x07
    api.stop("stuck-snap")
    api.delete("stuck-snap")


def test_a_resume_cancels_a_pause_still_waiting_for_a_handler(api: Api) -> None:
    """The last request wins: a ResumeVm while a PauseVm waits for a vCPU held in a remote
    exit cancels that pause. The resume succeeds, the waiting PauseVm answers ABORTED
    (CONCURRENT_CHANGE), and once the exit is answered the guest runs on, never parked."""
    api.boot("last-wins", in_twice_program())
    handler = api.handler("last-wins", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("last-wins")
    exit_ = handler.next_exit()
    pause = api.vms.PauseVm.future(pb.VmRef(vm_id="last-wins"), timeout=30)
    deadline = time.monotonic() + 20
    while True:  # until the pause is in flight (before, there is nothing to resume)
        try:
            api.vms.ResumeVm(pb.VmRef(vm_id="last-wins"), timeout=10)
            break
        except grpc.RpcError as err:
            assert err.code() == Code.FAILED_PRECONDITION, err  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the resume never found the pause in flight"
            time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as aborted:
        pause.result(timeout=30)
    assert aborted.value.code() == Code.ABORTED  # type: ignore[attr-defined]
    assert "resumed by another call" in aborted.value.details()  # type: ignore[attr-defined]
    handler.reply(exit_.exit_id, b"\x07")
    api.wait_vcpu_state("last-wins", "halted")  # ran on to its hlt, never paused
    assert api.regs("last-wins").rbx & 0xFF == 0x07
    api.stop("last-wins")
    api.delete("last-wins")


def test_registers_read_while_paused_reflect_a_completed_in(api: Api) -> None:
    """Paused right after an IN answered by a handler, the registers must show the IN
    retired (AL = the reply, RIP past it). KVM applies an IO completion only at the next
    KVM_RUN, so a VMM must re-enter with immediate_exit set before it exposes the state
    (KVM API doc, immediate_exit); otherwise GetRegs shows RIP still at the IN and AL
    without the value, and a SetRegs while paused races the pending completion."""
    api.boot("pause-in", in_twice_program())  # mov dx, 0x300 (3 bytes); in al, dx at 0x1003
    handler = api.handler("pause-in", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("pause-in")
    exit_ = handler.next_exit()
    # The pause is requested while the vCPU waits; it lands right after the IN completes.
    threading.Timer(0.5, handler.reply, (exit_.exit_id, b"\x07")).start()
    assert api.vms.PauseVm(pb.VmRef(vm_id="pause-in"), timeout=15).state == "paused"
    regs = api.regs("pause-in")
    assert (regs.rip, regs.rax & 0xFF) == (0x1004, 0x07), (
        f"paused with rip={regs.rip:#x} al={regs.rax & 0xFF:#x}: the IN is not retired")
    api.stop("pause-in")
    api.delete("pause-in")


# mov ax, MMIO_BASE >> 4; mov ds, ax (5 bytes); the access at 0x1005 (3 bytes); cli; hlt.
MMIO_ACCESS_AT = 0x1005
MMIO_PROGRAMS = {
    "read": mov_ax(MMIO_BASE >> 4) + mov_ds_ax() + mov_al_mem16(8) + bytes([0xFA, 0xF4]),
    "write": mov_ax(MMIO_BASE >> 4) + mov_ds_ax() + mov_mem16_al(8) + bytes([0xFA, 0xF4]),
}  # the write stores AL = 0x00 (the low byte of MMIO_BASE >> 4)


@pytest.mark.parametrize("access", ["read", "write"])
def test_registers_read_while_paused_reflect_a_completed_mmio_access(api: Api,
                                                                    access: str) -> None:
    """The MMIO twin of the test above: paused while its claimed MMIO access waits for the
    handler, then answered, the vCPU must show the access retired: RIP past the instruction
    and, for a read, the reply in AL."""
    api.boot("pause-mmio", MMIO_PROGRAMS[access])
    handler = api.handler("pause-mmio", [mmio(MMIO_BASE, 0x10)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("pause-mmio")
    exit_ = handler.next_exit()
    assert (exit_.address, exit_.size, exit_.is_write) == (MMIO_BASE + 8, 1, access == "write")
    reply = b"\x5a" if access == "read" else b""
    threading.Timer(0.5, handler.reply, (exit_.exit_id, reply)).start()
    assert api.vms.PauseVm(pb.VmRef(vm_id="pause-mmio"), timeout=15).state == "paused"
    regs = api.regs("pause-mmio")
    assert regs.rip == MMIO_ACCESS_AT + 3, (
        f"paused with rip={regs.rip:#x}: the MMIO {access} is not retired")
    assert regs.rax & 0xFF == (0x5A if access == "read" else 0x00)
    # Resumed, it goes on from there to its hlt.
    api.resume("pause-mmio")
    api.wait_vcpu_state("pause-mmio", "halted")
    assert api.regs("pause-mmio").rip == MMIO_ACCESS_AT + 5
    api.stop("pause-mmio")
    api.delete("pause-mmio")


@pytest.mark.parametrize(("deadline_ms", "bound"), [(300, 2.0), (0, 5.0)],
                         ids=["300ms", "default-1000ms"])
def test_a_handler_that_never_replies_is_given_up_after_its_deadline(
        api: Api, deadline_ms: int, bound: float) -> None:
    """The vCPU waits for the claim's deadline (0: the default 1000 ms), not much longer:
    then the handler's stream ends with DEADLINE_EXCEEDED and the guest goes on with the
    unclaimed read (all-ones). The bounds are generous (slow hosts); a deadline applied
    ten times too long exceeds them."""
    api.boot("late", in_twice_program())
    late = api.handler("late", [pio(CLAIM_PORT)], deadline_ms)
    late.claimed()
    api.start("late")
    late.next_exit()  # the vCPU has been waiting since just before this arrived
    waiting_since = time.monotonic()
    assert late.wait_ended(bound + 10) == Code.DEADLINE_EXCEEDED, late.details
    api.wait_vcpu_state("late", "halted", timeout=bound + 10)
    waited = time.monotonic() - waiting_since
    deadline = (deadline_ms or 1000) / 1000
    assert deadline / 2 < waited < bound, (
        f"the guest went on after {waited:.2f} s with a {deadline:g} s deadline")
    assert api.regs("late").rbx & 0xFF == 0xFF  # the unclaimed read
    api.delete("late")


def test_delete_vm_while_a_vcpu_waits_for_a_handler(api: Api) -> None:
    api.boot("stuck-del", in_twice_program())
    handler = api.handler("stuck-del", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("stuck-del")
    handler.next_exit()
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="stuck-del"), timeout=10)
    assert handler.wait_ended() is not None
    api.assert_code(lambda: api.get_vm("stuck-del"), Code.NOT_FOUND)


def test_one_handler_answers_two_vcpus_out_of_order(api: Api) -> None:
    """Two vCPUs wait on one handler at once; replies go by exit_id, not by order."""
    read_then_halt = in_twice_program()[:8]  # mov dx, 0x300; in al, dx; mov bl, al; cli; hlt
    api.boot("ooo", {0x1000: read_then_halt, 0x1100: read_then_halt},
             entries={0: 0x1000, 1: 0x1100})
    handler = api.handler("ooo", [pio(CLAIM_PORT)], LONG_DEADLINE_MS)
    handler.claimed()
    api.start("ooo")
    first, second = handler.next_exit(), handler.next_exit()
    assert {first.vcpu_id, second.vcpu_id} == {0, 1} and first.exit_id != second.exit_id
    handler.reply(second.exit_id, bytes([0x20 + second.vcpu_id]))
    handler.reply(first.exit_id, bytes([0x20 + first.vcpu_id]))
    api.wait_vcpu_state("ooo", "halted", 0)
    api.wait_vcpu_state("ooo", "halted", 1)
    assert api.regs("ooo", 0).rbx & 0xFF == 0x20
    assert api.regs("ooo", 1).rbx & 0xFF == 0x21
    handler.close()
    api.stop("ooo")
    api.delete("ooo")


def test_two_handlers_serve_two_vcpus_in_parallel(api: Api) -> None:
    api.boot("par", {0x1000: port_loop(CLAIM_PORT, 0xA0), 0x1100: port_loop(0x310, 0xA1)},
             entries={0: 0x1000, 1: 0x1100})
    logs: dict[int, list[pb.ExitRequest]] = {CLAIM_PORT: [], 0x310: []}
    for port in logs:
        h = api.handler("par", [pio(port)])
        h.claimed()
        h.serve(lambda e: b"", logs[port])
    api.start("par")
    wait_until(lambda: all(len(v) > 20 for v in logs.values()), 10,
               "both handlers to serve exits")
    api.pause("par")
    stats = api.stats("par")
    for port, vcpu_id, value in ((CLAIM_PORT, 0, 0xA0), (0x310, 1, 0xA1)):
        assert {(e.vcpu_id, e.address, e.data) for e in logs[port]} == {
            (vcpu_id, port, bytes([value]))}
        assert stats.vcpus[vcpu_id].counts["io_out"] == len(logs[port])
    api.stop("par")
    api.delete("par")


def test_claiming_a_port_the_guest_is_already_hammering(api: Api) -> None:
    """A port completed in C as unclaimed switches to the handler when claimed, and back
    to unclaimed when the handler goes, without stopping the guest."""
    api.boot("switch", port_loop(CLAIM_PORT, 0x33))
    api.start("switch")
    wait_until(lambda: api.stats("switch").total["unclaimed_pio"] > 100, 10,
               "unclaimed exits")
    seen: list[pb.ExitRequest] = []
    handler = api.handler("switch", [pio(CLAIM_PORT)])
    handler.claimed()
    handler.serve(lambda e: b"", seen)
    wait_until(lambda: len(seen) > 20, 10, "the handler to receive the guest's OUTs")
    handler.close()
    handler.wait_ended()
    unclaimed = api.stats("switch").total["unclaimed_pio"]
    wait_until(lambda: api.stats("switch").total["unclaimed_pio"] > unclaimed + 100, 10,
               "the port to be unclaimed again")
    assert api.get_vm("switch").state == "running"
    api.delete("switch")


def test_strict_io_vm_crashes_once_its_handler_is_gone(api: Api) -> None:
    api.boot("strict-claim", in_twice_program(), strict_io=True)
    handler = api.handler("strict-claim", [pio(CLAIM_PORT)])
    handler.claimed()
    handler.serve(lambda e: b"\x05")
    watch = api.watch("strict-claim")
    api.start("strict-claim")
    api.wait_vcpu_state("strict-claim", "halted")
    assert api.regs("strict-claim").rbx & 0xFF == 0x05  # served while claimed
    handler.close()
    handler.wait_ended()
    api.vcpus.ResumeVcpu(ref("strict-claim"))
    assert "unclaimed port read" in watch.wait_for("crashed").reason
    api.assert_healthy()
    api.delete("strict-claim")


def _ioevent(api: Api, vm_id: str, ioevent_id: str, space: int, address: int,
             length: int = 0, datamatch: int | None = None) -> pb.Ioevent:
    req = pb.RegisterIoeventRequest(vm_id=vm_id, ioevent_id=ioevent_id, space=space,  # type: ignore[arg-type]
                                    address=address, length=length)
    if datamatch is not None:
        req.datamatch = datamatch
    return api.ioevents.RegisterIoevent(req)


def test_one_owner_per_address_among_devices_claims_and_ioevents(api: Api) -> None:
    """An address has one kind of owner: an in-daemon device (COM1, the debug-exit port), a
    remote handler's claim, or ioevents (several of which may share an address with other
    datamatches, as KVM allows). Taking an address another kind owns is ALREADY_EXISTS,
    whichever came first: an ioevent there would silently swallow the guest's writes."""
    api.create_vm("owners", debug_exit_port=0x1234)
    for port in (0x3F8, 0x3FD, 0x3FF, 0x1234):                  # COM1, the debug-exit port
        api.assert_code(lambda port=port: _ioevent(api, "owners", "ev", pb.PIO, port),
                        Code.ALREADY_EXISTS)
    api.assert_code(lambda: _ioevent(api, "owners", "ev", pb.PIO, 0x3F6, length=4),
                    Code.ALREADY_EXISTS)                          # 0x3f6-0x3f9 reaches COM1
    _ioevent(api, "owners", "below-com1", pb.PIO, 0x3F6, length=2)  # 0x3f6-0x3f7: free
    _ioevent(api, "owners", "old-debug-port", pb.PIO, DEBUG_EXIT_PORT)  # moved away: free

    claim = api.handler("owners", [pio(0x300, 8), mmio(MMIO_BASE, 0x1000)])
    claim.claimed()
    api.assert_code(lambda: _ioevent(api, "owners", "ev", pb.PIO, 0x304, length=1),
                    Code.ALREADY_EXISTS)
    api.assert_code(lambda: _ioevent(api, "owners", "ev", pb.MMIO, MMIO_BASE + 0xFFC,
                                     length=4), Code.ALREADY_EXISTS)
    api.assert_code(lambda: _ioevent(api, "owners", "ev", pb.MMIO, MMIO_BASE - 4,
                                     length=8), Code.ALREADY_EXISTS)  # straddles the start
    _ioevent(api, "owners", "after-claim", pb.MMIO, MMIO_BASE + 0x1000, length=4)

    # Ioevents first: a claim over any of them is refused, all or nothing.
    _ioevent(api, "owners", "m1", pb.PIO, 0x320, length=1, datamatch=1)
    _ioevent(api, "owners", "m2", pb.PIO, 0x320, length=1, datamatch=2)  # same address: fine
    refused(api, api.handler("owners", [pio(0x31C, 8)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("owners", [pio(0x330), mmio(MMIO_BASE + 0x1000, 1)]),
            Code.ALREADY_EXISTS)
    free = api.handler("owners", [pio(0x321, 7), pio(0x330)])      # next to them: free
    free.claimed()
    # An any-length ioevent (length 0) owns its address's first byte too.
    _ioevent(api, "owners", "any-pio", pb.PIO, 0x340)
    _ioevent(api, "owners", "any-mmio", pb.MMIO, MMIO_BASE + 0x3000)
    refused(api, api.handler("owners", [pio(0x340)]), Code.ALREADY_EXISTS)
    refused(api, api.handler("owners", [mmio(MMIO_BASE + 0x3000, 1)]), Code.ALREADY_EXISTS)

    # Released owners free their addresses for the other kinds.
    claim.close()
    assert claim.wait_ended() == Code.OK
    _ioevent(api, "owners", "where-claimed", pb.PIO, 0x304, length=1)
    for ioevent_id in ("m1", "m2"):
        api.ioevents.UnregisterIoevent(pb.UnregisterIoeventRequest(vm_id="owners",
                                                                   ioevent_id=ioevent_id))
    again = api.handler("owners", [pio(0x31C, 4), pio(0x320)])
    again.claimed()
    for h in (free, again):
        h.close()
    api.delete("owners")


def test_a_refused_ioevent_leaves_the_uart_working(api: Api) -> None:
    """The guest still prints through COM1 after an ioevent on its port was refused."""
    api.boot("uart-kept", port_loop(0x3F8, ord("u")))
    api.assert_code(lambda: _ioevent(api, "uart-kept", "steal", pb.PIO, 0x3F8),
                    Code.ALREADY_EXISTS)
    api.start("uart-kept")
    wait_until(lambda: b"uuu" in b"".join(c.data for c in api.vms.StreamConsole(
        pb.StreamConsoleRequest(vm_id="uart-kept", backlog=True, no_follow=True))), 10,
        "the guest's bytes on the console")
    api.delete("uart-kept")


def test_a_claim_made_after_its_stream_was_cancelled_is_released(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is made in a pool thread, which a cancelled call cannot stop: a client that
    gives up while the VM's lock is busy must not leave its claim behind (found by the
    concurrent fuzz: handlers outliving every stream)."""
    api.create_vm("late")
    host = api.daemon.host
    assert host is not None
    vm = host.get_vm("late")
    entered, go, made = threading.Event(), threading.Event(), threading.Event()
    add_handler = vm.add_handler

    def slow_add_handler(*args: object) -> object:
        entered.set()
        assert go.wait(30)
        try:
            return add_handler(*args)  # type: ignore[arg-type]
        finally:
            made.set()

    monkeypatch.setattr(vm, "add_handler", slow_add_handler)
    handler = api.handler("late", [pio(CLAIM_PORT)])
    assert entered.wait(30)  # the claim is being made (the VM's lock is busy)
    handler.cancel()
    assert handler.wait_ended() == Code.CANCELLED
    go.set()
    assert made.wait(30)
    wait_until(lambda: not vm.claims.handlers(), 10, "the late claim to be released")
    monkeypatch.undo()
    again = api.handler("late", [pio(CLAIM_PORT)])  # the range is free
    again.claimed()
    again.close()
