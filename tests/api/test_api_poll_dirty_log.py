"""PollDirtyLog: GetDirtyLog's answer in one unary reply. The same pages as the stream, in
every form; reading resets the log; slots whose log might not fit one message are refused
before their log is read, so the pages stay for GetDirtyLog."""

from __future__ import annotations

import grpc
import pytest
from api_guest import (
    CODE_ADDR,
    DIRTY_PAGES_SLOT0,
    DIRTY_PAGES_SLOT1,
    RAM_SIZE,
    SLOT1_ADDR,
    SLOT1_SIZE,
    dirty_pages_program,
    run_vcpu,
    setup_real_mode,
)
from api_support import DaemonFactory, RunningDaemon

from kvmd.core.errors import Reason
from kvmd.kvm import HltExit
from kvmd_client import KvmdClient, ResourceExhaustedError
from kvmd_client.kvmd_client import runs_to_bitmap
from kvmd_proto import vmm_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
AUTO, BITMAP, RANGES = (pb.GetDirtyLogRequest.AUTO, pb.GetDirtyLogRequest.BITMAP,
                        pb.GetDirtyLogRequest.RANGES)


def poll(api: RunningDaemon, vm_id: str, slot: int, form: int = AUTO) -> pb.DirtyLogChunk:
    return api.memory.PollDirtyLog(pb.PollDirtyLogRequest(vm_id=vm_id, slot=slot,
                                                          form=form)).log


def pages_of(chunk: pb.DirtyLogChunk) -> set[int]:
    bitmap = chunk.bitmap or runs_to_bitmap(
        list(zip(chunk.run_first_pages, chunk.run_pages, strict=True)), chunk.total_pages)
    return {i for i in range(chunk.total_pages) if bitmap[i // 8] >> (i % 8) & 1}


def boot_dirtying_guest(api: RunningDaemon, vm_id: str, slot1_size: int = SLOT1_SIZE
                        ) -> tuple[int, int]:
    """The guest of test_api_guest that stores into known pages of two slots, run to its
    HLT; returns the two slots."""
    api.create_vm(vm_id)
    slot0 = api.add_memory(vm_id, 0, RAM_SIZE, log_dirty=True)
    slot1 = api.add_memory(vm_id, SLOT1_ADDR, slot1_size, log_dirty=True)
    api.write(vm_id, CODE_ADDR, dirty_pages_program())
    api.create_vcpu(vm_id)
    setup_real_mode(api, vm_id)
    assert isinstance(run_vcpu(api, vm_id), HltExit)
    return slot0.slot, slot1.slot


def test_poll_answers_the_guests_pages_in_one_chunk_and_resets_the_log(
        api: RunningDaemon) -> None:
    slot0, slot1 = boot_dirtying_guest(api, "p1")
    auto = poll(api, "p1", slot0)
    # A small slot: AUTO sends its bitmap, shorter than the runs.
    assert len(auto.bitmap) == RAM_SIZE // 4096 // 8 and not auto.run_first_pages
    assert pages_of(auto) == DIRTY_PAGES_SLOT0
    assert (auto.slot, auto.first_page, auto.last, auto.total_pages) == (
        slot0, 0, True, RAM_SIZE // 4096)
    assert auto.dirty_pages == auto.total_dirty_pages == len(DIRTY_PAGES_SLOT0)
    ranges = poll(api, "p1", slot1, RANGES)
    assert ranges.bitmap == b"" and len(ranges.run_first_pages) > 0
    assert pages_of(ranges) == DIRTY_PAGES_SLOT1
    assert ranges.total_dirty_pages == len(DIRTY_PAGES_SLOT1)
    # Reading reset both logs: a bitmap of zeros now, for either RPC.
    for slot, size in ((slot0, RAM_SIZE), (slot1, SLOT1_SIZE)):
        empty = poll(api, "p1", slot, BITMAP)
        assert empty.bitmap == bytes(size // 4096 // 8)
        assert empty.total_dirty_pages == 0 and empty.last
        assert api.dirty_log("p1", slot)[-1].total_dirty_pages == 0


def test_poll_bitmap_matches_the_stream(api: RunningDaemon) -> None:
    slot0, _ = boot_dirtying_guest(api, "p2")
    bitmap = poll(api, "p2", slot0, BITMAP)
    assert pages_of(bitmap) == DIRTY_PAGES_SLOT0
    assert bitmap.dirty_pages == bitmap.total_dirty_pages == len(DIRTY_PAGES_SLOT0)
    assert not bitmap.run_first_pages


def test_poll_bad_inputs(api: RunningDaemon) -> None:
    api.create_vm("p3")
    logged = api.add_memory("p3", 0, 0x10000, log_dirty=True)
    plain = api.add_memory("p3", 0x10000, 0x10000)
    api.assert_code(lambda: poll(api, "", 0), INVALID, reason=Reason.FIELD_REQUIRED,
                    field="vm_id")
    api.assert_code(lambda: poll(api, "nope", 0), NOT_FOUND, reason=Reason.VM_NOT_FOUND)
    api.assert_code(lambda: poll(api, "p3", 7), NOT_FOUND)
    api.assert_code(lambda: poll(api, "p3", plain.slot), INVALID,
                    reason=Reason.SLOT_NOT_LOGGED, field="slot")
    for form in (3, -1):
        api.assert_code(lambda f=form: poll(api, "p3", logged.slot, f), INVALID,  # type: ignore[misc]
                        reason=Reason.VALUE_UNKNOWN, field="form")
    assert poll(api, "p3", logged.slot).last


def test_a_log_too_big_for_one_message_is_refused_before_it_is_read(
        daemon_factory: DaemonFactory) -> None:
    # 256 KiB messages and a 1 GiB slot 1 (262,144 pages): its 32 KiB bitmap fits, but not
    # the worst case of its runs (a run at every other page, 512 KiB), so RANGES is refused
    # before the log is read, and the guest's pages are still there for the next read.
    api = daemon_factory(max_message_bytes=256 << 10)
    _, slot1 = boot_dirtying_guest(api, "p4", slot1_size=1 << 30)
    api.assert_code(lambda: poll(api, "p4", slot1, RANGES), EXHAUSTED,
                    reason=Reason.LIMIT_MESSAGE)
    kept = poll(api, "p4", slot1, AUTO)
    assert pages_of(kept) == DIRTY_PAGES_SLOT1
    assert kept.total_pages == 1 << 18 and kept.total_dirty_pages == len(DIRTY_PAGES_SLOT1)
    # A 4 GiB slot's bitmap (128 KiB) fits; an 8 GiB slot's does not, in any form.
    big = api.add_memory("p4", 1 << 32, 8 << 30, log_dirty=True)
    for form in (AUTO, BITMAP, RANGES):
        api.assert_code(lambda f=form: poll(api, "p4", big.slot, f), EXHAUSTED,  # type: ignore[misc]
                        reason=Reason.LIMIT_MESSAGE)
    # GetDirtyLog streams it (nothing dirty there).
    assert api.dirty_log("p4", big.slot)[-1].total_dirty_pages == 0


def test_the_client_streams_a_log_too_big_to_poll(daemon_factory: DaemonFactory) -> None:
    api = daemon_factory(max_message_bytes=256 << 10)
    _, slot1 = boot_dirtying_guest(api, "p5")
    big = api.add_memory("p5", 1 << 32, 8 << 30, log_dirty=True)
    with KvmdClient(api.address) as client:
        assert client.dirty_log("p5", big.slot).dirty_count == 0  # streamed
        assert client.poll_dirty_log("p5", slot1, "ranges").total_dirty_pages == len(
            DIRTY_PAGES_SLOT1)
        with pytest.raises(ResourceExhaustedError) as refused:
            client.poll_dirty_log("p5", big.slot)
        assert refused.value.reason == "LIMIT_MESSAGE"
        assert refused.value.metadata["limit"] == "max_message_bytes"


def test_an_unknown_form_is_refused_before_either_rpc_reads_the_log(api: RunningDaemon) -> None:
    slot0, _ = boot_dirtying_guest(api, "p6")
    api.assert_code(lambda: api.dirty_log("p6", slot0, form=9), INVALID,
                    reason=Reason.VALUE_UNKNOWN, field="form")
    api.assert_code(lambda: poll(api, "p6", slot0, 9), INVALID, reason=Reason.VALUE_UNKNOWN,
                    field="form")
    assert pages_of(poll(api, "p6", slot0)) == DIRTY_PAGES_SLOT0  # nothing was lost


def test_a_log_whose_bound_is_exactly_the_message_limit_is_polled(
        daemon_factory: DaemonFactory) -> None:
    """The refusal's edge: a slot whose whole answer can take exactly max_message_bytes is
    polled; a slot whose answer could take one byte more is refused LIMIT_MESSAGE."""
    gib_pages = (1 << 30) // 4096
    limit = gib_pages // 8 + 64  # a 1 GiB slot's bitmap and the chunk's other fields
    api = daemon_factory(max_message_bytes=limit)
    api.create_vm("edge")
    fits = api.add_memory("edge", 0, 1 << 30, log_dirty=True)
    over = api.add_memory("edge", 2 << 30, (1 << 30) + 8 * 4096, log_dirty=True)  # +1 byte
    api.assert_code(lambda: poll(api, "edge", over.slot, BITMAP), EXHAUSTED,
                    reason=Reason.LIMIT_MESSAGE)
    got = poll(api, "edge", fits.slot, BITMAP)
    assert (got.total_pages, got.total_dirty_pages) == (gib_pages, 0)
