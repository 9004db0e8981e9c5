"""kvmd as a process: the --metrics-listen and --metrics-vcpu-label flags, and /metrics while
a vCPU stays inside KVM_RUN (a guest that runs without exits to userspace).

A daemon that wedges is killed (SIGKILL) at teardown, so a hang fails the test, never the
suite."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from metrics_support import RPC_TIMEOUT, KvmdProcess, Scrape, wait_for

from kvmd_proto import vmm_pb2 as pb

SPIN = bytes([0xEB, 0xFE])  # jmp $   (never exits to userspace on its own)
# A healthy daemon answers in milliseconds; these bound how long a wedged one is given.
SCRAPE_TIMEOUT = 8.0
PAUSE_TIMEOUT = 8.0


@pytest.fixture
def kvmd_process(tmp_path: Path) -> Iterator[Callable[..., KvmdProcess]]:
    started: list[KvmdProcess] = []

    def start(*flags: str) -> KvmdProcess:
        directory = tmp_path / f"proc-{len(started)}"
        directory.mkdir()
        p = KvmdProcess(directory, *flags)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.stopped:
            continue  # the test stopped it and judged the outcome itself
        code = p.stop()
        assert not p.killed, f"kvmd ignored SIGTERM and was killed:\n{p.log()}"
        assert code == 0, f"kvmd exited {code}:\n{p.log()}"


def test_cli_flags_serve_metrics_with_a_vcpu_label(
        kvmd_process: Callable[..., KvmdProcess]) -> None:
    p = kvmd_process("--metrics-vcpu-label")
    p.start_pio_guest("cli", vcpus=2)
    s = p.scrape()
    series = s.find("kvmd_vcpu_exits_total", vm="cli", reason="io_out")
    assert {x.labels.get("vcpu") for x in series} == {"0", "1"}
    assert all(set(x.labels) == {"vm", "reason", "vcpu"} for x in series)
    assert s.find("process_open_fds") and s.find("process_resident_memory_bytes")
    p.delete("cli")


def test_scrape_while_a_vcpu_spins_in_the_guest(
        kvmd_process: Callable[..., KvmdProcess]) -> None:
    """The first scrape after a vCPU started must not wait for that vCPU to leave KVM_RUN,
    and must not stop the daemon from pausing it. (Reading a vCPU's kernel statistics needs
    its stats fd; KVM_GET_STATS_FD on a vCPU fd takes the vCPU mutex, which KVM_RUN holds
    while the guest runs.)"""
    p = kvmd_process()
    p.create_guest("spinner", SPIN)
    p.vms.StartVm(pb.VmRef(vm_id="spinner"), timeout=RPC_TIMEOUT)
    wait_for(lambda: p.vms.GetVm(pb.GetVmRequest(vm_id="spinner"),
                                 timeout=RPC_TIMEOUT).state == "running", "the VM running")

    problems = []
    scrape: Scrape | None = None
    try:
        scrape = p.scrape_with_timeout(SCRAPE_TIMEOUT)
    except (TimeoutError, urllib.error.URLError) as exc:
        problems.append(f"/metrics did not answer within {SCRAPE_TIMEOUT:.0f} s while the "
                        f"vCPU was in the guest ({exc})")
    try:
        p.vms.PauseVm(pb.VmRef(vm_id="spinner"), timeout=PAUSE_TIMEOUT)
    except grpc.RpcError as exc:
        problems.append(f"PauseVm failed after that scrape: "
                        f"{exc.code().name}")  # type: ignore[attr-defined]
    if problems:
        code = p.stop()
        if p.killed:
            problems.append(f"kvmd did not exit within {p.STOP_SECONDS:.0f} s of SIGTERM and "
                            "was killed")
        else:
            problems.append(f"kvmd exited {code} on SIGTERM")
    assert not problems, "\n".join(problems)

    assert scrape is not None
    assert scrape.value("kvmd_vm_state", vm="spinner", state="running") == 1
    assert scrape.find("kvmd_kvm_vcpu_exits_total", vm="spinner")
    after = p.scrape()
    assert after.value("kvmd_vm_state", vm="spinner", state="paused") == 1
    p.delete("spinner")
