"""vCPU threads lower their own scheduling priority (vcpu_nice); the API's threads keep
theirs and ask for a shorter slice (api_slice_us), so the control plane stays responsive
while guests spin."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from guests import CODE_ADDR, SPIN
from polling import wait_until
from runctl_api import WAIT, Api

from kvmd.config import DEFAULT_API_SLICE_US, DEFAULT_VCPU_NICE, Config, ConfigError, validate
from kvmd.core import sched
from kvmd_client import KvmdClient
from kvmd_proto import vmm_pb2 as pb


def vcpu_tid(vm_id: str) -> int:
    """The native thread id of vCPU 0 of `vm_id` (a daemon in this process)."""
    threads = [t for t in threading.enumerate() if t.name == f"vcpu-{vm_id}-0"]
    assert threads and threads[0].native_id is not None
    return threads[0].native_id


def vcpu_thread_nice(vm_id: str) -> int:
    return os.getpriority(os.PRIO_PROCESS, vcpu_tid(vm_id))


def test_vcpu_threads_run_at_the_configured_nice_value(api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory()  # the default: DEFAULT_VCPU_NICE
    api.boot("spin", SPIN)
    api.start("spin")
    wait_until(lambda: vcpu_thread_nice("spin") == DEFAULT_VCPU_NICE, WAIT, "the nice value")
    # The API's threads (and this test's) are untouched.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0
    assert api.get_vm("spin").state == "running"
    # Paused, the thread has the API's priority back (so it leaves the guest promptly on a
    # busy host); resumed, it lowers itself again.
    assert api.pause("spin").state == "paused"
    assert vcpu_thread_nice("spin") == 0
    api.vms.ResumeVm(pb.VmRef(vm_id="spin"))
    wait_until(lambda: vcpu_thread_nice("spin") == DEFAULT_VCPU_NICE, WAIT, "nice again")
    api.delete("spin")

    off = api_factory(vcpu_nice=0)
    off.boot("plain", SPIN)
    off.start("plain")
    wait_until(lambda: off.get_vm("plain").state == "running", WAIT, "running")
    assert vcpu_thread_nice("plain") == 0
    off.delete("plain")


def test_vcpu_threads_under_the_idle_policy(api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory(vcpu_policy="idle")
    api.boot("idle", SPIN)
    api.start("idle")
    wait_until(lambda: vcpu_thread_policy("idle") == os.SCHED_IDLE, WAIT, "SCHED_IDLE")
    assert api.pause("idle").state == "paused"
    assert vcpu_thread_policy("idle") == os.SCHED_OTHER  # paused: the API's priority
    assert vcpu_thread_nice("idle") == 0
    api.vms.ResumeVm(pb.VmRef(vm_id="idle"))
    wait_until(lambda: vcpu_thread_policy("idle") == os.SCHED_IDLE, WAIT, "idle again")
    api.delete("idle")


def vcpu_thread_policy(vm_id: str) -> int:
    return os.sched_getscheduler(vcpu_tid(vm_id))


# -- scheduler slices (api_slice_us) ----------------------------------------------------------

def vcpu_thread_slice_us(vm_id: str) -> int:
    return sched.thread_slice_ns(vcpu_tid(vm_id)) // 1000


def test_a_paused_vcpu_has_the_api_slice_until_it_runs_again(
        api_factory: Callable[..., Api]) -> None:
    api: Api = api_factory()  # the default api_slice_us
    short = sched.api_slice_us()
    if not short:
        pytest.skip("this kernel has no per-thread scheduler slices (Linux 6.12+)")
    assert short == DEFAULT_API_SLICE_US
    api.boot("sliced", SPIN)
    api.start("sliced")
    wait_until(lambda: vcpu_thread_slice_us("sliced") > short, WAIT, "the kernel's slice")
    # Paused, it leaves the guest as promptly as the API thread that asked...
    assert api.pause("sliced").state == "paused"
    assert vcpu_thread_slice_us("sliced") == short
    # ... and back in the guest it has the kernel's slice again.
    api.vms.ResumeVm(pb.VmRef(vm_id="sliced"))
    wait_until(lambda: vcpu_thread_slice_us("sliced") > short, WAIT, "the kernel's slice again")
    api.delete("sliced")


def _threads(pid: int) -> dict[int, tuple[int, int]]:
    """Each thread of process `pid`: (nice value, scheduler slice in us). Not KVM's own
    workers (kvm-nx-lpage-recovery: a kernel thread the first KVM_RUN adds to the process,
    with the attributes of the vCPU thread that made it)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                if comm.read().startswith("kvm-"):
                    continue
            out[tid] = (os.getpriority(os.PRIO_PROCESS, tid), sched.thread_slice_ns(tid) // 1000)
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _spinning_daemon(directory: Path, *args: str) -> tuple[subprocess.Popen[bytes], KvmdClient]:
    """A kvmd process (the command line's start-up path) running one spinning guest."""
    sock = directory / "kvmd.sock"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kvmd")), "--listen",
                             f"unix://{sock}", "--metrics-listen", "off", "--log-level",
                             "error", *args], stdin=subprocess.DEVNULL)
    wait_until(lambda: sock.exists() or proc.poll() is not None, WAIT, "kvmd to listen")
    client = KvmdClient(f"unix://{sock}", timeout=30.0)
    client.create_vm("spin")
    client.add_memory_region("spin", 0, 0x10000)
    client.write_memory("spin", CODE_ADDR, SPIN)
    client.create_vcpu("spin", 0)
    client.set_sregs("spin", 0, cs={"base": CODE_ADDR, "selector": CODE_ADDR >> 4})
    client.set_regs("spin", 0, rip=0, rflags=2)
    client.start_vm("spin")
    # The vCPU thread is the one at vcpu_nice (10); every other stays at 0.
    wait_until(lambda: any(nice == 10 for nice, _ in _threads(proc.pid).values()), WAIT,
               "the vCPU thread at nice 10")
    return proc, client


def test_daemon_threads_take_a_short_slice_and_vcpu_threads_the_kernels(tmp_path: Path) -> None:
    if not sched.thread_slice_ns(0):
        pytest.skip("this kernel has no per-thread scheduler slices (Linux 6.12+)")
    for args, api_slice in (((), DEFAULT_API_SLICE_US), (("--api-slice-us", "0"), 0)):
        directory = tmp_path / ("default" if api_slice else "off")
        directory.mkdir()
        proc, client = _spinning_daemon(directory, *args)
        try:
            threads = _threads(proc.pid)
            vcpu = [s for nice, s in threads.values() if nice == 10]
            others = {s for nice, s in threads.values() if nice == 0}
            assert len(vcpu) == 1 and vcpu[0] > DEFAULT_API_SLICE_US, threads
            if api_slice:  # the loop, the call pool, grpc's threads: all short
                assert others == {api_slice}, threads
            else:  # 0: nothing asked, every thread at the kernel's default
                assert others == {vcpu[0]}, threads
        finally:
            client.close()
            proc.terminate()
            assert proc.wait(30) == 0


def test_a_bad_api_slice_is_refused() -> None:
    for value in (-1, 1, 99, 100_001):
        with pytest.raises(ConfigError, match="api_slice_us"):
            validate(Config(api_slice_us=value))
    for value in (0, 100, 100_000):
        validate(Config(api_slice_us=value))
