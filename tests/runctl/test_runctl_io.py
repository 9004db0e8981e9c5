"""Exit dispatch: unclaimed PIO/MMIO, strict IO, exit accounting, and the kvm-ioctls-style
end-to-end scenario (UART OUT, claimed IN, claimed MMIO write and read, one dirty page, HLT)."""

from __future__ import annotations

import struct

from guests import IN_AL_DX, mov_ax, mov_ds_ax, mov_dx
from guests_runctl import (
    CLAIM_PORT,
    DEBUG_EXIT_PORT,
    DIRTY_PAGE,
    DIRTY_SLOT_ADDR,
    DIRTY_SLOT_PAGES,
    MMIO_BASE,
    OUT_SPAM_PORT,
    STRING_IN,
    STRING_IN32,
    STRING_SRC,
    UNCLAIMED_PORT,
    debug_exit,
    debug_exit_ax,
    outs_then_hlt,
    port_loop,
    print_program,
    scenario_program,
    string_io_program,
    unclaimed_in_program,
)
from polling import wait_until
from runctl_api import Api, fd_count, mmio, pio, vcpu_threads

from kvmd_proto import vmm_pb2 as pb


def unclaimed_mmio_program() -> bytes:
    """MMIO write of a byte, then a 16-bit MMIO read into AX; debug-exit with AX."""
    return b"".join([
        mov_ax(MMIO_BASE >> 4), mov_ds_ax(),                # mov ax, 0x1000; mov ds, ax
        bytes([0xC6, 0x06]), struct.pack("<H", 0), b"\x11",  # mov byte [0], 0x11
        bytes([0xA1]), struct.pack("<H", 0x10),             # mov ax, [0x10]
        debug_exit_ax(),
    ])


def test_unclaimed_pio_read_returns_all_ones_and_is_counted(api: Api) -> None:
    api.boot("unclaimed", unclaimed_in_program(UNCLAIMED_PORT))
    watch = api.watch("unclaimed")
    api.start("unclaimed")
    assert watch.wait_for("debug_exit").exit_code == 0xFFFF  # `in ax, 0x60` read 0xffff
    stats = api.stats("unclaimed")
    assert stats.total["unclaimed_pio"] == 1
    assert stats.total["io_in"] == 1
    assert stats.vcpus[0].counts["unclaimed_pio"] == 1
    api.delete("unclaimed")


def test_the_debug_exit_port_reads_all_ones(api: Api) -> None:
    """`in ax` from the debug-exit port (write-only, as QEMU's isa-debug-exit) reads 0xffff
    and goes on: the guest then debug-exits with what it read."""
    api.boot("dbgread", unclaimed_in_program(DEBUG_EXIT_PORT))
    watch = api.watch("dbgread")
    api.start("dbgread")
    assert watch.wait_for("debug_exit").exit_code == 0xFFFF
    assert api.stats("dbgread").total["unclaimed_pio"] == 0  # a device answered it
    api.delete("dbgread")


def test_unclaimed_mmio_reads_all_ones_writes_dropped_and_counted(api: Api) -> None:
    api.boot("unclaimed-mmio", unclaimed_mmio_program())
    watch = api.watch("unclaimed-mmio")
    api.start("unclaimed-mmio")
    assert watch.wait_for("debug_exit").exit_code == 0xFFFF
    stats = api.stats("unclaimed-mmio")
    assert stats.total["unclaimed_mmio"] == 2
    assert stats.total["mmio_write"] == 1 and stats.total["mmio_read"] == 1
    api.delete("unclaimed-mmio")


def test_strict_io_vm_crashes_on_an_unclaimed_port(api: Api) -> None:
    code = print_program(b"ok", 0)[: -len(debug_exit(0))] + mov_dx(UNCLAIMED_PORT) + IN_AL_DX
    api.boot("strict", code, strict_io=True)
    watch = api.watch("strict")
    api.start("strict")
    event = watch.wait_for("crashed")
    assert "unclaimed port read" in event.reason and "0x60" in event.reason
    assert event.HasField("regs")
    vm = api.get_vm("strict")
    assert vm.state == "crashed" and "unclaimed port" in vm.reason
    assert vm.options.strict_io
    # The UART still worked before the crash (devices are claimed, not unclaimed).
    backlog = next(iter(api.vms.StreamConsole(pb.StreamConsoleRequest(
        vm_id="strict", backlog=True), timeout=10)))
    assert backlog.data == b"ok"
    api.assert_healthy()
    api.delete("strict")


def test_strict_io_vm_crashes_on_unclaimed_mmio(api: Api) -> None:
    api.boot("strict-mmio", unclaimed_mmio_program(), strict_io=True)
    watch = api.watch("strict-mmio")
    api.start("strict-mmio")
    assert "unclaimed MMIO write" in watch.wait_for("crashed").reason
    api.assert_healthy()
    api.delete("strict-mmio")


def test_strict_io_vm_still_debug_exits(api: Api) -> None:
    api.boot("strict-ok", print_program(b"", 3), strict_io=True)
    watch = api.watch("strict-ok")
    api.start("strict-ok")
    assert watch.wait_for("debug_exit").exit_code == 3
    api.delete("strict-ok")


def test_exit_stats_count_outs_per_vcpu_and_total(api: Api) -> None:
    n0, n1 = 100, 37
    api.boot("stats", {0x1000: outs_then_hlt(n0), 0x1100: outs_then_hlt(n1)},
             entries={0: 0x1000, 1: 0x1100})
    fresh = api.stats("stats")
    assert set(fresh.vcpus) == {0, 1}
    assert all(v == 0 for v in fresh.total.values())
    for name in ("io", "io_in", "io_out", "mmio", "mmio_read", "mmio_write", "hlt",
                 "shutdown", "unclaimed_pio", "unclaimed_mmio"):
        assert name in fresh.total, f"{name} missing from a fresh VM's exit stats"
    api.start("stats")
    api.wait_vcpu_state("stats", "halted", 0)
    api.wait_vcpu_state("stats", "halted", 1)
    stats = api.stats("stats")
    c0, c1 = stats.vcpus[0].counts, stats.vcpus[1].counts
    assert (c0["io_out"], c1["io_out"]) == (n0, n1)
    assert (c0["io"], c1["io"]) == (n0, n1)
    assert (c0["io_in"], c1["io_in"]) == (0, 0)
    assert (c0["unclaimed_pio"], c1["unclaimed_pio"]) == (n0, n1)
    assert (c0["hlt"], c1["hlt"]) == (1, 1)
    assert stats.total["io_out"] == n0 + n1
    for name, total in stats.total.items():
        assert total == c0[name] + c1[name], name
    assert stats.vm_id == "stats"
    api.stop("stats")
    api.delete("stats")


def test_exit_stats_count_every_out_including_devices(api: Api) -> None:
    api.boot("outs", print_program(b"abc", 5))
    watch = api.watch("outs")
    api.start("outs")
    watch.wait_for("debug_exit")
    stats = api.stats("outs")
    assert stats.total["io_out"] == 4  # three to the UART, one to the debug-exit port
    assert stats.total["unclaimed_pio"] == 0
    api.delete("outs")


def test_kvm_ioctls_style_scenario_end_to_end(api: Api) -> None:
    vm_id = "scenario"
    api.boot(vm_id, scenario_program())
    dirty = api.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=DIRTY_SLOT_ADDR, size=DIRTY_SLOT_PAGES * 0x1000,
        log_dirty=True))
    seen: list[pb.ExitRequest] = []

    def answer(exit_: pb.ExitRequest) -> bytes:
        if exit_.is_write:
            return b""
        return b"\x5a" if exit_.space == pb.PIO else b"\x77"

    handler = api.handler(vm_id, [pio(CLAIM_PORT), mmio(MMIO_BASE, 0x1000)])
    claimed = handler.claimed()
    assert claimed.handler_id and len(claimed.ranges) == 2
    handler.serve(answer, seen)
    watch = api.watch(vm_id)
    api.start(vm_id)
    watch.wait_for("halted")
    api.wait_vcpu_state(vm_id, "halted")

    # The claimed exits, in program order, with their data.
    assert [(e.space, e.address, e.size, e.is_write, e.data) for e in seen] == [
        (pb.PIO, CLAIM_PORT, 1, False, b""),
        (pb.MMIO, MMIO_BASE, 1, True, b"\x5a"),      # the IN's value, written to MMIO
        (pb.MMIO, MMIO_BASE + 8, 1, False, b""),
    ]
    assert all(e.vcpu_id == 0 for e in seen)
    assert len({e.exit_id for e in seen}) == 3
    # The OUT reached the UART.
    console = next(iter(api.vms.StreamConsole(pb.StreamConsoleRequest(
        vm_id=vm_id, backlog=True), timeout=10)))
    assert console.data == b"K"
    # The replies reached the guest's registers.
    regs = api.regs(vm_id)
    assert regs.rbx & 0xFF == 0x5A and regs.rcx & 0xFF == 0x77
    assert regs.rip == 0x1000 + len(scenario_program())  # just past the HLT
    # Exactly one page of the dirty-logged slot is dirty: the one the guest stored to.
    chunks = list(api.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id=vm_id,
                                                                slot=dirty.slot)))
    bitmap = b"".join(c.bitmap for c in chunks)
    assert int.from_bytes(bitmap, "little") == 1 << DIRTY_PAGE
    assert chunks[-1].last and chunks[-1].total_dirty_pages == 1
    assert api.read(vm_id, DIRTY_SLOT_ADDR + DIRTY_PAGE * 0x1000 + 0x10, 1) == b"\x77"
    stats = api.stats(vm_id).total
    assert (stats["io_out"], stats["io_in"], stats["mmio_write"], stats["mmio_read"],
            stats["hlt"]) == (1, 1, 1, 1, 1)
    assert stats["unclaimed_pio"] == 0 and stats["unclaimed_mmio"] == 0
    api.stop(vm_id)
    handler.close()
    handler.wait_ended()
    api.delete(vm_id)


def test_string_io_to_the_uart_and_from_unclaimed_and_claimed_ports(api: Api) -> None:
    text = b"rep outsb!"
    api.boot("strio", {0x1000: string_io_program(len(text), UNCLAIMED_PORT),
                       STRING_SRC: text})
    watch = api.watch("strio")
    api.start("strio")
    assert watch.wait_for("debug_exit").exit_code == 0x11
    console = next(iter(api.vms.StreamConsole(pb.StreamConsoleRequest(
        vm_id="strio", backlog=True), timeout=10)))
    assert console.data == text
    assert api.read("strio", STRING_IN, 5) == b"\xff" * 4 + b"\0"
    assert api.read("strio", STRING_IN32, 13) == b"\xff" * 12 + b"\0"
    api.delete("strio")

    # The same reads from a claimed port: the handler supplies every byte.
    api.boot("strio-remote", {0x1000: string_io_program(len(text), CLAIM_PORT),
                              STRING_SRC: text})
    handler = api.handler("strio-remote", [pio(CLAIM_PORT)])
    handler.claimed()
    seen: list[pb.ExitRequest] = []
    handler.serve(lambda e: bytes(range(1, e.size * e.count + 1)), seen)
    watch = api.watch("strio-remote")
    api.start("strio-remote")
    assert watch.wait_for("debug_exit").exit_code == 0x11
    # One exit per string instruction: its element size and count (rep insb: 1 x 4).
    assert sum(e.size * e.count for e in seen) == 4 + 12 and not any(e.is_write for e in seen)
    assert [(e.size, e.count) for e in seen] == [(1, 4), (4, 3)]
    got = api.read("strio-remote", STRING_IN, 4) + api.read("strio-remote", STRING_IN32, 12)
    expected = b"".join(bytes(range(1, e.size * e.count + 1)) for e in seen)
    assert got == expected
    handler.close()
    api.delete("strio-remote")


def test_start_stop_cycles_leak_no_threads_or_fds(api: Api) -> None:
    api.boot("cycles", port_loop(OUT_SPAM_PORT))
    api.start("cycles")
    api.stop("cycles")
    fds = fd_count()
    for _ in range(20):
        api.start("cycles")
        api.pause("cycles")
        api.resume("cycles")
        api.stop("cycles")
    assert api.get_vm("cycles").state == "stopped"
    assert not [t for t in vcpu_threads() if t.name == "vcpu-cycles-0"]
    wait_until(lambda: fd_count() <= fds, 10, "fds to settle")
    api.delete("cycles")
