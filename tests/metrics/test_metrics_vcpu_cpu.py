"""kvmd_vcpu_cpu_seconds_total: the CPU time a VM's vCPU threads used, per VM (per vCPU with
the vcpu label). Zero for a VM that never ran, growing while a guest spins, and never going
back when a vCPU's thread ends and another starts (a stop, then a start)."""

from __future__ import annotations

from collections.abc import Callable

from metrics_support import RPC_TIMEOUT, MetricsDaemon, wait_for

from kvmd_proto import vmm_pb2 as pb

SPIN = b"\xeb\xfe"  # jmp $


def cpu_seconds(mkvmd: MetricsDaemon, vm_id: str) -> float:
    return mkvmd.scrape().value("kvmd_vcpu_cpu_seconds_total", vm=vm_id)


def test_cpu_time_grows_while_the_guest_spins_and_survives_a_restart(
        mkvmd: MetricsDaemon) -> None:
    mkvmd.create_guest("burner", SPIN)
    assert cpu_seconds(mkvmd, "burner") == 0  # never ran
    ref = pb.VmRef(vm_id="burner")
    mkvmd.vms.StartVm(ref, timeout=RPC_TIMEOUT)
    wait_for(lambda: cpu_seconds(mkvmd, "burner") > 0.05, "the spinning guest's CPU time")
    mkvmd.vms.StopVm(ref, timeout=RPC_TIMEOUT)
    stopped = cpu_seconds(mkvmd, "burner")
    assert stopped > 0.05
    assert cpu_seconds(mkvmd, "burner") == stopped  # no thread: nothing more is used
    mkvmd.vms.StartVm(ref, timeout=RPC_TIMEOUT)  # a new thread, its own clock from 0
    assert cpu_seconds(mkvmd, "burner") >= stopped
    wait_for(lambda: cpu_seconds(mkvmd, "burner") > stopped + 0.05, "more CPU time")
    mkvmd.delete("burner")


def test_an_idle_vm_is_exported_as_zero(mkvmd: MetricsDaemon) -> None:
    mkvmd.vms.CreateVm(pb.CreateVmRequest(vm_id="empty"), timeout=RPC_TIMEOUT)
    assert cpu_seconds(mkvmd, "empty") == 0
    mkvmd.delete("empty")


def test_the_vcpu_label_splits_cpu_time_per_vcpu(
        metrics_daemon: Callable[..., MetricsDaemon]) -> None:
    d = metrics_daemon(metrics_vcpu_label=True)
    d.create_guest("pair", SPIN, vcpus=2)
    d.vms.StartVm(pb.VmRef(vm_id="pair"), timeout=RPC_TIMEOUT)

    def per_vcpu() -> dict[str, float]:
        series = d.scrape().find("kvmd_vcpu_cpu_seconds_total", vm="pair")
        assert all(set(x.labels) == {"vm", "vcpu"} for x in series), series
        return {x.labels["vcpu"]: float(x.value) for x in series}

    wait_for(lambda: per_vcpu().keys() == {"0", "1"} and min(per_vcpu().values()) > 0,
             "both vCPUs' CPU time")
    d.delete("pair")
