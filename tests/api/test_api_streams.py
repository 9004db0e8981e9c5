"""Long-lived streams: their own budgets, no thread each, never starving unary calls or the
health check, and a clean end of stream when the daemon stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from api_support import DaemonFactory, RunningDaemon, error_info
from polling import wait_until

from kvmd.api.streams import END_CLOSED, END_KEY, END_SHUTDOWN
from kvmd_proto import vmm_pb2 as pb

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def open_watches(api: RunningDaemon, vm_id: str, n: int) -> list[Any]:
    """n WatchVm streams, each established (its first event received)."""
    streams = [api.vms.WatchVm(pb.WatchVmRequest(vm_id=vm_id, include_current=True),
                               timeout=120) for _ in range(n)]
    for s in streams:
        assert next(s).type == "state"
    return streams


def cancel_all(streams: list[Any]) -> None:
    for s in streams:
        s.cancel()


def test_open_streams_leave_unary_calls_and_health_answering(
        daemon_factory: DaemonFactory) -> None:
    # Two threads serve unary calls; 64 open watches must not take them (they used to
    # count against the same limit, and every other call failed RESOURCE_EXHAUSTED).
    api = daemon_factory(max_concurrent_rpcs=2)
    api.create_vm("a")
    streams = open_watches(api, "a", 64)
    try:
        for _ in range(20):
            assert api.vms.GetVm(pb.GetVmRequest(vm_id="a")).vm_id == "a"
        api.assert_healthy()
    finally:
        cancel_all(streams)


def test_stream_budget_per_identity(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_streams_per_identity=4)
    api.create_vm("a")
    streams = open_watches(api, "a", 4)
    try:
        err = api.assert_code(lambda: next(api.vms.WatchVm(
            pb.WatchVmRequest(vm_id="a", include_current=True))), EXHAUSTED)
        assert "max_streams_per_identity" in (err.details() or "")  # type: ignore[attr-defined]
        assert api.vms.GetVm(pb.GetVmRequest(vm_id="a")).vm_id == "a"
        streams.pop().cancel()
        # The slot comes back once the daemon sees the cancel.
        wait_until(lambda: api.daemon.budget.usage("local").streams == 3, 10,
                   "a cancelled stream to give back its budget")
        streams += open_watches(api, "a", 1)
    finally:
        cancel_all(streams)


def test_total_stream_budget(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_streams=6, max_streams_per_identity=100)
    api.create_vm("a")
    streams = open_watches(api, "a", 6)
    try:
        api.assert_code(lambda: list(api.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
            vm_id="a", guest_addr=0, length=0))), EXHAUSTED)
    finally:
        cancel_all(streams)
    wait_until(lambda: api.daemon.budget.streams == 0, 10, "every stream's budget back")


def test_two_thousand_idle_watchers_cost_no_thread_each(
        daemon_factory: DaemonFactory) -> None:
    # Every one of 2,000 streams opened at once gets its first event (none is reset), and
    # the daemon's thread count does not grow with them.
    api = daemon_factory(max_streams=4096, max_streams_per_identity=4096)
    api.create_vm("a")
    api.assert_healthy()
    threads_before = threading.active_count()
    streams = open_watches(api, "a", 2000)
    try:
        assert api.daemon.budget.streams == 2000
        assert threading.active_count() - threads_before < 16, threading.active_count()
        api.assert_healthy()
        # Every watcher follows live events: delete the VM, each stream ends.
        api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="a"))
        ended = 0
        for s in streams:
            for _ in s:
                pass
            ended += 1
        assert ended == 2000
    finally:
        cancel_all(streams)
    wait_until(lambda: api.daemon.budget.streams == 0, 10, "every stream's budget back")
    assert len(api.daemon.streams) == 0


def _trailing(call: Any) -> dict[str, str]:
    return {k: v for k, v in call.trailing_metadata() or ()}


def test_stop_ends_every_stream_cleanly(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory()
    api.create_vm("a")
    watch = api.vms.WatchVm(pb.WatchVmRequest(vm_id="a", include_current=True), timeout=60)
    console = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="a"), timeout=60)
    assert next(watch).type == "state"
    received: dict[str, Any] = {}

    def drain(name: str, stream: Iterator[Any]) -> None:
        try:
            received[name] = list(stream)
        except grpc.RpcError as err:
            received[name] = err

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in
               (("watch", watch), ("console", console))]
    for t in readers:
        t.start()
    time.sleep(0.2)  # let the console stream reach the daemon
    api.daemon.stop()
    for t in readers:
        t.join(10)
    # A clean end of stream (not UNAVAILABLE), saying why, so a client knows to reconnect.
    for name, stream in (("watch", watch), ("console", console)):
        assert isinstance(received[name], list), received[name]
        assert stream.code() == grpc.StatusCode.OK
        assert _trailing(stream).get(END_KEY) == END_SHUTDOWN


def test_streams_of_a_deleted_vm_end_saying_closed(api: RunningDaemon) -> None:
    # "closed", not "shutdown": the client library re-opens a stream after "shutdown", which
    # for a VM that is gone would only fail NOT_FOUND.
    api.create_vm("gone")
    watch = api.vms.WatchVm(pb.WatchVmRequest(vm_id="gone", include_current=True), timeout=60)
    console = api.vms.StreamConsole(pb.StreamConsoleRequest(vm_id="gone"), timeout=60)
    assert next(watch).type == "state"
    wait_until(lambda: len(api.daemon.streams) == 2, 10, "both streams to follow")
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="gone"))
    for stream in (watch, console):
        list(stream)
        assert stream.code() == grpc.StatusCode.OK
        assert _trailing(stream).get(END_KEY) == END_CLOSED


@pytest.mark.parametrize("ranges", [1025])
def test_claim_with_too_many_ranges_is_refused(api: RunningDaemon, ranges: int) -> None:
    api.create_vm("a")
    claim = pb.ClaimRequest(vm_id="a", ranges=[
        pb.AddressRange(space=pb.MMIO, base=0x1000_0000 + i * 0x1000, length=0x10)
        for i in range(ranges)])
    err = api.assert_code(lambda: next(api.stubs.exits.HandleExits(iter([
        pb.ExitHandlerMessage(claim=claim)]))), grpc.StatusCode.INVALID_ARGUMENT)
    info = error_info(err)
    assert info is not None


def test_a_large_claim_is_checked_against_others_exactly(api: RunningDaemon) -> None:
    # 1,024 ranges (the most per claim) are accepted; a second claim overlapping only the
    # last of them, by one byte, is refused; one that fits between two is accepted.
    api.create_vm("a")
    first = pb.ClaimRequest(vm_id="a", ranges=[
        pb.AddressRange(space=pb.MMIO, base=0x1000_0000 + i * 0x1000, length=0x10)
        for i in range(1024)])
    requests: list[pb.ExitHandlerMessage] = [pb.ExitHandlerMessage(claim=first)]
    done = threading.Event()

    def hold() -> Iterator[pb.ExitHandlerMessage]:
        yield from requests
        done.wait(30)

    stream = api.stubs.exits.HandleExits(hold(), timeout=60)
    try:
        assert len(next(stream).claimed.ranges) == 1024
        last = 0x1000_0000 + 1023 * 0x1000
        overlap = pb.ClaimRequest(vm_id="a", ranges=[
            pb.AddressRange(space=pb.MMIO, base=last + 0xF, length=1)])
        api.assert_code(lambda: next(api.stubs.exits.HandleExits(iter([
            pb.ExitHandlerMessage(claim=overlap)]))), grpc.StatusCode.ALREADY_EXISTS)
        between = pb.ClaimRequest(vm_id="a", ranges=[
            pb.AddressRange(space=pb.MMIO, base=last - 0x1000 + 0x10, length=0x1000 - 0x10)])
        other = api.stubs.exits.HandleExits(iter([pb.ExitHandlerMessage(claim=between)]),
                                            timeout=30)
        assert len(next(other).claimed.ranges) == 1
        other.cancel()
    finally:
        done.set()
        stream.cancel()
