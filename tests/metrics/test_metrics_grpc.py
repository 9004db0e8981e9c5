"""kvmd_grpc_requests_total{method, code} and kvmd_grpc_request_duration_seconds{method}:
every RPC is counted once with its final status code, unary and streaming alike."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from metrics_support import RAM_SIZE, RPC_TIMEOUT, MetricsDaemon, Scrape, wait_for

from kvmd_proto import vmm_pb2 as pb

GET_VM = "/kvmd.v1.Vms/GetVm"
CREATE_VM = "/kvmd.v1.Vms/CreateVm"
READ_MEMORY = "/kvmd.v1.Memory/ReadGuestMemory"
WRITE_MEMORY = "/kvmd.v1.Memory/WriteGuestMemory"
WATCH_VM = "/kvmd.v1.Vms/WatchVm"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def requests(scrape: Scrape, method: str, code: str) -> float:
    found = scrape.find("kvmd_grpc_requests_total", method=method, code=code)
    return float(found[0].value) if found else 0.0


def durations(scrape: Scrape, method: str) -> float:
    found = scrape.find("kvmd_grpc_request_duration_seconds_count", method=method)
    return float(found[0].value) if found else 0.0


def expect_code(fn: object, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        fn()  # type: ignore[operator]
    assert caught.value.code() == code  # type: ignore[attr-defined]


def test_unary_rpcs_are_counted_by_method_and_status_code(mkvmd: MetricsDaemon) -> None:
    vms = mkvmd.vms
    for _ in range(2):
        expect_code(lambda: vms.GetVm(pb.GetVmRequest(vm_id="nope"), timeout=RPC_TIMEOUT),
                    grpc.StatusCode.NOT_FOUND)
    vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)
    expect_code(lambda: vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT),
                grpc.StatusCode.ALREADY_EXISTS)
    expect_code(lambda: vms.CreateVm(pb.CreateVmRequest(vm_id="bad id!"),
                                     timeout=RPC_TIMEOUT), grpc.StatusCode.INVALID_ARGUMENT)
    for _ in range(3):
        vms.GetVm(pb.GetVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)

    s = mkvmd.scrape()
    assert requests(s, GET_VM, "OK") == 3
    assert requests(s, GET_VM, "NOT_FOUND") == 2
    assert requests(s, CREATE_VM, "OK") == 1
    assert requests(s, CREATE_VM, "ALREADY_EXISTS") == 1
    assert requests(s, CREATE_VM, "INVALID_ARGUMENT") == 1
    assert durations(s, GET_VM) == 5
    assert durations(s, CREATE_VM) == 3
    buckets = s.find("kvmd_grpc_request_duration_seconds_bucket", method=GET_VM)
    assert next(b for b in buckets if b.labels["le"] == "+Inf").value == 5
    codes = {smp.labels["code"] for smp in s.find("kvmd_grpc_requests_total")}
    assert codes <= {c.name for c in grpc.StatusCode}, codes
    mkvmd.delete("vm1")


def test_streaming_rpcs_are_counted_with_their_final_code(mkvmd: MetricsDaemon) -> None:
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)
    mkvmd.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="vm1", guest_addr=0, size=RAM_SIZE), timeout=RPC_TIMEOUT)
    # Client streaming: WriteGuestMemory, several messages, counted once.
    written = mkvmd.memory.WriteGuestMemory(iter([
        pb.WriteGuestMemoryRequest(vm_id="vm1", guest_addr=0x2000, data=b"a" * 100),
        pb.WriteGuestMemoryRequest(data=b"b" * 100)]), timeout=RPC_TIMEOUT)
    assert written.bytes_written == 200
    # Server streaming: ReadGuestMemory in 16 chunks, counted once, OK.
    chunks = list(mkvmd.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="vm1", guest_addr=0, length=RAM_SIZE, chunk_size=RAM_SIZE // 16),
        timeout=RPC_TIMEOUT))
    assert len(chunks) == 16
    # ... and failing: an unknown VM, an out-of-bounds read.
    expect_code(lambda: list(mkvmd.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="nope", guest_addr=0, length=16), timeout=RPC_TIMEOUT)),
        grpc.StatusCode.NOT_FOUND)
    expect_code(lambda: list(mkvmd.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="vm1", guest_addr=RAM_SIZE * 4, length=16), timeout=RPC_TIMEOUT)),
        grpc.StatusCode.INVALID_ARGUMENT)

    s = mkvmd.scrape()
    assert requests(s, WRITE_MEMORY, "OK") == 1
    assert requests(s, READ_MEMORY, "OK") == 1
    assert requests(s, READ_MEMORY, "NOT_FOUND") == 1
    assert requests(s, READ_MEMORY, "INVALID_ARGUMENT") == 1
    assert durations(s, READ_MEMORY) == 3
    mkvmd.delete("vm1")


@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_stream_the_client_abandons_is_counted_with_the_clients_code(
        mkvmd: MetricsDaemon, ending: str) -> None:
    """WatchVm runs until the client goes away. Its final status is then what the client
    sees, CANCELLED (the client cancelled) or DEADLINE_EXCEEDED (its deadline passed), and
    the metric must say so: not OK, and not left uncounted."""
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)
    timeout = RPC_TIMEOUT if ending == "cancel" else 1.0
    stream = mkvmd.vms.WatchVm(pb.WatchVmRequest(vm_id="vm1", include_current=True),
                               timeout=timeout)
    first = next(stream)
    assert first.vm_id == "vm1"
    if ending == "cancel":
        stream.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    expected = (grpc.StatusCode.CANCELLED if ending == "cancel"
                else grpc.StatusCode.DEADLINE_EXCEEDED)
    assert caught.value.code() == expected  # type: ignore[attr-defined]

    # The server notices asynchronously: wait for the stream to be counted at all.
    wait_for(lambda: durations(mkvmd.scrape(), WATCH_VM) >= 1, "the WatchVm stream counted")
    s = mkvmd.scrape()
    counted = {smp.labels["code"]: smp.value
               for smp in s.find("kvmd_grpc_requests_total", method=WATCH_VM)}
    assert counted == {expected.name: 1}, counted
    mkvmd.delete("vm1")


def test_a_busy_stream_the_client_abandons_is_counted_cancelled(mkvmd: MetricsDaemon) -> None:
    """Abandoned while the daemon is still sending (a long ReadGuestMemory, not an idle
    WatchVm): its generator ends with GeneratorExit at a yield, and that is still the
    client's CANCELLED, not an UNKNOWN error."""
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)
    size = 64 << 20
    mkvmd.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="vm1", guest_addr=0, size=size), timeout=RPC_TIMEOUT)
    stream = mkvmd.memory.ReadGuestMemory(pb.ReadGuestMemoryRequest(
        vm_id="vm1", guest_addr=0, length=size, chunk_size=4096), timeout=RPC_TIMEOUT)
    next(stream)
    stream.cancel()
    wait_for(lambda: durations(mkvmd.scrape(), READ_MEMORY) >= 1,
             "the ReadGuestMemory stream counted")
    counted = {smp.labels["code"]: smp.value
               for smp in mkvmd.scrape().find("kvmd_grpc_requests_total", method=READ_MEMORY)}
    assert counted == {"CANCELLED": 1}, counted
    mkvmd.delete("vm1")


def test_a_stream_ended_by_deleting_its_vm_is_counted_once(mkvmd: MetricsDaemon) -> None:
    """A WatchVm stream ends (server side) when its VM is deleted: counted exactly once."""
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="vm1"), timeout=RPC_TIMEOUT)
    stream = mkvmd.vms.WatchVm(pb.WatchVmRequest(vm_id="vm1", include_current=True),
                               timeout=RPC_TIMEOUT)
    next(stream)
    mkvmd.delete("vm1")
    try:
        for _event in stream:
            pass
    except grpc.RpcError:
        pass  # how the stream ends is the API's business; the count is ours
    wait_for(lambda: durations(mkvmd.scrape(), WATCH_VM) >= 1, "the WatchVm stream counted")
    s = mkvmd.scrape()
    assert sum(smp.value for smp in s.find("kvmd_grpc_requests_total", method=WATCH_VM)) == 1


def test_a_health_check_of_an_unknown_service_is_not_found_and_no_error(
        mkvmd: MetricsDaemon, caplog: pytest.LogCaptureFixture) -> None:
    """grpc's own health servicer aborts the call itself (NOT_FOUND): the daemon passes its
    status through, counts it as NOT_FOUND and logs no error (a load balancer probing a
    wrong name is not a daemon failure)."""
    health = health_pb2_grpc.HealthStub(mkvmd.channel)
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    wait_for(lambda: durations(mkvmd.scrape(), HEALTH_CHECK) >= 1, "the check counted")
    assert requests(mkvmd.scrape(), HEALTH_CHECK, "NOT_FOUND") == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
