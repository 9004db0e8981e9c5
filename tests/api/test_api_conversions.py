"""Proto <-> core conversions a client reads back: every VmOptions field a CreateVm sets
comes back from GetVm, each DirtyLogModes flag keeps its own field, and dirty-page runs are
split into chunks that keep to the byte limit asked for."""

from __future__ import annotations

from typing import Any

from api_support import RunningDaemon

from kvmd.api.convert import dirty_modes_to_pb, page_run_chunks
from kvmd.kvm import DirtyLogModes, pack_varints
from kvmd_proto import vmm_pb2 as pb


def test_every_vm_option_set_at_creation_comes_back(api: RunningDaemon) -> None:
    """CreateVm's options (strict_io among them) are what GetVm and ListVms report."""
    options = pb.VmOptions(irqchip=True, pit=True, tss_address=0xFFFB0000,
                           identity_map_address=0xFFFAF000, debug_exit_port=0x600,
                           strict_io=True, console_buffer_bytes=8192,
                           dirty_tracking="bitmap")
    created = api.vms.CreateVm(pb.CreateVmRequest(vm_id="opts", options=options))
    assert created.options == options
    assert api.vms.GetVm(pb.GetVmRequest(vm_id="opts")).options == options
    listed = api.vms.ListVms(pb.ListVmsRequest())
    assert [vm.options for vm in listed.vms if vm.vm_id == "opts"] == [options]
    api.vms.DeleteVm(pb.DeleteVmRequest(vm_id="opts"))


def test_dirty_log_modes_keep_each_flag_in_its_own_field() -> None:
    """GetInfo's dirty_log_modes: each kernel capability lands in its own field (a host
    offering all of them cannot tell two swapped flags apart)."""
    base: dict[str, Any] = {"bitmap": False, "manual_protect": False, "initially_set": False,
            "ring_max_bytes": 0, "ring_acq_rel": False}
    for flag in ("bitmap", "manual_protect", "initially_set", "ring_acq_rel"):
        msg = dirty_modes_to_pb(DirtyLogModes(**{**base, flag: True}))
        assert msg == pb.DirtyLogModes(**{flag: True}), flag
    assert dirty_modes_to_pb(DirtyLogModes(**{**base, "ring_max_bytes": 65536})) == \
        pb.DirtyLogModes(ring_max_bytes=65536)


def test_run_chunks_keep_to_their_byte_limit_with_multi_byte_varints() -> None:
    """page_run_chunks (GetDirtyLog's runs in parts): every part's packed runs take at most
    the limit, also where the first pages need three-byte varints, and no run is lost."""
    pages = 1 << 17
    bitmap = bytes([0x55]) * (pages // 8)   # every other page dirty: 65536 one-page runs
    for limit in (64, 1000, 4096):
        parts = page_run_chunks(bitmap, limit)
        assert sum(len(firsts) for firsts, _ in parts) == pages // 2
        for firsts, counts in parts:
            size = len(pack_varints(firsts)[0]) + len(pack_varints(counts)[0])
            assert size <= limit, (limit, size)
