"""Exit counters, kernel statistics and daemon state on /metrics, checked against the
daemon's own view (GetExitStats, GetDirtyLog, WriteConsole) on guests doing PIO exits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from metrics_support import (
    RAM_SIZE,
    RPC_TIMEOUT,
    MetricsDaemon,
    Scrape,
    wait_for,
)

from kvmd.kvm import StatDescriptor
from kvmd.kvm._names import X86_EXIT_REASONS
from kvmd.metrics import _hist_buckets
from kvmd_proto import vmm_pb2 as pb

# The kernel statistics the issue names (KVM_GET_STATS_FD, per vCPU, summed per VM).
KERNEL_VCPU_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits",
                        "insn_emulation", "signal_exits")


def expected_reasons() -> set[str]:
    """Every x86 exit reason the binding decodes, io and mmio split by direction."""
    names = {r.removeprefix("KVM_EXIT_").lower() for r in X86_EXIT_REASONS}
    return (names - {"io", "mmio"}) | {"io_in", "io_out", "mmio_read", "mmio_write"}


def exits_of(scrape: Scrape, vm_id: str) -> dict[str, float]:
    """reason -> count of kvmd_vcpu_exits_total for one VM (no vcpu label)."""
    out: dict[str, float] = {}
    for s in scrape.find("kvmd_vcpu_exits_total", vm=vm_id):
        assert set(s.labels) == {"vm", "reason"}, s.labels
        assert s.labels["reason"] not in out, f"duplicate series {s}"
        out[s.labels["reason"]] = float(s.value)
    return out


def test_every_exit_reason_is_exported_as_zero_from_vm_creation(mkvmd: MetricsDaemon) -> None:
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="fresh"), timeout=RPC_TIMEOUT)
    s = mkvmd.scrape()
    at_creation = exits_of(s, "fresh")
    assert set(at_creation) >= expected_reasons(), expected_reasons() - set(at_creation)
    assert not {"io", "mmio"} & set(at_creation), "io/mmio must be split by direction"
    # Unclaimed accesses are io/mmio exits already: a reason of their own would count them
    # twice in a sum over reasons (they have kvmd_unclaimed_accesses_total).
    assert not {"unclaimed_pio", "unclaimed_mmio"} & set(at_creation)
    assert all(v == 0 for v in at_creation.values()), at_creation
    for space in ("pio", "mmio"):
        assert s.value("kvmd_unclaimed_accesses_total", vm="fresh", space=space) == 0
    for direction in ("in", "out"):
        assert s.value("kvmd_console_bytes_total", vm="fresh", direction=direction) == 0
    assert s.value("kvmd_guest_memory_bytes", vm="fresh") == 0
    assert s.value("kvmd_memory_slots", vm="fresh") == 0
    assert s.value("kvmd_dirty_pages_total", vm="fresh") == 0
    assert s.value("kvmd_vm_state", vm="fresh", state="created") == 1

    # The same series, still zero, once the VM has a (never run) vCPU ...
    mkvmd.create_guest("fresh-vcpu")
    with_vcpu = exits_of(mkvmd.scrape(), "fresh-vcpu")
    assert with_vcpu == at_creation
    # ... and the same set of reasons after the guest ran: no series appears or vanishes.
    mkvmd.start_pio_guest("ran")
    mkvmd.pause("ran")
    after_run = exits_of(mkvmd.scrape(), "ran")
    assert set(after_run) == set(at_creation)
    assert after_run["io_out"] > 0
    for vm_id in ("fresh", "fresh-vcpu", "ran"):
        mkvmd.delete(vm_id)


def test_series_of_a_deleted_vm_disappear(mkvmd: MetricsDaemon) -> None:
    mkvmd.start_pio_guest("doomed")
    mkvmd.start_pio_guest("kept")
    before = mkvmd.scrape()
    doomed_names = {s.name for s in before.samples() if s.labels.get("vm") == "doomed"}
    # Exit counters, daemon state and the kernel's statistics all carry the VM.
    assert {"kvmd_vcpu_exits_total", "kvmd_vm_state", "kvmd_guest_memory_bytes",
            "kvmd_kvm_vcpu_exits_total"} <= doomed_names, doomed_names
    assert any(n.startswith("kvmd_kvm_vm_") for n in doomed_names), doomed_names
    assert before.value("kvmd_vms") == 2

    mkvmd.delete("doomed")
    after = mkvmd.scrape()
    left = [s for s in after.samples() if s.labels.get("vm") == "doomed"]
    assert left == []
    assert after.value("kvmd_vms") == 1
    kept = {s.name for s in after.samples() if s.labels.get("vm") == "kept"}
    assert kept == {n for n in doomed_names}, "the other VM's series must stay"
    mkvmd.delete("kept")
    assert not [s for s in mkvmd.scrape().samples() if "vm" in s.labels]


def test_get_exit_stats_and_metrics_agree(mkvmd: MetricsDaemon) -> None:
    mkvmd.start_pio_guest("agree", min_exits=1000)
    mkvmd.pause("agree")  # counts are stable from here on
    stats = mkvmd.exit_stats("agree")
    s = mkvmd.scrape()
    exported = exits_of(s, "agree")

    assert stats.total["io_out"] >= 1000
    assert exported["io_out"] == stats.total["io_out"]
    assert exported["io_in"] == stats.total["io_in"] == 0
    assert exported["hlt"] == stats.total["hlt"]
    for reason, value in exported.items():
        assert value == stats.total.get(reason, 0), reason
    # Unclaimed port writes are counted separately, and every one of them was an io_out.
    assert s.value("kvmd_unclaimed_accesses_total", vm="agree", space="pio") == \
        stats.total["unclaimed_pio"] == stats.total["io_out"]
    # The per-vCPU view sums to the total.
    assert sum(c.counts["io_out"] for c in stats.vcpus.values()) == stats.total["io_out"]
    # A paused VM's counters do not move between scrapes.
    assert exits_of(mkvmd.scrape(), "agree") == exported
    mkvmd.delete("agree")


def test_vcpu_label_flag_splits_exits_per_vcpu(
        metrics_daemon: Callable[..., MetricsDaemon]) -> None:
    d = metrics_daemon(metrics_vcpu_label=True)
    d.start_pio_guest("two", vcpus=2)
    wait_for(lambda: all(c.counts["io_out"] > 0 for c in d.exit_stats("two").vcpus.values()),
             "both vCPUs exiting")
    d.pause("two")
    stats = d.exit_stats("two")
    s = d.scrape()
    series = s.find("kvmd_vcpu_exits_total", vm="two")
    assert series and all(set(x.labels) == {"vm", "reason", "vcpu"} for x in series)
    by_vcpu: dict[str, dict[str, float]] = {}
    for x in series:
        by_vcpu.setdefault(x.labels["vcpu"], {})[x.labels["reason"]] = float(x.value)
    assert set(by_vcpu) == {"0", "1"}
    for vid, counts in stats.vcpus.items():
        exported = by_vcpu[str(vid)]
        assert set(exported) >= expected_reasons()
        assert exported["io_out"] == counts.counts["io_out"] > 0
        for reason, value in exported.items():
            assert value == counts.counts.get(reason, 0), (vid, reason)
    d.delete("two")


def test_kernel_statistics_are_exported_per_vm(mkvmd: MetricsDaemon) -> None:
    mkvmd.start_pio_guest("kstats", min_exits=500)
    mkvmd.pause("kstats")
    io_out = mkvmd.exit_stats("kstats").total["io_out"]
    s = mkvmd.scrape()
    families = s.families()
    for name in KERNEL_VCPU_COUNTERS:
        assert families.get(f"kvmd_kvm_vcpu_{name}") == "counter", name
        s.value(f"kvmd_kvm_vcpu_{name}_total", vm="kstats")  # exactly one series per VM
    # Every exit kvmd handled was first an exit from the guest into KVM.
    assert s.value("kvmd_kvm_vcpu_exits_total", vm="kstats") >= io_out
    vm_scope = [n for n in families if n.startswith("kvmd_kvm_vm_")]
    assert vm_scope, "no per-VM kernel statistics"
    # Kernel histograms (halt wait/poll times) as cumulative Prometheus histograms in seconds.
    hists = [n for n, kind in families.items()
             if kind == "histogram" and n.startswith("kvmd_kvm_")]
    assert hists, "no kernel histogram exported"
    # Kernel time units (ns) are converted to base units.
    assert not [n for n in families if n.startswith("kvmd_kvm_") and "_ns" in n]
    for name in hists:
        buckets = s.find(f"{name}_bucket", vm="kstats")
        assert buckets[-1].labels["le"] == "+Inf"
        values = [b.value for b in buckets]
        assert values == sorted(values), f"{name} buckets are not cumulative"
        bounds = [float(b.labels["le"]) for b in buckets]
        assert bounds == sorted(bounds)
        if name.endswith("_seconds"):
            assert bounds[-2] < 3600, f"{name}: bucket bounds look like nanoseconds"
    mkvmd.delete("kstats")


def test_daemon_state_metrics_follow_the_vm(mkvmd: MetricsDaemon) -> None:
    mkvmd.start_pio_guest("state")
    s = mkvmd.scrape()
    assert s.value("kvmd_vm_state", vm="state", state="running") == 1
    assert s.value("kvmd_vm_state", vm="state", state="paused") == 0
    assert s.value("kvmd_vcpus", state="running") == 1
    assert s.value("kvmd_guest_memory_bytes", vm="state") == RAM_SIZE
    assert s.value("kvmd_memory_slots", vm="state") == 1
    assert s.value("kvmd_guest_memory_in_use_bytes") == RAM_SIZE
    # The VM, its stats fd and console eventfd, the vCPU's two, the slot's memfd.
    assert s.value("kvmd_vm_fds") == 3 + 2 + 1
    assert 0 < s.value("kvmd_vm_fds_limit") == mkvmd.daemon.host.fds.limit  # type: ignore[union-attr]
    mkvmd.pause("state")
    s = mkvmd.scrape()
    assert s.value("kvmd_vm_state", vm="state", state="paused") == 1
    assert s.value("kvmd_vm_state", vm="state", state="running") == 0
    assert s.value("kvmd_vcpus", state="paused") == 1
    assert s.value("kvmd_vcpus", state="running") == 0
    accepted = mkvmd.vms.WriteConsole(pb.WriteConsoleRequest(vm_id="state", data=b"hello"),
                                      timeout=RPC_TIMEOUT).accepted
    assert accepted == 5
    assert mkvmd.scrape().value("kvmd_console_bytes_total", vm="state", direction="in") == 5
    mkvmd.delete("state")
    s = mkvmd.scrape()
    assert s.value("kvmd_vms") == 0
    assert s.value("kvmd_guest_memory_in_use_bytes") == 0
    assert s.value("kvmd_vm_fds") == 0
    assert sum(x.value for x in s.find("kvmd_vcpus")) == 0


# mov al, 0xa5; mov [0x3000], al; mov [0x5000], al; mov [0x9000], al; then the PIO loop.
DIRTYING_LOOP = bytes([
    0xB0, 0xA5,        # mov al, 0xa5
    0xA2, 0x00, 0x30,  # mov [0x3000], al     page 3
    0xA2, 0x00, 0x50,  # mov [0x5000], al     page 5
    0xA2, 0x00, 0x90,  # mov [0x9000], al     page 9
    0xE6, 0x80,        # loop: out 0x80, al
    0xEB, 0xFC,        #       jmp loop
])


# The same stores again and again, an OUT after each round.
REDIRTYING_LOOP = bytes([
    0xB0, 0xA5,        # mov al, 0xa5
    0xA2, 0x00, 0x30,  # again: mov [0x3000], al
    0xA2, 0x00, 0x50,  # mov [0x5000], al
    0xA2, 0x00, 0x90,  # mov [0x9000], al
    0xE6, 0x80,        # out 0x80, al
    0xEB, 0xF3,        # jmp again
])


def start_dirtying(mkvmd: MetricsDaemon, vm_id: str, program: bytes) -> None:
    """A VM whose one slot logs dirty pages, running `program` at 0x1000 (real mode)."""
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT)
    mkvmd.memory.AddMemoryRegion(pb.AddMemoryRegionRequest(
        vm_id=vm_id, guest_addr=0, size=RAM_SIZE, log_dirty=True), timeout=RPC_TIMEOUT)
    # create_guest's memory region already exists: load the program and the vCPU by hand.
    mkvmd.memory.WriteGuestMemory(iter([pb.WriteGuestMemoryRequest(
        vm_id=vm_id, guest_addr=0x1000, data=program)]), timeout=RPC_TIMEOUT)
    mkvmd.vcpus.CreateVcpu(pb.CreateVcpuRequest(vm_id=vm_id, vcpu_id=0), timeout=RPC_TIMEOUT)
    ref = pb.VcpuRef(vm_id=vm_id, vcpu_id=0)
    sregs = mkvmd.vcpus.GetSregs(ref, timeout=RPC_TIMEOUT)
    sregs.cs.base = 0
    sregs.cs.selector = 0
    mkvmd.vcpus.SetSregs(pb.SetSregsRequest(vcpu=ref, sregs=sregs), timeout=RPC_TIMEOUT)
    mkvmd.vcpus.SetRegs(pb.SetRegsRequest(vcpu=ref, regs=pb.Regs(rip=0x1000, rflags=2)),
                        timeout=RPC_TIMEOUT)
    mkvmd.vms.StartVm(pb.VmRef(vm_id=vm_id), timeout=RPC_TIMEOUT)
    wait_for(lambda: mkvmd.exit_stats(vm_id).total["io_out"] > 0, "the guest's loop")


def test_dirty_pages_total_counts_dirty_log_fetches(mkvmd: MetricsDaemon) -> None:
    start_dirtying(mkvmd, "dirty", DIRTYING_LOOP)
    mkvmd.pause("dirty")
    assert mkvmd.scrape().value("kvmd_dirty_pages_total", vm="dirty") == 0

    chunks = list(mkvmd.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id="dirty", slot=0),
                                           timeout=RPC_TIMEOUT))
    bitmap = b"".join(c.bitmap for c in chunks)
    dirty = int.from_bytes(bitmap, "little").bit_count()
    assert dirty >= 3  # pages 3, 5 and 9 (and whatever else the CPU touched)
    assert mkvmd.scrape().value("kvmd_dirty_pages_total", vm="dirty") == dirty
    # The log was reset by the fetch: a second fetch adds nothing (the guest is paused).
    list(mkvmd.memory.GetDirtyLog(pb.GetDirtyLogRequest(vm_id="dirty", slot=0),
                                  timeout=RPC_TIMEOUT))
    assert mkvmd.scrape().value("kvmd_dirty_pages_total", vm="dirty") == dirty
    mkvmd.delete("dirty")


def test_a_crashed_vm_is_counted_by_reason(mkvmd: MetricsDaemon) -> None:
    before = mkvmd.scrape()
    assert before.families().get("kvmd_vm_crashes") == "counter"
    vm = mkvmd.crash_guest("crasher")
    assert vm.reason.startswith("internal_error"), vm.reason
    s = mkvmd.scrape()
    assert s.value("kvmd_vm_crashes_total", reason="internal_error") == 1
    assert s.value("kvmd_vm_state", vm="crasher", state="crashed") == 1
    assert s.value("kvmd_vcpus", state="crashed") == 1
    assert exits_of(s, "crasher")["internal_error"] == 1
    # The crash count outlives the VM (it is what the KvmdVmCrashed alert watches).
    mkvmd.delete("crasher")
    assert mkvmd.scrape().value("kvmd_vm_crashes_total", reason="internal_error") == 1


def test_the_dirty_rate_gauge_shows_the_last_measurement(mkvmd: MetricsDaemon) -> None:
    start_dirtying(mkvmd, "rate", REDIRTYING_LOOP)
    assert mkvmd.scrape().value("kvmd_dirty_pages_per_second", vm="rate") == 0  # none yet
    rate = mkvmd.memory.MeasureDirtyRate(pb.MeasureDirtyRateRequest(
        vm_id="rate", duration_ms=200), timeout=RPC_TIMEOUT)
    assert rate.dirty_pages_per_second > 0
    assert mkvmd.scrape().value("kvmd_dirty_pages_per_second", vm="rate") \
        == pytest.approx(rate.dirty_pages_per_second)
    mkvmd.delete("rate")


def test_kernel_histograms_keep_the_kernels_bucket_bounds() -> None:
    """A log2 histogram's bucket i holds [2^(i-1), 2^i): its Prometheus bound (le) is
    2^i - 1 units (bucket 0: zero); a linear one's bucket i ends at (i+1) bucket sizes; the
    last bucket is +Inf. Counts become cumulative."""
    log2 = StatDescriptor("halt_wait_hist", "log_hist", "seconds", 10, -9, 4, 0, 0)
    assert _hist_buckets(log2, [1, 2, 3, 4], 1e-9) == [
        ("0.0", 1), ("1e-09", 3), ("3e-09", 6), ("+Inf", 10)]
    linear = StatDescriptor("halt_poll_hist", "linear_hist", "none", 10, 0, 3, 0, 10)
    assert _hist_buckets(linear, [1, 1, 1], 1.0) == [("10.0", 1), ("20.0", 2), ("+Inf", 3)]
