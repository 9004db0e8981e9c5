"""Every dirty-tracking mode KVM offers carries a migration: the classic bitmap, manual
protect with KVM_CLEAR_DIRTY_LOG, the dirty ring; and a slot the caller set up without
dirty logging, which the migration logs for its own time only."""

from __future__ import annotations

import grpc
import pytest
from migration_support import Host, wait_for

from kvmd_proto import vmm_pb2 as pb


@pytest.mark.parametrize("mode", ["bitmap", "manual", "ring"])
def test_each_dirty_tracking_mode_migrates_a_busy_guest_intact(
        hosts: tuple[Host, Host], mode: str) -> None:
    a, b = hosts
    a.boot_working_set(mode, dirty_tracking=mode)
    a.node.start(mode)
    wait_for(lambda: a.passes(mode) > 20, 30, "passes")
    # Paced, so the first round lasts long enough (~150 ms) for the guest, on a loaded host,
    # to dirty pages during it: a round of a few ms may see none, and no dirty rate.
    progress = a.migrate(mode, b, bandwidth_bytes_per_second=32 << 20)
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    vm = b.vm(mode)
    assert vm.options.dirty_tracking == mode
    passes = b.passes(mode)
    wait_for(lambda: b.passes(mode) > passes + 20, 30, "passes on the target")
    vm = b.vm(mode)
    assert vm.state == "running" and not vm.HasField("exit_code"), vm
    # The dirty rate of the last round is the VM's (GetVm, metrics) on the source side.
    assert max(p.dirty_pages_per_second for p in progress) > 0


def test_a_slot_without_dirty_logging_is_logged_for_the_migration_only(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.boot_working_set("nolog", log_dirty=False)
    a.node.start("nolog")
    wait_for(lambda: a.passes("nolog") > 20, 30, "passes")
    a.migrate("nolog", b)
    regions = b.stubs.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="nolog"))
    assert [r.log_dirty for r in regions.regions] == [False]
    passes = b.passes("nolog")
    wait_for(lambda: b.passes("nolog") > passes + 20, 30, "passes on the target")
    vm = b.vm("nolog")
    assert vm.state == "running" and not vm.HasField("exit_code"), vm
    # ... and on a source whose migration failed, the slot is as the caller set it up.
    with pytest.raises(grpc.RpcError) as err:
        b.migrate("nolog", "127.0.0.1:1", token="t")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    regions = b.stubs.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="nolog"))
    assert [r.log_dirty for r in regions.regions] == [False]
    assert b.vm("nolog").migrating_to == ""
