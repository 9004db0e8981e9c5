"""vCPU threads lower their own scheduling priority (vcpu_nice); the API's threads keep
theirs and ask for a shorter slice (api_slice_us), so the control plane stays responsive
while guests spin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_threads import own_thread_nices
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


def test_a_resumed_vcpu_thread_lowers_itself_only_once_it_holds_no_gil(
        api_factory: Callable[..., Api]) -> None:
    """A resumed vCPU thread runs its way back into the guest (Python, holding the GIL) at
    the API's priority, and lowers itself to vcpu_nice in C, inside the run call, with the
    GIL released. Lowered before it woke (as it was), a thread preempted there by the
    spinning vCPUs of its CPU held the GIL: with 64 vCPUs on one CPU, a GetVm after a
    ResumeVm waited 0.4-0.7 s. Its slice goes back to the kernel's before it is woken."""
    api: Api = api_factory()
    api.boot("lowered", SPIN)
    api.start("lowered")
    host = api.daemon.host
    assert host is not None
    vcpu = host.get_vm("lowered").vcpu(0).vcpu
    wait_until(lambda: vcpu_thread_nice("lowered") == DEFAULT_VCPU_NICE, WAIT, "lowered")
    assert api.pause("lowered").state == "paused"
    assert vcpu_thread_nice("lowered") == 0  # boosted while paused
    entries: list[tuple[int, bool]] = []
    real = vcpu.run_until_unhandled

    def recording(*args: Any) -> Any:
        entries.append((os.getpriority(os.PRIO_PROCESS, 0), len(args) > 1 and bool(args[1])))
        return real(*args)

    vcpu.run_until_unhandled = recording  # type: ignore[method-assign]
    api.vms.ResumeVm(pb.VmRef(vm_id="lowered"))
    short = sched.api_slice_us()
    if short and sched.thread_slice_ns(0):  # a kernel with per-thread slices
        assert vcpu_thread_slice_us("lowered") > short  # the kernel's, before it woke
    wait_until(lambda: vcpu_thread_nice("lowered") == DEFAULT_VCPU_NICE, WAIT,
               "the thread lowered in the guest")
    assert entries[0] == (0, True), entries  # entered at the API's nice, lowering there
    api.delete("lowered")


def test_the_vcpu_thread_makes_no_system_call_under_its_lock_on_its_way_back(
        api_factory: Callable[..., Api]) -> None:
    """KVM_KVMCLOCK_CTRL (on the way back into the guest after a pause) runs outside the
    vCPU's lock: a low-priority vCPU thread preempted inside a system call would otherwise
    hold up every API call that takes that lock (a pause, a watch, GetVcpuState)."""
    api: Api = api_factory()
    api.boot("clocked", SPIN)
    api.start("clocked")
    host = api.daemon.host
    assert host is not None
    managed = host.get_vm("clocked").vcpu(0)
    held: list[bool] = []
    real = managed.vcpu.kvmclock_ctrl

    def recording() -> None:
        held.append(managed.cond._is_owned())  # type: ignore[attr-defined]
        real()

    managed.vcpu.kvmclock_ctrl = recording  # type: ignore[method-assign]
    for returns in range(1, 4):
        api.pause("clocked")
        api.vms.ResumeVm(pb.VmRef(vm_id="clocked"))
        # Before the next pause: one that came before the thread woke would find it still
        # parked, and the two pauses would share one return to the guest.
        wait_until(lambda n=returns: len(held) >= n, WAIT, f"return {returns} to the guest")
    assert not any(held), held
    api.delete("clocked")


def test_watching_a_vcpu_never_waits_for_its_lock(api_factory: Callable[..., Api]) -> None:
    """Adding and removing a state listener (what PauseVm does on the event loop for every
    vCPU) does not take the vCPU's lock, which its thread may hold."""
    api: Api = api_factory()
    api.boot("watched", SPIN)
    host = api.daemon.host
    assert host is not None
    managed = host.get_vm("watched").vcpu(0)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with managed.cond:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        done = threading.Event()

        def listen() -> None:
            listener = done.is_set
            managed.add_listener(listener)
            managed.remove_listener(listener)
            done.set()

        threading.Thread(target=listen, daemon=True).start()
        assert done.wait(10), "add_listener waited for the vCPU's lock"
    finally:
        release.set()
        holder.join(10)
    api.delete("watched")


def _threads(pid: int) -> dict[int, tuple[int, int]]:
    """Each of the daemon's own threads of process `pid`: (nice value, scheduler slice in
    us)."""
    out = {}
    for tid, nice in own_thread_nices(pid).items():
        try:
            out[tid] = (nice, sched.thread_slice_ns(tid) // 1000)
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _kvmctl_info(directory: Path) -> str:
    """What `kvmctl info` prints for the daemon listening in `directory`."""
    return subprocess.run([str(Path(sys.executable).with_name("kvmctl")), "--address",
                           f"unix://{directory / 'kvmd.sock'}", "info"],
                          capture_output=True, text=True, timeout=60, check=True).stdout


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


# -- CPUs (vcpu_cpus) -------------------------------------------------------------------------

def test_vcpu_threads_run_only_on_vcpu_cpus_and_the_others_anywhere(tmp_path: Path) -> None:
    """The command line's --vcpu-cpus reaches every vCPU thread, and only them: the CPUs
    left out are the control plane's."""
    allowed = os.sched_getaffinity(0)
    guest_cpu = max(allowed)
    proc, client = _spinning_daemon(tmp_path, "--vcpu-cpus", str(guest_cpu))
    try:
        nices = own_thread_nices(proc.pid)
        vcpus = [tid for tid, nice in nices.items() if nice == 10]
        others = [tid for tid, nice in nices.items() if nice == 0]
        assert len(vcpus) == 1 and others
        assert os.sched_getaffinity(vcpus[0]) == {guest_cpu}
        for tid in others:  # the event loop, the call pool, grpc's threads
            assert os.sched_getaffinity(tid) == allowed, tid
        # Paused (boosted to the API's priority) and resumed, it stays where it was put.
        client.pause_vm("spin")
        client.resume_vm("spin")
        assert os.sched_getaffinity(vcpus[0]) == {guest_cpu}
        # GetInfo tells orchestrators where guests run; kvmctl info shows it.
        assert list(client.info().vcpu_cpus) == [guest_cpu]
        shown = _kvmctl_info(tmp_path)
        assert re.search(rf"^guest CPUs\s+{guest_cpu}$", shown, re.M), shown
    finally:
        client.close()
        proc.terminate()
        assert proc.wait(30) == 0


def test_vcpu_cpus_from_an_embedded_daemon_confine_each_vcpu(
        api_factory: Callable[..., Api]) -> None:
    guest_cpu = min(os.sched_getaffinity(0))
    api: Api = api_factory(vcpu_cpus=str(guest_cpu))
    api.boot("pinned", SPIN)
    api.start("pinned")
    wait_until(lambda: os.sched_getaffinity(vcpu_tid("pinned")) == {guest_cpu}, WAIT,
               "the vCPU thread on its CPU")
    # Every other thread of the (embedded) daemon keeps every CPU.
    for thread in threading.enumerate():
        if not thread.name.startswith("vcpu-") and thread.native_id is not None:
            assert os.sched_getaffinity(thread.native_id) == os.sched_getaffinity(0), thread
    api.delete("pinned")
    # Without vcpu_cpus, guests may use every CPU the daemon may use, and GetInfo says so.
    anywhere: Api = api_factory()
    info = anywhere.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=WAIT)
    assert list(info.vcpu_cpus) == sorted(os.sched_getaffinity(0))


# -- CPUs of the other threads (api_cpus) --------------------------------------------------

def test_api_threads_run_only_on_api_cpus_and_vcpu_threads_on_every_cpu(
        tmp_path: Path) -> None:
    """--api-cpus confines every thread but the vCPUs' (the event loop, the call pool,
    grpc's); vCPU threads take back every CPU the daemon may use, or vcpu_cpus."""
    allowed = os.sched_getaffinity(0)
    api_cpu, guest_cpu = max(allowed), min(allowed)
    for args, guest_cpus in ((("--api-cpus", str(api_cpu)), allowed),
                             (("--api-cpus", str(api_cpu), "--vcpu-cpus", str(guest_cpu)),
                              {guest_cpu})):
        directory = tmp_path / str(len(args))
        directory.mkdir()
        proc, client = _spinning_daemon(directory, *args)
        try:
            nices = own_thread_nices(proc.pid)
            vcpus = [tid for tid, nice in nices.items() if nice == 10]
            others = [tid for tid, nice in nices.items() if nice == 0]
            assert len(vcpus) == 1 and len(others) > 3, nices
            assert os.sched_getaffinity(vcpus[0]) == guest_cpus
            for tid in others:
                assert os.sched_getaffinity(tid) == {api_cpu}, tid
            # A pause and a resume leave it where it was put (its thread was started by a
            # call thread, on api_cpus, and took the guests' CPUs itself).
            client.pause_vm("spin")
            client.resume_vm("spin")
            assert os.sched_getaffinity(vcpus[0]) == guest_cpus
            info = client.info()
            assert list(info.api_cpus) == [api_cpu]
            assert list(info.vcpu_cpus) == sorted(guest_cpus)
            assert re.search(rf"^API CPUs\s+{api_cpu}$", _kvmctl_info(directory), re.M)
            # Calls answered on the last CPU (APIC ID 1 here, not 0): the supported CPUID
            # is the template, and a vCPU given it names itself (kvmd.core.cpuid).
            supported = client.supported_cpuid()
            assert next(e for e in supported if e.function == 1).ebx >> 24 == 0
            client.create_vm("ids")
            for vcpu_id in (0, 1):
                client.create_vcpu("ids", vcpu_id)
                client.set_cpuid("ids", vcpu_id, use_supported=True)
                leaf1 = next(e for e in client.get_cpuid("ids", vcpu_id) if e.function == 1)
                assert leaf1.ebx >> 24 == vcpu_id
            client.delete_vm("ids")
        finally:
            client.close()
            proc.terminate()
            assert proc.wait(30) == 0


def test_without_api_cpus_every_thread_may_use_every_cpu(api_factory: Callable[..., Api]
                                                         ) -> None:
    api: Api = api_factory()
    info = api.hypervisor.GetInfo(pb.GetInfoRequest(), timeout=WAIT)
    assert list(info.api_cpus) == sorted(os.sched_getaffinity(0))
    assert list(info.vcpu_cpus) == sorted(os.sched_getaffinity(0))


def test_bad_api_cpus_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api_cpus: .* is not a CPU list"):
        validate(Config(api_cpus="0-"))
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=f"names CPUs {outside} that the daemon may not run"):
        validate(Config(api_cpus=str(outside)))
    validate(Config(api_cpus=str(min(os.sched_getaffinity(0)))))
    assert Config().api_cpu_set() is None
    assert Config(api_cpus="0").api_cpu_set() == {0}
    # The daemon refuses to start on them (exit 2), saying why.
    done = subprocess.run([str(Path(sys.executable).with_name("kvmd")), "--listen",
                           f"unix://{tmp_path / 'kvmd.sock'}", "--api-cpus", str(outside)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"api_cpus '{outside}' names CPUs {outside}" in done.stderr


def test_cpu_lists_read_as_linux_writes_them() -> None:
    assert sched.parse_cpu_list("3") == {3}
    assert sched.parse_cpu_list("0,2-4, 7") == {0, 2, 3, 4, 7}
    assert sched.format_cpu_list(frozenset({0, 1, 2, 5, 7, 8})) == "0-2,5,7-8"
    for bad in ("", "a", "1-", "-1", "3-1", "1,,2", "1.5"):
        with pytest.raises(ValueError):
            sched.parse_cpu_list(bad)


def test_bad_vcpu_cpus_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"vcpu_cpus: .* is not a CPU list"):
        validate(Config(vcpu_cpus="one"))
    with pytest.raises(ConfigError, match="descending"):
        validate(Config(vcpu_cpus="1-0"))
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=f"names CPUs {outside} that the daemon may not run"):
        validate(Config(vcpu_cpus=f"0,{outside}"))
    validate(Config(vcpu_cpus=sched.format_cpu_list(frozenset(os.sched_getaffinity(0)))))
    assert Config().vcpu_cpu_set() is None
    assert Config(vcpu_cpus="0").vcpu_cpu_set() == {0}
