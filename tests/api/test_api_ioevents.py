"""IoEvents service: register, list, unregister, watch (guest-driven firing is in
test_api_guest.py)."""

from __future__ import annotations

import threading

import grpc
import pytest
from api_support import RunningDaemon
from polling import wait_until

from kvmd.core.errors import Reason
from kvmd_proto import vmm_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXISTS = grpc.StatusCode.ALREADY_EXISTS


@pytest.fixture
def vm(api: RunningDaemon) -> str:
    api.create_vm("io")
    return "io"


def _register(api: RunningDaemon, vm_id: str, ioevent_id: str, space: int = pb.PIO,
              address: int = 0x10, length: int = 0, datamatch: int | None = None) -> pb.Ioevent:
    req = pb.RegisterIoeventRequest(vm_id=vm_id, ioevent_id=ioevent_id, space=space,  # type: ignore[arg-type]
                                    address=address, length=length)
    if datamatch is not None:
        req.datamatch = datamatch
    return api.ioevents.RegisterIoevent(req)


def test_register_list_unregister(api: RunningDaemon, vm: str) -> None:
    a = _register(api, vm, "any-pio", address=0x2F8)
    b = _register(api, vm, "mmio-u32", space=pb.MMIO, address=0xD000_0000, length=4)
    c = _register(api, vm, "match", address=0x80, length=1, datamatch=0x42)
    d = _register(api, vm, "u64-max", space=pb.MMIO, address=0xD000_1000, length=8,
                  datamatch=2**64 - 1)
    assert (a.vm_id, a.ioevent_id, a.space, a.address, a.length, a.HasField("datamatch"),
            a.fired) == (vm, "any-pio", pb.PIO, 0x2F8, 0, False, 0)
    assert (b.space, b.address, b.length) == (pb.MMIO, 0xD000_0000, 4)
    assert (c.length, c.datamatch) == (1, 0x42)
    assert d.datamatch == 2**64 - 1

    listed = api.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id=vm)).ioevents
    assert sorted(e.ioevent_id for e in listed) == ["any-pio", "match", "mmio-u32", "u64-max"]
    assert {e.ioevent_id: e for e in listed}["match"] == c

    api.ioevents.UnregisterIoevent(pb.UnregisterIoeventRequest(vm_id=vm, ioevent_id="match"))
    listed = api.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id=vm)).ioevents
    assert sorted(e.ioevent_id for e in listed) == ["any-pio", "mmio-u32", "u64-max"]
    # Same address and datamatch again, under the same id: allowed after unregistering.
    assert _register(api, vm, "match", address=0x80, length=1, datamatch=0x42) == c


@pytest.mark.parametrize("length", [1, 2, 4, 8])
def test_datamatch_lengths(api: RunningDaemon, vm: str, length: int) -> None:
    top = 2 ** (8 * length) - 1
    got = _register(api, vm, f"l{length}", space=pb.MMIO, address=0xE000_0000, length=length,
                    datamatch=top)
    assert (got.length, got.datamatch) == (length, top)
    # A datamatch of 0 is a datamatch (writes of 0 only), not "any value".
    zero = _register(api, vm, f"z{length}", space=pb.MMIO, address=0xE000_1000, length=length,
                     datamatch=0)
    assert zero.HasField("datamatch") and zero.datamatch == 0
    listed = {e.ioevent_id: e for e in api.ioevents.ListIoevents(
        pb.ListIoeventsRequest(vm_id=vm)).ioevents}
    assert listed[f"z{length}"] == zero


def test_same_address_different_datamatch(api: RunningDaemon, vm: str) -> None:
    _register(api, vm, "one", address=0x60, length=1, datamatch=1)
    _register(api, vm, "two", address=0x60, length=1, datamatch=2)
    # A wildcard at the same address and length collides with both (the kernel's EEXIST).
    api.assert_code(lambda: _register(api, vm, "any", address=0x60, length=1), EXISTS)
    api.assert_code(lambda: _register(api, vm, "any", address=0x60), EXISTS)


@pytest.mark.parametrize("length", [3, 5, 6, 7, 9, 16, 2**32 - 1])
def test_bad_datamatch_length(api: RunningDaemon, vm: str, length: int) -> None:
    api.assert_code(lambda: _register(api, vm, "bad", length=length), INVALID)
    api.assert_code(lambda: _register(api, vm, "bad", length=length, datamatch=0), INVALID)


@pytest.mark.parametrize(("length", "value"), [
    (1, 0x100), (2, 0x1_0000), (4, 0x1_0000_0000), (0, 0), (0, 1)])
def test_datamatch_value_does_not_fit(api: RunningDaemon, vm: str, length: int,
                                      value: int) -> None:
    """A length KVM takes with a value it cannot hold: the datamatch is the field at fault."""
    api.assert_code(lambda: _register(api, vm, "bad", length=length, datamatch=value), INVALID,
                    reason=Reason.VALUE_OUT_OF_RANGE, field="datamatch")


def test_register_bad_inputs(api: RunningDaemon, vm: str) -> None:
    _register(api, vm, "taken", address=0x20)
    api.assert_code(lambda: _register(api, "nope", "x"), NOT_FOUND)
    api.assert_code(lambda: _register(api, vm, "taken", address=0x30), EXISTS)  # same id
    api.assert_code(lambda: _register(api, vm, "clash", address=0x20), EXISTS)  # same address
    api.assert_code(lambda: _register(api, vm, "port", address=0x10000), INVALID)
    api.assert_code(lambda: _register(api, vm, "port8", address=0xFFFF, length=8), INVALID)
    api.assert_code(lambda: _register(api, vm, "mmio", space=pb.MMIO, address=1 << 60),
                    INVALID)
    api.assert_code(lambda: _register(api, vm, "space", space=7), INVALID)
    for bad in ("", "x" * 65, "has space", "a/b", "-dash"):
        api.assert_code(lambda b=bad: _register(api, vm, b, address=0x40), INVALID)  # type: ignore[misc]
    assert [e.ioevent_id for e in api.ioevents.ListIoevents(
        pb.ListIoeventsRequest(vm_id=vm)).ioevents] == ["taken"]


def test_unregister_list_watch_bad_inputs(api: RunningDaemon, vm: str) -> None:
    io = api.ioevents
    api.assert_code(lambda: io.UnregisterIoevent(pb.UnregisterIoeventRequest(
        vm_id=vm, ioevent_id="never")), NOT_FOUND)
    api.assert_code(lambda: io.UnregisterIoevent(pb.UnregisterIoeventRequest(
        vm_id="nope", ioevent_id="x")), NOT_FOUND)
    api.assert_code(lambda: io.ListIoevents(pb.ListIoeventsRequest(vm_id="nope")), NOT_FOUND)
    api.assert_code(lambda: list(io.WatchIoevents(pb.WatchIoeventsRequest(vm_id="nope"))),
                    NOT_FOUND)
    _register(api, vm, "once")
    io.UnregisterIoevent(pb.UnregisterIoeventRequest(vm_id=vm, ioevent_id="once"))
    api.assert_code(lambda: io.UnregisterIoevent(pb.UnregisterIoeventRequest(
        vm_id=vm, ioevent_id="once")), NOT_FOUND)  # double unregister


def test_watch_ioevents_ends_when_vm_deleted(api: RunningDaemon, vm: str) -> None:
    _register(api, vm, "e")
    stream = api.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id=vm), timeout=30)
    items: list[pb.IoeventFired] = []
    finished = threading.Event()

    def consume() -> None:
        items.extend(stream)  # raises on anything but a clean end
        finished.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    assert not finished.wait(0.5)  # a watch stays open while the VM lives
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm))
    assert finished.wait(10), "WatchIoevents did not end after DeleteVm"
    thread.join()
    assert items == []
    assert stream.code() == grpc.StatusCode.OK
    api.assert_healthy()


def test_watch_ioevents_ends_on_client_cancel(api: RunningDaemon, vm: str) -> None:
    """A client that cancels its watch ends it in the daemon too: the subscription goes,
    while the VM (and new watchers) are unaffected."""
    fired = api.daemon.host.get_vm(vm).ioevent_fired
    stream = api.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id=vm), timeout=30)
    other = api.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id=vm), timeout=30)
    wait_until(lambda: fired.subscriber_count == 2, 10, "both watches to subscribe")
    stream.cancel()
    wait_until(lambda: fired.subscriber_count == 1, 10,
               "the daemon to drop the cancelled watch")
    _register(api, vm, "after")
    other.cancel()
    wait_until(lambda: fired.subscriber_count == 0, 10, "the daemon to drop the other watch")
    api.assert_healthy()


def test_many_watchers_then_delete(api: RunningDaemon, vm: str) -> None:
    streams = [api.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id=vm), timeout=30)
               for _ in range(8)]
    results: list[object] = []

    def consume(s: object) -> None:
        results.append(list(s))  # type: ignore[call-overload]

    threads = [threading.Thread(target=consume, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    threading.Event().wait(0.5)
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id=vm))
    for t in threads:
        t.join(10)
    assert results == [[]] * 8
    api.assert_healthy()
