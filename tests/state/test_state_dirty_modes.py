"""Dirty-page tracking in each mode KVM offers (bitmap, manual protect, dirty ring): the
same pages reported through GetDirtyLog, snapshots carrying them, logging toggled on a live
slot, and the dirty rate."""

from __future__ import annotations

import grpc
import pytest
from polling import wait_until
from state_guests import (
    COUNTER_SOURCE,
    DIRTY_LOOP_SOURCE,
    DIRTY_PAGES_SOURCE,
    DIRTY_PAGES_STORED,
)
from state_support import Node

from kvmd_proto import vmm_pb2 as pb

MODES = ["bitmap", "manual", "ring"]


def dirty_pages(node: Node, vm_id: str, slot: int = 0) -> tuple[list[int], list[pb.DirtyLogChunk]]:
    chunks = list(node.stubs.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id=vm_id,
                                                                      slot=slot)))
    pages: list[int] = []
    for c in chunks:
        for first, count in zip(c.run_first_pages, c.run_pages, strict=True):
            pages += range(first, first + count)
        bits = int.from_bytes(c.bitmap, "little")
        pages += [c.first_page + i for i in range(len(c.bitmap) * 8) if bits >> i & 1]
    return sorted(pages), chunks


def boot_mode(node: Node, vm_id: str, mode: str, source: str) -> None:
    node.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id, options=pb.VmOptions(
        dirty_tracking=mode)))
    node.stubs.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=0, size=16 << 20, log_dirty=True))
    vm = node.stubs.vms.GetVm(pb.GetVmRequest(vm_id=vm_id))
    assert vm.options.dirty_tracking == mode
    # boot() without creating the VM again: load code and the vCPU.
    from state_guests import CODE_ADDR, CODE_SEGMENT, STACK_TOP, assemble
    node.write(vm_id, CODE_ADDR, assemble(source))
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
    node.stubs.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0))
    sregs = node.stubs.vcpus.GetSregs(ref)
    sregs.cs.base, sregs.cs.selector = CODE_ADDR, CODE_SEGMENT
    node.stubs.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs))
    node.stubs.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0, rsp=STACK_TOP,
                                                                      rflags=2)))


def test_info_reports_the_modes(node: Node) -> None:
    modes = node.stubs.hypervisor.GetInfo(pb.GetInfoRequest()).dirty_log_modes
    assert modes.bitmap and modes.manual_protect and modes.ring_max_bytes > 0


@pytest.mark.parametrize("mode", MODES)
def test_guest_dirtied_pages_in_every_mode(node: Node, mode: str) -> None:
    boot_mode(node, "d", mode, DIRTY_PAGES_SOURCE)
    if mode == "manual":
        dirty_pages(node, "d")  # manual mode starts slots all-dirty: see them...
        node.stubs.memory.ClearDirtyLog(pb.ClearDirtyLogRequest(  # ...and clear them
            vm_id="d", slot=0, ranges=[pb.PageRange(first_page=0, pages=4096)]))
    else:
        dirty_pages(node, "d")  # the loading of the code is host writes: nothing
    node.start("d")
    wait_until(lambda: node.stubs.vms.GetVm(pb.GetVmRequest(vm_id="d")).vcpu_states[0]
               == "halted", 10, "the guest to finish its stores")
    pages, chunks = dirty_pages(node, "d")
    stack_and_code = [p for p in pages if p < 0x30]
    assert [p for p in pages if p >= 0x30] == DIRTY_PAGES_STORED, (mode, pages)
    assert len(stack_and_code) <= 2
    # 20 scattered pages of 4096: ranges are shorter than the 512-byte bitmap.
    assert chunks[0].run_first_pages and not chunks[0].bitmap
    assert chunks[-1].total_dirty_pages == len(pages)
    again, _ = dirty_pages(node, "d")
    if mode == "manual":  # reading does not reset in manual mode; clearing does
        assert again == pages
        node.stubs.memory.ClearDirtyLog(pb.ClearDirtyLogRequest(
            vm_id="d", slot=0, ranges=[pb.PageRange(first_page=0x30, pages=0x10)]))
        left, _ = dirty_pages(node, "d")
        assert left == [p for p in pages if not 0x30 <= p < 0x40]
    else:
        assert again == []
        with pytest.raises(grpc.RpcError) as err:
            node.stubs.memory.ClearDirtyLog(pb.ClearDirtyLogRequest(vm_id="d", slot=0))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
def test_diff_snapshots_carry_guest_writes_in_every_mode(node: Node, mode: str) -> None:
    boot_mode(node, "s", mode, DIRTY_PAGES_SOURCE)
    node.snapshot("s")
    node.start("s")
    wait_until(lambda: node.state("s") == "running" and node.stubs.vms.GetVm(
        pb.GetVmRequest(vm_id="s")).vcpu_states[0] == "halted", 10, "the stores")
    # GetDirtyLog in between does not take the pages away from the diff.
    dirty_pages(node, "s")
    _diff, info = node.snapshot("s", diff=True)
    assert info.memory_pages >= len(DIRTY_PAGES_STORED)
    node.restore("s2", node.snapshot("s")[0])
    assert node.read("s2", 0x30000, 4) == b"\xef\xbe\x00\x00"


def test_logging_toggled_on_a_live_slot(node: Node) -> None:
    node.boot("t", DIRTY_LOOP_SOURCE, log_dirty=False)
    node.start("t")
    region = node.stubs.memory.SetDirtyLogging(pb.SetDirtyLoggingRequest(
        vm_id="t", slot=0, enabled=True))
    assert region.log_dirty
    wait_until(lambda: len(dirty_pages(node, "t")[0]) >= 16, 10, "the loop's pages logged")
    node.stubs.memory.SetDirtyLogging(pb.SetDirtyLoggingRequest(vm_id="t", slot=0,
                                                                enabled=False))
    with pytest.raises(grpc.RpcError) as err:
        dirty_pages(node, "t")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # The memory is untouched by the toggles: the guest's counters keep rising.
    before = node.u32("t", 0x30000)
    node.wait_u32("t", 0x30000, before)


def test_dirty_rate(node: Node) -> None:
    node.boot("r", DIRTY_LOOP_SOURCE)
    with pytest.raises(grpc.RpcError) as err:
        node.stubs.memory.MeasureDirtyRate(pb.MeasureDirtyRateRequest(vm_id="r",
                                                                      duration_ms=99999))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    node.start("r")
    rate = node.stubs.memory.MeasureDirtyRate(pb.MeasureDirtyRateRequest(vm_id="r",
                                                                         duration_ms=300))
    assert rate.dirty_pages >= 16 and rate.dirty_pages_per_second > 0
    vm = node.stubs.vms.GetVm(pb.GetVmRequest(vm_id="r"))
    assert vm.dirty_pages_per_second == rate.dirty_pages_per_second
    assert vm.dirty_rate_unix_ms > 0
    node.boot("nolog", COUNTER_SOURCE, log_dirty=False)
    with pytest.raises(grpc.RpcError) as err:
        node.stubs.memory.MeasureDirtyRate(pb.MeasureDirtyRateRequest(vm_id="nolog"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]


def test_bad_modes(node: Node) -> None:
    for options, code in ((pb.VmOptions(dirty_tracking="rings"), "INVALID_ARGUMENT"),
                          (pb.VmOptions(dirty_ring_bytes=4096), "INVALID_ARGUMENT"),
                          (pb.VmOptions(dirty_tracking="manual", dirty_ring_bytes=4096),
                           "INVALID_ARGUMENT"),
                          (pb.VmOptions(dirty_tracking="ring", dirty_ring_bytes=1 << 30),
                           "INVALID_ARGUMENT"),
                          (pb.VmOptions(dirty_tracking="ring", dirty_ring_bytes=1000),
                           "INVALID_ARGUMENT")):
        with pytest.raises(grpc.RpcError) as err:
            node.stubs.vms.CreateVm(pb.CreateVmRequest(vm_id="bad", options=options))
        assert err.value.code().name == code, options  # type: ignore[attr-defined]
    assert node.vm_ids() == []


def test_ranges_form_is_chunked_like_bitmaps(node: Node) -> None:
    boot_mode(node, "f", "bitmap", DIRTY_PAGES_SOURCE)
    node.start("f")
    wait_until(lambda: node.stubs.vms.GetVm(pb.GetVmRequest(vm_id="f")).vcpu_states[0]
               == "halted", 10, "the stores")
    chunks = list(node.stubs.memory.GetDirtyLog(pb.GetDirtyLogRequest(
        vm_id="f", slot=0, chunk_size=8, form=pb.GetDirtyLogRequest.RANGES)))
    assert len(chunks) > 2 and all(not c.bitmap for c in chunks)
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    pages = [p for c in chunks
             for first, count in zip(c.run_first_pages, c.run_pages, strict=True)
             for p in range(first, first + count)]
    assert [p for p in pages if p >= 0x30] == DIRTY_PAGES_STORED
    assert chunks[-1].total_dirty_pages == len(pages) == sum(c.dirty_pages for c in chunks)
