"""Real guest behaviour seen through gRPC: ioevents, dirty logs, irqfd resamples.

Everything is set up and observed over gRPC; only KVM_RUN itself goes through the in-process
daemon's core objects (run control has no RPC yet), see api_guest.run_vcpu.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
from api_guest import (
    CODE_ADDR,
    DIRTY_PAGES_SLOT0,
    DIRTY_PAGES_SLOT1,
    DONE_PORT,
    HANDLER_ADDR,
    IOEVENT_PORT,
    PIC_IRQ,
    PIC_VECTOR_BASE,
    RAM_SIZE,
    SLOT1_ADDR,
    SLOT1_SIZE,
    dirty_pages_program,
    handler_program,
    ioevent_then_hlt_loop,
    ivt_entry,
    pic_interrupt_program,
    run_vcpu,
    setup_real_mode,
)
from api_support import RunningDaemon

from kvmd.kvm import HltExit, IoExit
from kvmd_proto import vmm_pb2 as pb

EVENT_WAIT = 2.0  # seconds to wait for a stream event before re-running the guest


def _dirty_pages(chunks: list[pb.DirtyLogChunk]) -> set[int]:
    pages = set()
    for chunk in chunks:
        bits = int.from_bytes(chunk.bitmap, "little")
        pages |= {chunk.first_page + i for i in range(len(chunk.bitmap) * 8) if bits >> i & 1}
    return pages


def _drain_into(stream: grpc.Future, out: queue.Queue[object]) -> threading.Thread:
    def reader() -> None:
        try:
            for item in stream:  # type: ignore[attr-defined]
                out.put(item)
        except grpc.RpcError as exc:
            out.put(exc)
        out.put(StopIteration())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread


def test_guest_out_to_ioevent_port_is_streamed_by_watch_ioevents(api: RunningDaemon) -> None:
    api.create_vm("g1")
    api.add_memory("g1", 0, RAM_SIZE)
    api.write("g1", CODE_ADDR, ioevent_then_hlt_loop())
    api.create_vcpu("g1")
    setup_real_mode(api, "g1")
    api.ioevents.RegisterIoevent(pb.RegisterIoeventRequest(
        vm_id="g1", ioevent_id="doorbell", space=pb.PIO, address=IOEVENT_PORT, length=1))

    events: queue.Queue[object] = queue.Queue()
    stream = api.ioevents.WatchIoevents(pb.WatchIoeventsRequest(vm_id="g1"), timeout=60)
    reader = _drain_into(stream, events)

    # The server subscribes asynchronously: run the guest (one `out` per run) until the
    # watcher sees a write; after that every single run must show up as exactly one event.
    runs = 0
    first = None
    while first is None and runs < 10:
        assert isinstance(run_vcpu(api, "g1"), HltExit)
        runs += 1
        try:
            first = events.get(timeout=EVENT_WAIT)
        except queue.Empty:
            continue
    assert isinstance(first, pb.IoeventFired), first
    assert first.ioevent_id == "doorbell"
    assert first.count == 1

    for _ in range(3):
        assert isinstance(run_vcpu(api, "g1"), HltExit)
        runs += 1
        fired = events.get(timeout=10)
        assert isinstance(fired, pb.IoeventFired), fired
        assert (fired.ioevent_id, fired.count) == ("doorbell", 1)

    # The guest never exited for the port: KVM signalled the eventfd instead.
    listed = api.ioevents.ListIoevents(pb.ListIoeventsRequest(vm_id="g1")).ioevents
    assert [(e.ioevent_id, e.fired) for e in listed] == [("doorbell", runs)]

    # Deleting the VM ends the stream cleanly.
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="g1"))
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert isinstance(events.get_nowait(), StopIteration)


def test_guest_stores_show_in_dirty_log_then_log_is_clean(api: RunningDaemon) -> None:
    api.create_vm("d1")
    slot0 = api.add_memory("d1", 0, RAM_SIZE, log_dirty=True)
    slot1 = api.add_memory("d1", SLOT1_ADDR, SLOT1_SIZE, log_dirty=True)
    api.write("d1", CODE_ADDR, dirty_pages_program())
    api.create_vcpu("d1")
    setup_real_mode(api, "d1")

    # Host writes (the program load above) do not mark pages.
    assert _dirty_pages(api.dirty_log("d1", slot0.slot)) == set()
    assert _dirty_pages(api.dirty_log("d1", slot1.slot)) == set()

    assert isinstance(run_vcpu(api, "d1"), HltExit)

    log0 = api.dirty_log("d1", slot0.slot)
    assert _dirty_pages(log0) == DIRTY_PAGES_SLOT0
    assert len(log0) == 1 and log0[0].last
    assert log0[0].total_pages == RAM_SIZE // 4096
    assert log0[0].dirty_pages == log0[0].total_dirty_pages == len(DIRTY_PAGES_SLOT0)

    # Slot 1 in 4-byte chunks (32 pages each): pages 0 and 9 in chunk 0, 0x5f in chunk 2.
    log1 = api.dirty_log("d1", slot1.slot, chunk_size=4)
    assert [c.first_page for c in log1] == [0, 32, 64, 96]
    assert [c.dirty_pages for c in log1] == [2, 0, 1, 0]
    assert [c.last for c in log1] == [False, False, False, True]
    assert log1[-1].total_dirty_pages == 3
    assert all(c.slot == slot1.slot and c.total_pages == SLOT1_SIZE // 4096 for c in log1)
    assert _dirty_pages(log1) == DIRTY_PAGES_SLOT1

    # The guest's stores are in memory, readable over gRPC.
    assert api.read("d1", 0x3000, 1) == b"\xa5"
    assert api.read("d1", 0x9FFF, 1) == b"\xa5"
    assert api.read("d1", 0x7F000, 1) == b"\x5c"

    # Reading reset the logs.
    again0 = api.dirty_log("d1", slot0.slot)
    again1 = api.dirty_log("d1", slot1.slot)
    assert _dirty_pages(again0) == _dirty_pages(again1) == set()
    assert again0[-1].total_dirty_pages == again1[-1].total_dirty_pages == 0


def test_guest_ack_of_irqfd_interrupt_streams_resample(api: RunningDaemon) -> None:
    api.create_vm("r1", irqchip=True)
    api.add_memory("r1", 0, RAM_SIZE)
    api.write("r1", CODE_ADDR, pic_interrupt_program())
    api.write("r1", HANDLER_ADDR, handler_program())
    addr, entry = ivt_entry(PIC_VECTOR_BASE + PIC_IRQ, HANDLER_ADDR)
    api.write("r1", addr, entry)
    api.create_vcpu("r1")
    setup_real_mode(api, "r1")
    irqfd = api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
        vm_id="r1", irqfd_id="level4", gsi=PIC_IRQ, resample=True))
    assert irqfd.resample

    events: queue.Queue[object] = queue.Queue()
    stream = api.interrupts.WatchIrqfdResamples(
        pb.WatchIrqfdResamplesRequest(vm_id="r1"), timeout=60)
    reader = _drain_into(stream, events)

    exit_ = run_vcpu(api, "r1")
    assert isinstance(exit_, IoExit) and exit_.port == IOEVENT_PORT, exit_  # PIC programmed

    # Each trigger raises IRQ4; the guest takes it (auto-EOI acks it) and reports on
    # DONE_PORT. Repeat until the watcher, which subscribes asynchronously, sees one.
    triggers = 0
    first = None
    while first is None and triggers < 10:
        api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id="r1", irqfd_id="level4"))
        triggers += 1
        exit_ = run_vcpu(api, "r1")
        assert isinstance(exit_, IoExit) and exit_.port == DONE_PORT, exit_
        try:
            first = events.get(timeout=EVENT_WAIT)
        except queue.Empty:
            continue
    assert isinstance(first, pb.IrqfdResample), first
    assert (first.irqfd_id, first.count) == ("level4", 1)

    deadline = time.monotonic() + 10
    while True:
        (listed,) = api.interrupts.ListIrqfds(pb.ListIrqfdsRequest(vm_id="r1")).irqfds
        if listed.resamples == triggers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (listed.irqfd_id, listed.triggers, listed.resamples) == ("level4", triggers,
                                                                     triggers)

    stream.cancel()  # type: ignore[attr-defined]
    reader.join(timeout=10)
    assert not reader.is_alive()
    api.assert_healthy()


def test_resample_irqfds_share_a_gsi_and_each_is_told_of_the_ack(api: RunningDaemon) -> None:
    """Several resample irqfds on one GSI (a shared level-triggered line), as KVM allows:
    they share the GSI's one resampler, and the guest's acknowledgement signals every one
    of them (each device behind the line re-checks whether it still asserts it)."""
    api.create_vm("r2", irqchip=True)
    api.add_memory("r2", 0, RAM_SIZE)
    api.write("r2", CODE_ADDR, pic_interrupt_program())
    api.write("r2", HANDLER_ADDR, handler_program())
    addr, entry = ivt_entry(PIC_VECTOR_BASE + PIC_IRQ, HANDLER_ADDR)
    api.write("r2", addr, entry)
    api.create_vcpu("r2")
    setup_real_mode(api, "r2")
    for irqfd_id in ("dev-a", "dev-b"):
        irqfd = api.interrupts.RegisterIrqfd(pb.RegisterIrqfdRequest(
            vm_id="r2", irqfd_id=irqfd_id, gsi=PIC_IRQ, resample=True))
        assert (irqfd.gsi, irqfd.resample) == (PIC_IRQ, True)

    exit_ = run_vcpu(api, "r2")
    assert isinstance(exit_, IoExit) and exit_.port == IOEVENT_PORT, exit_  # PIC programmed
    api.interrupts.TriggerIrqfd(pb.TriggerIrqfdRequest(vm_id="r2", irqfd_id="dev-a"))
    exit_ = run_vcpu(api, "r2")
    assert isinstance(exit_, IoExit) and exit_.port == DONE_PORT, exit_  # interrupt taken

    deadline = time.monotonic() + 10
    while True:
        listed = {i.irqfd_id: i for i in api.interrupts.ListIrqfds(
            pb.ListIrqfdsRequest(vm_id="r2")).irqfds}
        if all(i.resamples for i in listed.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert {k: (i.triggers, i.resamples) for k, i in listed.items()} == {
        "dev-a": (1, 1), "dev-b": (0, 1)}
    # Either one can go; the other keeps the line's resampler.
    api.interrupts.UnregisterIrqfd(pb.UnregisterIrqfdRequest(vm_id="r2", irqfd_id="dev-a"))
    assert [i.irqfd_id for i in api.interrupts.ListIrqfds(
        pb.ListIrqfdsRequest(vm_id="r2")).irqfds] == ["dev-b"]
    api.assert_healthy()
