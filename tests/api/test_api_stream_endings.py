"""How server streams end: a cancelled watch gives up its subscription, a console read
with no_follow ends after the backlog, and a HandleExits stream that receives a bad message
ends INVALID_ARGUMENT STREAM_INVALID on the `reply` field."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
from api_support import RunningDaemon
from polling import wait_until

from kvmd.core.errors import Reason
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_watch_vm_drops_its_subscription(api: RunningDaemon) -> None:
    """Cancelling a WatchVm stream removes its subscription from the VM's events."""
    api.create_vm("w")
    events = api.daemon.host.get_vm("w").events
    watch = api.vms.WatchVm(pb.WatchVmRequest(vm_id="w", include_current=True), timeout=30)
    assert next(watch).type == "state"
    wait_until(lambda: events.subscriber_count == 1, 10, "the watch to subscribe")
    watch.cancel()
    wait_until(lambda: events.subscriber_count == 0, 10,
               "the daemon to drop the cancelled watch")
    api.assert_healthy()


def test_console_no_follow_ends_after_the_backlog(api: RunningDaemon) -> None:
    """StreamConsole with no_follow ends cleanly once the (here empty) backlog is sent."""
    api.create_vm("c")
    call = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="c", backlog=True,
                                                         no_follow=True), timeout=10)
    assert b"".join(c.data for c in call) == b""
    assert call.code() == grpc.StatusCode.OK


def _claim_then(vm_id: str, after: pb.ExitHandlerMessage, claimed: threading.Event,
                finished: threading.Event) -> Iterator[pb.ExitHandlerMessage]:
    yield pb.ExitHandlerMessage(claim=pb.ClaimRequest(
        vm_id=vm_id, ranges=[pb.AddressRange(space=pb.PIO, base=0x510, length=1)]))
    claimed.wait(10)
    yield after
    finished.wait(30)  # keep our side open: the daemon must end the stream


def _run_bad_stream(api: RunningDaemon, after: pb.ExitHandlerMessage) -> None:
    claimed, finished = threading.Event(), threading.Event()
    stream = api.stubs.exits.HandleExits(_claim_then("h", after, claimed, finished),
                                         timeout=30)
    try:
        assert next(stream).claimed.handler_id
        claimed.set()
        list(stream)
    finally:
        claimed.set()
        finished.set()
        stream.cancel()


def _claim_is_free(api: RunningDaemon, vm_id: str) -> None:
    again = api.stubs.exits.HandleExits(iter([pb.ExitHandlerMessage(claim=pb.ClaimRequest(
        vm_id=vm_id, ranges=[pb.AddressRange(space=pb.PIO, base=0x510, length=1)]))]),
        timeout=30)
    try:
        assert next(again).claimed.handler_id
    finally:
        again.cancel()


def test_reply_to_no_waiting_exit_ends_the_stream_invalid(api: RunningDaemon) -> None:
    """A reply naming an exit nobody waits for ends HandleExits STREAM_INVALID (field
    `reply`), and the claim is released."""
    api.create_vm("h")
    bad = pb.ExitHandlerMessage(reply=pb.ExitReply(exit_id=12345))
    err = api.assert_code(lambda: _run_bad_stream(api, bad), INVALID,
                          reason=Reason.STREAM_INVALID, field="reply")
    assert "12345" in (err.details() or "")  # type: ignore[attr-defined]
    _claim_is_free(api, "h")


def test_second_claim_ends_the_stream_invalid(api: RunningDaemon) -> None:
    """Only replies may follow the claim: a second claim ends HandleExits STREAM_INVALID."""
    api.create_vm("h")
    again = pb.ExitHandlerMessage(claim=pb.ClaimRequest(vm_id="h"))
    err = api.assert_code(lambda: _run_bad_stream(api, again), INVALID,
                          reason=Reason.STREAM_INVALID, field="reply")
    assert "only replies" in (err.details() or "")  # type: ignore[attr-defined]


def test_a_stream_that_does_not_start_with_a_claim_is_refused(api: RunningDaemon) -> None:
    """HandleExits whose first message is a reply, or that sends nothing, is refused
    STREAM_INVALID on `claim` before anything is claimed."""
    api.create_vm("h")
    for first in ([pb.ExitHandlerMessage(reply=pb.ExitReply(exit_id=1))], []):
        api.assert_code(lambda f=first: list(api.stubs.exits.HandleExits(  # type: ignore[misc]
            iter(f), timeout=30)), INVALID, reason=Reason.STREAM_INVALID, field="claim")
    _claim_is_free(api, "h")
