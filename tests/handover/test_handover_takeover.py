"""`kvmd --take-over`: a new daemon asks the one running on the same socket for its VMs
(states and memfds over a Unix socket, SCM_RIGHTS), restores them and serves in its place;
the old one exits 0. Clients ride it out: unary calls are retried, watch and console
streams re-opened (consoles at their offset), exit handlers re-claim. Failures before the
switch leave the old daemon serving with its VMs running; a VM the new daemon cannot
restore is stranded there, not lost."""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemon_threads import own_thread_nices
from handover_support import (
    CLAIMED_PORT,
    COUNTER,
    IRQ5S,
    PATTERN_ADDR,
    PATTERN_SIZE,
    TICKS,
    Kvmd,
    assert_consecutive,
    boot,
    connect,
    numbers,
    pattern,
    u32,
    vcpu_thread_ids,
    wait_until,
)
from kvmd_stubs import Stubs

from kvmd.handover import Channel, socket_path
from kvmd_client.errors import KvmdError
from kvmd_proto import vmm_pb2 as pb

VMS = 16


def test_sixteen_guests_survive_a_take_over(tmp_path: Path) -> None:
    old = Kvmd(tmp_path)
    c = connect(old.address)
    vm_ids = [f"t{i:02d}" for i in range(VMS)]
    irq_vms = [v for i, v in enumerate(vm_ids) if i % 4]  # 4 without the irqchip spin
    for vm_id in vm_ids:
        boot(c, vm_id, irqs=vm_id in irq_vms, claimed=vm_id == "t04")
    for vm_id in vm_ids:
        wait_until(lambda v=vm_id: u32(c, v, COUNTER) > 3, 60, f"{vm_id} to count")
    # Client-owned things: a live console, a VM watch, an exit handler claim.
    console = c.stream_console("t02", backlog=True)  # a paced (irqchip) guest
    events = c.watch_vm("t05", include_current=True)
    assert events.next(10).state == "running"  # type: ignore[union-attr]
    handler = c.handle_exits("t04", [("pio", CLAIMED_PORT, 1)], deadline_ms=5000)
    served: list[str] = []

    def serve() -> None:
        for exit_request in handler:
            served.append(handler.handler_id)
            handler.reply(exit_request.exit_id, b"\x07")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    wait_until(lambda: len(served) > 3, 30, "remote exits")
    # A client hammering the API throughout: it must never see an error.
    errors: list[BaseException] = []
    calls = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal calls
        with connect(old.address) as h:
            while not stop.is_set():
                try:
                    h.get_vm("t00")
                    h.list_vms()
                    calls += 1
                    time.sleep(0.01)
                except BaseException as exc:
                    errors.append(exc)
                    return

    busy = threading.Thread(target=hammer, daemon=True)
    busy.start()
    before = {v: (u32(c, v, COUNTER), c.exit_stats(v).total["io_out"]) for v in vm_ids}
    ticks = {v: u32(c, v, TICKS) for v in irq_vms}

    # The new daemon confines its vCPU threads (vcpu_cpus): the restored VMs' threads too;
    # and its other threads (api_cpus), from before it restores anything.
    guest_cpu, api_cpu = max(os.sched_getaffinity(0)), min(os.sched_getaffinity(0))
    new = Kvmd(tmp_path, "--take-over", "--vcpu-cpus", str(guest_cpu),
               "--api-cpus", str(api_cpu))
    assert old.wait(60) == 0, old.log
    wait_until(lambda: len(vcpu_thread_ids(new.proc.pid)) == VMS, 30,
               "every restored vCPU thread running at vcpu_nice")
    vcpu_threads = vcpu_thread_ids(new.proc.pid)
    assert all(os.sched_getaffinity(tid) == {guest_cpu} for tid in vcpu_threads)
    others = [tid for tid, nice in own_thread_nices(new.proc.pid).items() if nice == 0]
    assert others and all(os.sched_getaffinity(tid) == {api_cpu} for tid in others)
    # A call that is not idempotent, issued right after the switch: done exactly once.
    c.create_vm("made-after")
    time.sleep(0.5)
    stop.set()
    busy.join(30)
    assert errors == [] and calls > 0
    assert "vms handed over" in old.log and "kvmd stopped" in old.log
    for vm_id in vm_ids:
        assert c.get_vm(vm_id).state == "running"
        counter, io_out = before[vm_id]
        wait_until(lambda v=vm_id, n=counter: u32(c, v, COUNTER) > n + 3, 60,
                   f"{vm_id} to count on")
        assert c.exit_stats(vm_id).total["io_out"] > io_out  # continued, not reset
        assert c.read_memory(vm_id, PATTERN_ADDR, PATTERN_SIZE) == pattern(vm_id)
        printed = numbers(c.console_backlog(vm_id))
        assert printed[0] == 1
        assert_consecutive(printed, vm_id)
    for vm_id in irq_vms:
        wait_until(lambda v=vm_id: u32(c, v, TICKS) > ticks[v] + 5, 30, f"{vm_id}'s PIT")
        c.trigger_irqfd(vm_id, "irq5")
        wait_until(lambda v=vm_id: u32(c, v, IRQ5S) == 1, 30, f"{vm_id}'s irqfd")
    # The console stream resumed at its offset: contiguous bytes across the switch.
    target = u32(c, "t02", COUNTER) + 5  # printed by the new daemon
    received = b""
    while not numbers(received) or numbers(received)[-1] <= target:
        item = console.next(30)
        assert item is not None
        assert item.offset == len(received), "a gap or an overlap in the live console"
        received += item.data
    console.cancel()
    assert console.reopened >= 1 and numbers(received)[0] == 1
    assert_consecutive(numbers(received), "t02 live")
    # The watch saw the hand-over pause the VM, then re-opened with the current state; the
    # exit handler claimed again.
    seen = []
    while not seen or seen[-1][0] != "state":
        event = events.next(30)
        assert event is not None
        seen.append((event.type, event.state))
    assert seen[-1] == ("state", "running") and events.reopened >= 1
    events.cancel()
    assert handler.reopened >= 1  # claimed again (the new daemon numbers handlers anew)
    count = len(served)
    wait_until(lambda: len(served) > count + 3, 30, "remote exits through the new claim")
    handler.cancel()
    assert {v.vm_id for v in c.list_vms()} == {*vm_ids, "made-after"}
    report = c.handover_report()
    assert (report.mode, report.restored, report.stranded) == ("take-over", VMS, 0)
    assert 0 < report.max_paused_seconds <= report.api_unavailable_seconds
    lines = new.log_lines("hand-over complete")
    assert lines and lines[0]["mode"] == "take-over" and "api_unavailable_ms" in lines[0]
    c.close()
    assert new.stop() == 0


def _fake_new_daemon(address: Path) -> tuple[Channel, dict[str, Any], dict[str, int]]:
    """Speak the new daemon's side up to the states and memfds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path(str(address)))
    chan = Channel(sock)
    chan.send_json({"op": "hello", "version": 1, "kvmd_version": "fake", "pid": 0})
    chan.expect("accepted", 30)
    manifest = chan.expect("manifest", 60)
    fds: dict[str, int] = {}
    while True:
        kind, message, got = chan.recv(60)
        if kind == "J" and message["op"] == "sent":
            break
        if kind == "F":
            fds.update(zip(message, got, strict=True))
    return chan, manifest, fds


@pytest.mark.parametrize("how", ["disconnect", "abort"])
def test_a_new_daemon_failing_before_the_switch_leaves_the_old_serving(
        tmp_path: Path, how: str) -> None:
    old = Kvmd(tmp_path)
    c = connect(old.address)
    boot(c, "v1")
    boot(c, "v2", irqs=True)
    wait_until(lambda: u32(c, "v1", COUNTER) > 3, 60, "v1 to count")
    console = c.stream_console("v1")
    chan, manifest, fds = _fake_new_daemon(old.socket)
    assert sorted(e["vm_id"] for e in manifest["vms"]) == ["v1", "v2"]
    assert sorted(fds) == ["kvmd-mem.0.v1", "kvmd-mem.0.v2"]
    # Meanwhile the old daemon holds its VMs paused and refuses calls (retryable).
    paused = u32_raw(fds["kvmd-mem.0.v1"], COUNTER)
    time.sleep(0.3)
    assert u32_raw(fds["kvmd-mem.0.v1"], COUNTER) == paused
    if how == "abort":
        chan.send_json({"op": "abort", "reason": "the test says no"})
    chan.close()
    for fd in fds.values():
        os.close(fd)
    wait_until(lambda: u32(c, "v1", COUNTER) > paused + 3, 60, "v1 to run again")
    assert c.get_vm("v2").state == "running"
    assert "hand-over failed: resuming the VMs and serving on" in old.log
    assert old.proc.poll() is None
    received = b""
    while not numbers(received) or numbers(received)[-1] <= paused + 2:
        item = console.next(30)
        assert item is not None
        received += item.data
    console.cancel()
    assert_consecutive(numbers(received), "v1")
    # A stream opened now is followed (its events arrive), not ended at once as the
    # hand-over ended those open then: the client above would only have reconnected.
    stubs = Stubs.of(grpc.insecure_channel(old.address))
    watch = stubs.vms.WatchVm(pb.WatchVmRequest(vm_id="v1", include_current=True), timeout=30)
    assert next(watch).state == "running"
    c.pause_vm("v1")
    assert next(watch).state == "paused"
    c.resume_vm("v1")
    watch.cancel()
    stubs.close()
    # And it can still be taken over properly.
    new = Kvmd(tmp_path, "--take-over")
    assert old.wait(60) == 0
    assert sorted(v.vm_id for v in c.list_vms()) == ["v1", "v2"]
    c.close()
    new.stop()


def u32_raw(memfd: int, offset: int) -> int:
    return int(struct.unpack("<I", os.pread(memfd, 4, offset))[0])


def test_a_vm_the_new_daemon_cannot_restore_is_stranded_there(tmp_path: Path) -> None:
    old = Kvmd(tmp_path)
    c = connect(old.address)
    for vm_id in ("a1", "a2", "a3"):
        boot(c, vm_id)
    wait_until(lambda: u32(c, "a3", COUNTER) > 3, 60, "a3 to count")
    # The new daemon allows 2 VMs: one of the three cannot be restored there.
    new = Kvmd(tmp_path, "--take-over", "--max-vms", "2")
    assert old.wait(60) == 0
    restored = sorted(v.vm_id for v in c.list_vms())
    [stranded] = c.list_stranded_vms()
    assert len(restored) == 2 and stranded.vm_id not in restored
    assert "limit" in stranded.reason and stranded.memory_bytes > 0
    assert stranded.memory_fds == [f"kvmd-mem.0.{stranded.vm_id}"]
    with pytest.raises(KvmdError, match="RESOURCE_EXHAUSTED"):
        c.retry_stranded_vm(stranded.vm_id)
    c.delete_vm(restored[0])  # make room, then retry: it runs on where it was
    vm = c.retry_stranded_vm(stranded.vm_id)
    assert vm.state == "running"
    n = u32(c, stranded.vm_id, COUNTER)
    wait_until(lambda: u32(c, stranded.vm_id, COUNTER) > n + 3, 60, "it to count on")
    assert_consecutive(numbers(c.console_backlog(stranded.vm_id)), stranded.vm_id)
    assert c.read_memory(stranded.vm_id, PATTERN_ADDR, PATTERN_SIZE) == \
        pattern(stranded.vm_id)
    assert c.list_stranded_vms() == []
    c.close()
    new.stop()


def test_a_call_that_will_not_finish_refuses_the_take_over_and_the_api_serves_on(
        tmp_path: Path) -> None:
    """A take-over waits for the calls in flight; one that does not finish in time (a
    12 s dirty-rate measurement against 5 s) fails the take-over, and the old daemon opens
    its API again at once: calls are answered, not refused as during a hand-over."""
    old = Kvmd(tmp_path)
    stubs = Stubs.of(grpc.insecure_channel(old.address))
    vms, memory = stubs.vms, stubs.memory
    vms.CreateVm(pb.CreateVmRequest(vm_id="busy"), timeout=30)
    memory.AddMemoryRegion(pb.AddMemoryRegionRequest(vm_id="busy", guest_addr=0,
                                                     size=1 << 16, log_dirty=True), timeout=30)
    held = memory.MeasureDirtyRate.future(pb.MeasureDirtyRateRequest(
        vm_id="busy", duration_ms=12_000), timeout=60)
    try:
        new = Kvmd(tmp_path, "--take-over", wait=False)
        assert new.wait(60) == 1
        assert "calls still in flight" in new.log
        assert vms.GetVm(pb.GetVmRequest(vm_id="busy"), timeout=5).vm_id == "busy"
        assert not held.done()  # the refusal did not wait for the measurement
        held.result(timeout=30)
        assert old.proc.poll() is None
    finally:
        stubs.close()
        old.stop()


def test_take_over_with_nothing_to_take_over_fails_clearly(tmp_path: Path) -> None:
    lone = Kvmd(tmp_path, "--take-over", wait=False)
    assert lone.wait(60) == 1
    assert "no daemon to take over" in lone.log


def test_a_serving_daemon_keeps_its_start_up_objects_out_of_full_collections(
        tmp_path: Path) -> None:
    # What start-up built lives as long as the process: frozen out of the collector, a full
    # collection no longer walks it while holding the GIL every call needs.
    daemon = Kvmd(tmp_path)
    try:
        line = wait_until(lambda: re.search(r'msg="start-up objects frozen" objects=(\d+)',
                                            daemon.log), 30, "the freeze")
        assert int(line.group(1)) > 10_000
        assert line.start() > daemon.log.index("kvmd listening")
    finally:
        assert daemon.stop() == 0
