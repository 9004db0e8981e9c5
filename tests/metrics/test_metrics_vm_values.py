"""KvmdCollector over a core Host (no daemon, no HTTP): per-VM values that only a VM with
more than one of something shows wrong when only the first is read (two vCPUs, two slots,
two crash kinds), and values held outside the Python counters (bytes still in the UART's
transmit ring, receive overruns counted in C). Each is checked against the core's own
figure."""

from __future__ import annotations

from guests import boot
from polling import wait_until

from kvmd.core.devices import COM1_BASE, CONSOLE_INPUT_LIMIT
from kvmd.core.host import Host
from kvmd.core.vm import ManagedVm, VmOptions
from kvmd.metrics import KvmdCollector

WAIT = 10.0
PIO_LOOP = bytes([0xE6, 0x80, 0xEB, 0xFC])  # out 0x80, al (unclaimed); jmp back
HLT_LOOP = bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp back
THR, MCR = COM1_BASE, COM1_BASE + 4
LOOPBACK = b"\x10"


def collect(host: Host) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in KvmdCollector(host).collect() for s in family.samples}


def vm_value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
             vm: str, **labels: str) -> float:
    return got[(name, tuple(sorted({"vm": vm, **labels}.items())))]


def per_vcpu(vm: ManagedVm, name: str) -> list[int]:
    """The kernel statistic `name` of each vCPU (a histogram: its total count)."""
    out = []
    for v in vm.vcpus():
        value = v.vcpu.stats().read()[name]
        out.append(sum(value) if isinstance(value, tuple) else int(value))
    return out


def test_vcpu_states_and_kernel_statistics_add_up_over_a_vms_vcpus(host: Host) -> None:
    """Two vCPUs halted in the kernel, then paused: kvmd_vcpus counts both, and the kernel's
    per-vCPU counters and histograms are the sums over both vCPUs."""
    vm = host.create_vm("halts", {}, VmOptions(irqchip=True))
    boot(vm, HLT_LOOP, vcpus=2)
    vm.vcpus()[1].set_mp_state(0)  # runnable, not waiting for a startup IPI
    vm.start()
    wait_until(lambda: all(per_vcpu(vm, "blocking")), WAIT, "both vCPUs halted in KVM")
    vm.pause()
    got = collect(host)
    assert got[("kvmd_vcpus", (("state", "paused"),))] == 2
    waits = per_vcpu(vm, "halt_wait_hist")
    assert min(waits) >= 1, waits
    assert vm_value(got, "kvmd_kvm_vcpu_halt_wait_hist_seconds_bucket", "halts",
                    le="+Inf") == sum(waits)
    exits = per_vcpu(vm, "halt_exits")
    assert vm_value(got, "kvmd_kvm_vcpu_halt_exits_total", "halts") == sum(exits)
    host.delete_vm("halts")


def test_unclaimed_accesses_add_up_over_a_vms_vcpus(host: Host) -> None:
    """kvmd_unclaimed_accesses{space="pio"} is the sum of every vCPU's unclaimed accesses."""
    vm = host.create_vm("pio", {}, VmOptions())
    boot(vm, PIO_LOOP, vcpus=2)
    vm.start()
    wait_until(lambda: all(v.exit_counts()["unclaimed_pio"] for v in vm.vcpus()), WAIT,
               "unclaimed accesses from both vCPUs")
    vm.pause()
    counts = [v.exit_counts()["unclaimed_pio"] for v in vm.vcpus()]
    got = collect(host)
    assert vm_value(got, "kvmd_unclaimed_accesses_total", "pio", space="pio") == sum(counts)
    assert vm_value(got, "kvmd_unclaimed_accesses_total", "pio", space="mmio") == 0
    host.delete_vm("pio")


def test_guest_memory_counts_every_slot(host: Host) -> None:
    """kvmd_guest_memory_bytes is the size of all the VM's slots, not of the first."""
    vm = host.create_vm("slots", {}, VmOptions())
    vm.add_memory_region(0, 0x10000, False, False)
    vm.add_memory_region(0x100000, 0x30000, False, False)
    got = collect(host)
    assert vm_value(got, "kvmd_guest_memory_bytes", "slots") == 0x40000
    assert vm_value(got, "kvmd_memory_slots", "slots") == 2
    host.delete_vm("slots")


def test_console_bytes_count_what_the_uart_has_not_handed_over_yet(host: Host) -> None:
    """Bytes the guest wrote that are still in the UART's transmit ring (no drain since)
    are counted by kvmd_console_bytes{direction="out"}: the scrape drains the ring first."""
    vm = host.create_vm("ring", {}, VmOptions())
    pump = host.shared.console_pump
    assert pump is not None
    pump.remove(vm._console_ready)  # nothing drains the ring behind the test's back
    for b in b"hello":
        vm.uart.write(THR, bytes([b]))
    assert vm.console.bytes_out == 0  # still in the ring
    got = collect(host)
    assert vm_value(got, "kvmd_console_bytes_total", "ring", direction="out") == 5
    assert vm.console.backlog() == b"hello"
    host.delete_vm("ring")


def test_receive_overruns_are_the_uarts_own_count(host: Host) -> None:
    """kvmd_console_rx_overruns counts the bytes a looped-back UART dropped once its receive
    FIFO was full."""
    vm = host.create_vm("loop", {}, VmOptions())
    assert vm_value(collect(host), "kvmd_console_rx_overruns_total", "loop") == 0
    vm.uart.write(MCR, LOOPBACK)
    for _ in range(CONSOLE_INPUT_LIMIT + 7):
        vm.uart.write(THR, b"x")
    assert vm.uart.rx_overruns == 7
    assert vm_value(collect(host), "kvmd_console_rx_overruns_total", "loop") == 7
    host.delete_vm("loop")


def test_every_crash_kind_is_listed(host: Host) -> None:
    """kvmd_vm_crashes has one series per kind of crash reason, each with its count."""
    host.shared.count_crash("unclaimed port write at 0x1234")
    host.shared.count_crash("internal_error: emulation")
    host.shared.count_crash("unclaimed mmio read at 0x10000")
    got = collect(host)
    crashes = {dict(labels)["reason"]: value for (name, labels), value in got.items()
               if name == "kvmd_vm_crashes_total"}
    assert crashes == {"internal_error": 1, "unclaimed": 2}


def test_migration_metrics_follow_what_the_core_recorded(host: Host) -> None:
    """A failed incoming migration (its restorer records "error") is counted under
    result="failed" like an outgoing one; the completed migrations' rounds add up, their
    downtimes fill the histogram's sum and count; a VM migrating now is in progress."""
    host.shared.operations.record("migration_in", "live", "error", 100, 0.5)
    host.shared.operations.record("migration_out", "live", "failed", 0, 0.1)
    host.shared.migration.record(0.25, 3)
    host.shared.migration.record(0.5, 4)
    vm = host.create_vm("leaving", {}, VmOptions())
    vm.migrating_to = "127.0.0.1:7000"  # what the core sets while pre-copy runs
    got = collect(host)
    migrations = {(dict(labels)["direction"], dict(labels)["result"]): value
                  for (name, labels), value in got.items() if name == "kvmd_migrations_total"}
    assert migrations[("incoming", "failed")] == 1 and migrations[("outgoing", "failed")] == 1
    assert sum(migrations.values()) == 2
    assert set(migrations) == {(d, r) for d in ("outgoing", "incoming")
                               for r in ("ok", "cancelled", "failed", "unknown")}
    assert got[("kvmd_migration_rounds_total", ())] == 7
    assert got[("kvmd_migration_downtime_seconds_sum", ())] == 0.75
    assert got[("kvmd_migration_downtime_seconds_count", ())] == 2
    assert got[("kvmd_migrations_in_progress", ())] == 1
    vm.migrating_to = ""
    assert collect(host)[("kvmd_migrations_in_progress", ())] == 0
    host.delete_vm("leaving")
