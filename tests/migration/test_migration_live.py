"""Live migration between two kvmd processes over TCP loopback with mutual TLS, on real
/dev/kvm: the VM's output is one contiguous sequence across the move, its memory arrives
intact (the guest checks every page of its working set), it is gone from the source, and
interrupts keep coming on the target."""

from __future__ import annotations

import os
import time

import grpc
import pytest
from migration_support import (
    BAD_EXIT_CODE,
    GUEST_MEM,
    STATIC_BASE,
    STATIC_SIZE,
    ConsoleFollower,
    Host,
    HostPair,
    wait_for,
)
from state_guests import COUNTER_ADDR, PIT_SOURCE, counter_numbers

from kvmd_proto import vmm_pb2 as pb


def test_a_guest_rewriting_4_mib_migrates_with_contiguous_output_and_intact_memory(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    static = os.urandom(STATIC_SIZE)
    a.boot_working_set("ws", static=static)
    a.node.start("ws")
    wait_for(lambda: a.passes("ws") > 20, 30, "20 passes on the source")
    source_console = ConsoleFollower(a, "ws")

    progress = a.migrate("ws", b)

    final = progress[-1]
    assert final.phase == pb.MigrationProgress.COMPLETED
    assert final.target_vm_id == "ws"
    assert 0 < final.downtime_ms < 5000
    assert final.bytes_sent >= 4 << 20  # the working set went at least once
    phases = [p.phase for p in progress]
    assert pb.MigrationProgress.COPYING in phases and pb.MigrationProgress.SWITCHING_OVER in \
        phases
    # Gone from the source: its console stream ended with the VM.
    assert a.vm_ids() == []
    before = counter_numbers(source_console.join())
    # On the target: running, the guest's own check of every page still passing.
    moved = b.vm("ws")
    assert moved.state == "running" and not moved.HasField("exit_code"), moved
    assert moved.migrating_to == ""
    start = b.passes("ws")
    wait_for(lambda: b.passes("ws") > start + 20, 30, "20 more passes on the target")
    vm = b.vm("ws")
    assert vm.state == "running" and not vm.HasField("exit_code"), \
        f"the guest found a page it did not write (exit code {BAD_EXIT_CODE:#x}): {vm}"
    # One sequence: the source's output, then the target's, nothing lost or repeated.
    after = counter_numbers(b.node.console("ws"))
    assert before and before == list(range(1, len(before) + 1))
    assert after == list(range(after[0], after[0] + len(after)))
    assert after[0] <= before[-1] < after[-1]
    # Memory the guest never touched arrived byte for byte.
    assert b.node.read("ws", STATIC_BASE, STATIC_SIZE) == static


def test_an_irqchip_guest_keeps_ticking_after_migration(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.node.boot("pit", PIT_SOURCE, irqchip=True, pit=True)
    a.node.start("pit")
    a.node.wait_u32("pit", COUNTER_ADDR, 50)
    a.migrate("pit", b)
    ticks = b.node.u32("pit", COUNTER_ADDR)
    b.node.wait_u32("pit", COUNTER_ADDR, ticks + 100)
    assert b.vm("pit").state == "running"
    assert a.vm_ids() == []


def test_a_paused_vm_arrives_paused_and_a_created_one_created(
        hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.boot_working_set("p")
    a.node.start("p")
    wait_for(lambda: a.passes("p") > 5, 30, "passes")
    a.stubs.vms.PauseVm(pb.VmRef(vm_id="p"))
    passes = a.passes("p")
    a.migrate("p", b)
    assert b.vm("p").state == "paused"
    time.sleep(0.2)
    assert b.passes("p") == passes
    b.stubs.vms.ResumeVm(pb.VmRef(vm_id="p"))
    wait_for(lambda: b.passes("p") > passes + 5, 30, "passes after resume")

    a.boot_working_set("c")
    a.migrate("c", b)
    assert b.vm("c").state == "created"
    b.node.start("c")
    wait_for(lambda: b.passes("c") > 5, 30, "passes of the VM started on the target")


def test_files_mapped_into_the_vm_travel_by_reference(
        hosts: tuple[Host, Host], host_pair: HostPair) -> None:
    a, b = hosts
    images = host_pair.images
    (images / "rom.img").write_bytes(b"\x40" * (16 * 4096))
    (images / "data.img").write_bytes(b"\x11" * (64 * 4096))
    a.boot_working_set("files")
    s = a.stubs
    s.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="files", slot=0, offset=STATIC_BASE, size=16 * 4096,
        file=pb.MemoryFile(name="rom.img")))
    data = s.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id="files", guest_addr=GUEST_MEM, size=64 * 4096,
        file=pb.MemoryFile(name="data.img")))
    a.node.write("files", GUEST_MEM, b"the VM wrote this")
    a.node.start("files")
    wait_for(lambda: a.passes("files") > 10, 30, "passes")
    progress = a.migrate("files", b)
    assert progress[-1].phase == pb.MigrationProgress.COMPLETED
    # The files' pages did not travel (only the guest's own: about its 4 MiB working set).
    assert progress[-1].bytes_sent < 12 << 20
    assert b.node.read("files", STATIC_BASE, 16 * 4096) == b"\x40" * (16 * 4096)
    assert b.node.read("files", GUEST_MEM, 17) == b"the VM wrote this"
    assert (images / "data.img").read_bytes()[:17] == b"the VM wrote this"
    passes = b.passes("files")
    wait_for(lambda: b.passes("files") > passes + 10, 30, "passes on the target")
    regions = b.stubs.memory.ListMemoryRegions(pb.ListMemoryRegionsRequest(vm_id="files"))
    assert [r.file.name for r in regions.regions] == ["", "data.img"]
    assert [m.file.name for m in regions.regions[0].mappings] == ["rom.img"]
    assert data.slot == 1


def test_a_target_without_the_file_refuses_and_the_vm_stays(
        hosts: tuple[Host, Host], host_pair: HostPair) -> None:
    a, b = hosts
    images = host_pair.images
    (images / "gone.img").write_bytes(b"\x40" * (16 * 4096))
    a.boot_working_set("nofile")
    a.stubs.memory.MapGuestMemory(pb.MapGuestMemoryRequest(
        vm_id="nofile", slot=0, offset=STATIC_BASE, size=16 * 4096,
        file=pb.MemoryFile(name="gone.img")))
    a.node.start("nofile")
    (images / "gone.img").unlink()  # still mapped here; not there for the target
    with pytest.raises(grpc.RpcError) as err:
        a.migrate("nofile", b)
    assert "gone.img" in err.value.details()
    vm = a.vm("nofile")
    assert vm.state == "running" and vm.migrating_to == ""
    assert b.vm_ids() == []
